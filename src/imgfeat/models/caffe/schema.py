"""The part of Caffe's protobuf schema that deploy nets and their weights use, built at run
time with the protobuf runtime: no Caffe, no protoc, no generated code.

Field numbers and names are those of BVLC Caffe's `caffe.proto` (package `caffe`, proto2),
so `.prototxt` text and `.caffemodel` binaries parse as they do in Caffe. Fields a deploy
net does not need (fillers, learning rates, data sources) are left out; the text parser
skips them and the binary parser keeps them as unknown fields.
"""

from __future__ import annotations

from functools import cache

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

F = descriptor_pb2.FieldDescriptorProto
TYPES = {"int64": F.TYPE_INT64, "uint32": F.TYPE_UINT32, "int32": F.TYPE_INT32,
         "float": F.TYPE_FLOAT, "double": F.TYPE_DOUBLE, "bool": F.TYPE_BOOL,
         "string": F.TYPE_STRING}

# message -> [(field, number, type, repeated?, default)]; a capitalised type is a message,
# a type with a dot ("Message.Enum") or listed in ENUMS is an enum.
MESSAGES: dict[str, list[tuple]] = {
    "BlobShape": [("dim", 1, "int64", "packed", None)],
    "BlobProto": [("shape", 7, "BlobShape", False, None), ("data", 5, "float", "packed", None),
                  ("diff", 6, "float", "packed", None),
                  ("double_data", 8, "double", "packed", None),
                  ("num", 1, "int64", False, "0"), ("channels", 2, "int64", False, "0"),
                  ("height", 3, "int64", False, "0"), ("width", 4, "int64", False, "0")],
    "NetStateRule": [("phase", 1, "Phase", False, None), ("min_level", 2, "int32", False, None),
                     ("max_level", 3, "int32", False, None),
                     ("stage", 4, "string", True, None), ("not_stage", 5, "string", True, None)],
    "NetParameter": [("name", 1, "string", False, None), ("input", 3, "string", True, None),
                     ("input_shape", 8, "BlobShape", True, None),
                     ("input_dim", 4, "int32", True, None),
                     ("layer", 100, "LayerParameter", True, None),
                     ("layers", 2, "V1LayerParameter", True, None)],
    "ConvolutionParameter": [
        ("num_output", 1, "uint32", False, None), ("bias_term", 2, "bool", False, "true"),
        ("pad", 3, "uint32", True, None), ("kernel_size", 4, "uint32", True, None),
        ("stride", 6, "uint32", True, None), ("dilation", 18, "uint32", True, None),
        ("pad_h", 9, "uint32", False, "0"), ("pad_w", 10, "uint32", False, "0"),
        ("kernel_h", 11, "uint32", False, None), ("kernel_w", 12, "uint32", False, None),
        ("stride_h", 13, "uint32", False, None), ("stride_w", 14, "uint32", False, None),
        ("group", 5, "uint32", False, "1"), ("axis", 16, "int32", False, "1")],
    "PoolingParameter": [
        ("pool", 1, "PoolingParameter.PoolMethod", False, "MAX"),
        ("pad", 4, "uint32", False, "0"), ("pad_h", 9, "uint32", False, "0"),
        ("pad_w", 10, "uint32", False, "0"), ("kernel_size", 2, "uint32", False, None),
        ("kernel_h", 5, "uint32", False, None), ("kernel_w", 6, "uint32", False, None),
        ("stride", 3, "uint32", False, "1"), ("stride_h", 7, "uint32", False, None),
        ("stride_w", 8, "uint32", False, None), ("global_pooling", 12, "bool", False, "false"),
        ("round_mode", 13, "PoolingParameter.RoundMode", False, "CEIL")],
    "ReLUParameter": [("negative_slope", 1, "float", False, "0")],
    "PReLUParameter": [("channel_shared", 2, "bool", False, "false")],
    "LRNParameter": [("local_size", 1, "uint32", False, "5"), ("alpha", 2, "float", False, "1"),
                     ("beta", 3, "float", False, "0.75"),
                     ("norm_region", 4, "LRNParameter.NormRegion", False, "ACROSS_CHANNELS"),
                     ("k", 5, "float", False, "1")],
    "InnerProductParameter": [("num_output", 1, "uint32", False, None),
                              ("bias_term", 2, "bool", False, "true"),
                              ("axis", 5, "int32", False, "1"),
                              ("transpose", 6, "bool", False, "false")],
    "DropoutParameter": [("dropout_ratio", 1, "float", False, "0.5")],
    "SoftmaxParameter": [("axis", 2, "int32", False, "1")],
    "ConcatParameter": [("axis", 2, "int32", False, "1"), ("concat_dim", 1, "uint32", False, "1")],
    "EltwiseParameter": [("operation", 1, "EltwiseParameter.EltwiseOp", False, "SUM"),
                         ("coeff", 2, "float", True, None)],
    "BatchNormParameter": [("use_global_stats", 1, "bool", False, None),
                           ("eps", 3, "float", False, "1e-5")],
    "ScaleParameter": [("axis", 1, "int32", False, "1"), ("num_axes", 2, "int32", False, "1"),
                       ("bias_term", 4, "bool", False, "false")],
    "BiasParameter": [("axis", 1, "int32", False, "1"), ("num_axes", 2, "int32", False, "1")],
    "FlattenParameter": [("axis", 1, "int32", False, "1"), ("end_axis", 2, "int32", False, "-1")],
    "ReshapeParameter": [("shape", 1, "BlobShape", False, None),
                         ("axis", 2, "int32", False, "0"), ("num_axes", 3, "int32", False, "-1")],
    "InputParameter": [("shape", 1, "BlobShape", True, None)],
}

_LAYER_PARAMS = [("batch_norm_param", 139, "BatchNormParameter"), ("bias_param", 141,
                 "BiasParameter"), ("concat_param", 104, "ConcatParameter"),
                 ("convolution_param", 106, "ConvolutionParameter"),
                 ("dropout_param", 108, "DropoutParameter"),
                 ("eltwise_param", 110, "EltwiseParameter"),
                 ("flatten_param", 135, "FlattenParameter"),
                 ("inner_product_param", 117, "InnerProductParameter"),
                 ("input_param", 143, "InputParameter"), ("lrn_param", 118, "LRNParameter"),
                 ("pooling_param", 121, "PoolingParameter"),
                 ("prelu_param", 131, "PReLUParameter"), ("relu_param", 123, "ReLUParameter"),
                 ("reshape_param", 133, "ReshapeParameter"),
                 ("scale_param", 142, "ScaleParameter"),
                 ("softmax_param", 125, "SoftmaxParameter")]
MESSAGES["LayerParameter"] = [
    ("name", 1, "string", False, None), ("type", 2, "string", False, None),
    ("bottom", 3, "string", True, None), ("top", 4, "string", True, None),
    ("blobs", 7, "BlobProto", True, None), ("include", 8, "NetStateRule", True, None),
    ("exclude", 9, "NetStateRule", True, None),
    *[(name, number, kind, False, None) for name, number, kind in _LAYER_PARAMS]]

_V1_PARAMS = [("concat_param", 9, "ConcatParameter"),
              ("convolution_param", 10, "ConvolutionParameter"),
              ("dropout_param", 12, "DropoutParameter"),
              ("eltwise_param", 24, "EltwiseParameter"),
              ("inner_product_param", 17, "InnerProductParameter"),
              ("lrn_param", 18, "LRNParameter"), ("pooling_param", 19, "PoolingParameter"),
              ("relu_param", 30, "ReLUParameter"), ("softmax_param", 39, "SoftmaxParameter")]
MESSAGES["V1LayerParameter"] = [
    ("bottom", 2, "string", True, None), ("top", 3, "string", True, None),
    ("name", 4, "string", False, None), ("include", 32, "NetStateRule", True, None),
    ("exclude", 33, "NetStateRule", True, None),
    ("type", 5, "V1LayerParameter.LayerType", False, None),
    ("blobs", 6, "BlobProto", True, None),
    *[(name, number, kind, False, None) for name, number, kind in _V1_PARAMS]]

ENUMS: dict[str, dict[str, int]] = {
    "Phase": {"TRAIN": 0, "TEST": 1},
    "PoolingParameter.PoolMethod": {"MAX": 0, "AVE": 1, "STOCHASTIC": 2},
    "PoolingParameter.RoundMode": {"CEIL": 0, "FLOOR": 1},
    "LRNParameter.NormRegion": {"ACROSS_CHANNELS": 0, "WITHIN_CHANNEL": 1},
    "EltwiseParameter.EltwiseOp": {"PROD": 0, "SUM": 1, "MAX": 2},
    "V1LayerParameter.LayerType": {
        "NONE": 0, "ABSVAL": 35, "ACCURACY": 1, "ARGMAX": 30, "BNLL": 2, "CONCAT": 3,
        "CONTRASTIVE_LOSS": 37, "CONVOLUTION": 4, "DATA": 5, "DECONVOLUTION": 39,
        "DROPOUT": 6, "DUMMY_DATA": 32, "EUCLIDEAN_LOSS": 7, "ELTWISE": 25, "EXP": 38,
        "FLATTEN": 8, "HDF5_DATA": 9, "HDF5_OUTPUT": 10, "HINGE_LOSS": 28, "IM2COL": 11,
        "IMAGE_DATA": 12, "INFOGAIN_LOSS": 13, "INNER_PRODUCT": 14, "LRN": 15,
        "MEMORY_DATA": 29, "MULTINOMIAL_LOGISTIC_LOSS": 16, "MVN": 34, "POOLING": 17,
        "POWER": 26, "RELU": 18, "SIGMOID": 19, "SIGMOID_CROSS_ENTROPY_LOSS": 27,
        "SILENCE": 36, "SOFTMAX": 20, "SOFTMAX_LOSS": 21, "SPLIT": 22, "SLICE": 33,
        "TANH": 23, "WINDOW_DATA": 24, "THRESHOLD": 31},
}


def _file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(name="imgfeat_caffe.proto", package="caffe",
                                               syntax="proto2")
    messages = {}
    for name, fields in MESSAGES.items():
        message = proto.message_type.add(name=name)
        messages[name] = message
        for field, number, kind, repeated, default in fields:
            _add_field(message, field, number, kind, repeated, default)
    for name, values in ENUMS.items():
        owner, _, enum_name = name.rpartition(".")
        enum = (messages[owner].enum_type if owner else proto.enum_type).add(name=enum_name)
        for value_name, number in values.items():
            enum.value.add(name=value_name, number=number)
    return proto


def _add_field(message, name: str, number: int, kind: str, repeated, default) -> None:
    field = message.field.add(name=name, number=number,
                              label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
    if kind in TYPES:
        field.type = TYPES[kind]
    else:
        field.type = F.TYPE_ENUM if kind in ENUMS else F.TYPE_MESSAGE
        field.type_name = f".caffe.{kind}"
    if default is not None:
        field.default_value = default
    if repeated == "packed":
        field.options.packed = True


@cache
def messages() -> dict[str, type]:
    """The message classes, by name (NetParameter, BlobProto, ...)."""
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file())
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{name}"))
            for name in MESSAGES}


def parse_prototxt(text: str):
    net = messages()["NetParameter"]()
    text_format.Parse(text, net, allow_unknown_field=True)
    return net


def parse_binary(data: bytes, kind: str = "NetParameter"):
    message = messages()[kind]()
    message.ParseFromString(data)
    return message
