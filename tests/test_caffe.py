"""Caffe nets without Caffe: prototxt (both formats) + caffemodel written here with random
weights, against the same nets built by hand in PyTorch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from corpus import photo_paths

import imgfeat
from imgfeat.errors import UsageError
from imgfeat.models import load_model
from imgfeat.models.caffe.schema import messages

torch.manual_seed(5)
SIZE = 67  # odd: pooling with kernel 2, stride 2 rounds 67 -> 34 (ceil), not 33 (floor)

VGG_LAYERS = [  # name, type, V1 type, bottom, top, params (text)
    ("conv1_1", "Convolution", "CONVOLUTION", "data", "conv1_1",
     "convolution_param { num_output: 8 pad: 1 kernel_size: 3 }"),
    ("relu1_1", "ReLU", "RELU", "conv1_1", "conv1_1", ""),
    ("norm1", "LRN", "LRN", "conv1_1", "norm1",
     "lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 }"),
    ("pool1", "Pooling", "POOLING", "norm1", "pool1",
     "pooling_param { pool: MAX kernel_size: 2 stride: 2 }"),
    ("conv2", "Convolution", "CONVOLUTION", "pool1", "conv2",
     "convolution_param { num_output: 16 pad: 1 kernel_size: 3 group: 2 }"),
    ("relu2", "ReLU", "RELU", "conv2", "conv2", ""),
    ("pool5", "Pooling", "POOLING", "conv2", "pool5",
     "pooling_param { pool: MAX kernel_size: 3 stride: 2 }"),
    ("fc6", "InnerProduct", "INNER_PRODUCT", "pool5", "fc6",
     "inner_product_param { num_output: 32 }"),
    ("relu6", "ReLU", "RELU", "fc6", "fc6", ""),
    ("drop6", "Dropout", "DROPOUT", "fc6", "fc6", "dropout_param { dropout_ratio: 0.5 }"),
    ("fc7", "InnerProduct", "INNER_PRODUCT", "fc6", "fc7",
     "inner_product_param { num_output: 32 }"),
    ("relu7", "ReLU", "RELU", "fc7", "fc7", ""),
    ("drop7", "Dropout", "DROPOUT", "fc7", "fc7", "dropout_param { dropout_ratio: 0.5 }"),
    ("fc8", "InnerProduct", "INNER_PRODUCT", "fc7", "fc8",
     "inner_product_param { num_output: 10 }"),
    ("prob", "Softmax", "SOFTMAX", "fc8", "prob", ""),
]


def vgg_prototxt(v1: bool) -> str:
    if v1:
        head = 'name: "tiny_vgg"\ninput: "data"\n' + "".join(
            f"input_dim: {d}\n" for d in (1, 3, SIZE, SIZE))
        body = "".join(f'layers {{ bottom: "{b}" top: "{t}" name: "{n}" type: {v} {p} '
                       f'blobs_lr: 1 }}\n' for n, _, v, b, t, p in VGG_LAYERS)
    else:
        head = ('name: "tiny_vgg"\nlayer { name: "data" type: "Input" top: "data" '
                f'input_param {{ shape {{ dim: 1 dim: 3 dim: {SIZE} dim: {SIZE} }} }} }}\n')
        body = "".join(f'layer {{ name: "{n}" type: "{k}" bottom: "{b}" top: "{t}" {p} '
                       f'param {{ lr_mult: 1 }} }}\n' for n, k, _, b, t, p in VGG_LAYERS)
    return head + body


def vgg_weights() -> dict[str, list[torch.Tensor]]:
    pool5 = 16 * 17 * 17  # pool1 34 x 34 -> pool5 ceil((34 - 3) / 2) + 1 = 17
    return {
        "conv1_1": [torch.randn(8, 3, 3, 3) * 0.3, torch.randn(8) * 0.1],
        "conv2": [torch.randn(16, 4, 3, 3) * 0.3, torch.randn(16) * 0.1],
        "fc6": [torch.randn(32, pool5) * 0.02, torch.randn(32) * 0.1],
        "fc7": [torch.randn(32, 32) * 0.2, torch.randn(32) * 0.1],
        "fc8": [torch.randn(10, 32) * 0.2, torch.randn(10) * 0.1],
    }


def write_caffemodel(path, weights: dict, v1: bool, legacy_dims: bool = False) -> None:
    net = messages()["NetParameter"](name="tiny")
    for name, tensors in weights.items():
        layer = (net.layers if v1 else net.layer).add(name=name)
        for tensor in tensors:
            blob = layer.blobs.add()
            if legacy_dims:  # old caffemodels: num, channels, height, width
                dims = [1] * (4 - tensor.ndim) + list(tensor.shape)
                blob.num, blob.channels, blob.height, blob.width = dims
            else:
                blob.shape.dim.extend(tensor.shape)
            blob.data.extend(tensor.reshape(-1).tolist())
    path.write_bytes(net.SerializeToString())


def vgg_by_hand(x: torch.Tensor, w) -> dict[str, torch.Tensor]:
    x = F.relu(F.conv2d(x, *w["conv1_1"], padding=1))
    x = torch.nn.LocalResponseNorm(5, alpha=0.0001, beta=0.75, k=1.0)(x)
    x = torch.nn.MaxPool2d(2, 2, ceil_mode=True)(x)
    assert x.shape[-1] == 34  # ceil rounding
    x = F.relu(F.conv2d(x, *w["conv2"], padding=1, groups=2))
    pool5 = torch.nn.MaxPool2d(3, 2, ceil_mode=True)(x)
    fc6 = F.relu(F.linear(pool5.flatten(1), *w["fc6"]))
    fc7 = F.relu(F.linear(fc6, *w["fc7"]))
    return {"pool5": pool5, "fc7": fc7, "prob": F.softmax(F.linear(fc7, *w["fc8"]), 1)}


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    folder = tmp_path_factory.mktemp("caffe")
    weights = vgg_weights()
    for v1 in (False, True):
        tag = "v1" if v1 else "v2"
        (folder / f"{tag}.prototxt").write_text(vgg_prototxt(v1))
        write_caffemodel(folder / f"{tag}.caffemodel", weights, v1, legacy_dims=v1)
    return folder, weights


def run_net(prototxt, caffemodel, layers, x):
    model = load_model(str(prototxt), str(caffemodel))
    with torch.inference_mode():
        return model.make_tap(layers, torch.device("cpu"))(x)


@pytest.mark.parametrize("tag", ["v2", "v1"])
def test_vgg_style_net_matches_the_hand_built_one(vgg, tag):
    folder, weights = vgg
    x = torch.randn(2, 3, SIZE, SIZE) * 50
    got = run_net(folder / f"{tag}.prototxt", folder / f"{tag}.caffemodel",
                  ["fc7", "pool5", "prob"], x)
    expected = vgg_by_hand(x, weights)
    assert got["pool5"].shape == (2, 16, 17, 17)
    for blob in ("pool5", "fc7", "prob"):
        torch.testing.assert_close(got[blob], expected[blob], rtol=1e-4, atol=1e-4)


def test_default_layer_is_what_the_last_fc_reads(vgg):
    folder, _ = vgg
    model = load_model(str(folder / "v2.prototxt"), str(folder / "v2.caffemodel"))
    assert model.default_layer == "fc7"
    assert {"conv1_1", "pool5", "fc7", "relu7", "prob"} <= set(model.layer_names)


RESNET = """
input: "data" input_shape { dim: 1 dim: 3 dim: 9 dim: 9 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1"
        batch_norm_param { use_global_stats: true eps: 0.001 } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1"
        scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 1 } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" }
layer { name: "scale2" type: "Scale" bottom: "conv2" top: "conv2"
        scale_param { bias_term: true } }
layer { name: "sum" type: "Eltwise" bottom: "conv1" bottom: "conv2" top: "sum"
        eltwise_param { operation: SUM coeff: 1 coeff: 0.5 } }
layer { name: "out" type: "ReLU" bottom: "sum" top: "sum" }
"""


def test_resnet_block_with_batchnorm_scale_and_eltwise(tmp_path):
    w = {"conv1": [torch.randn(4, 3, 3, 3)],
         "bn1": [torch.randn(4) * 5, torch.rand(4) * 10 + 1, torch.tensor([5.0])],
         "scale1": [torch.rand(4) + 0.5, torch.randn(4)],
         "conv2": [torch.randn(4, 4, 3, 3), torch.randn(4)],
         "bn2": [torch.randn(4) * 5, torch.rand(4) * 10 + 1, torch.tensor([2.0])],
         "scale2": [torch.rand(4) + 0.5, torch.randn(4)]}
    (tmp_path / "res.prototxt").write_text(RESNET)
    write_caffemodel(tmp_path / "res.caffemodel", w, v1=False)
    x = torch.randn(2, 3, 9, 9)

    def bn(v, blobs, eps):
        mean, var = blobs[0] / blobs[2], blobs[1] / blobs[2]
        return (v - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + eps)

    def scale(v, blobs):
        return v * blobs[0].view(1, -1, 1, 1) + blobs[1].view(1, -1, 1, 1)

    a = F.relu(scale(bn(F.conv2d(x, w["conv1"][0], padding=1), w["bn1"], 1e-3), w["scale1"]))
    b = scale(bn(F.conv2d(a, *w["conv2"], padding=1), w["bn2"], 1e-5), w["scale2"])
    got = run_net(tmp_path / "res.prototxt", tmp_path / "res.caffemodel", ["sum"], x)
    torch.testing.assert_close(got["sum"], F.relu(a + 0.5 * b), rtol=1e-4, atol=1e-4)


MISC = """
input: "data" input_dim: 1 input_dim: 3 input_dim: 6 input_dim: 6
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "split" type: "Split" bottom: "conv" top: "a" top: "b" }
layer { name: "prelu" type: "PReLU" bottom: "a" top: "p" }
layer { name: "sig" type: "Sigmoid" bottom: "b" top: "s" }
layer { name: "tanh" type: "TanH" bottom: "b" top: "t" }
layer { name: "prod" type: "Eltwise" bottom: "p" bottom: "s" top: "prod"
        eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "prod" bottom: "t" top: "max"
        eltwise_param { operation: MAX } }
layer { name: "cat" type: "Concat" bottom: "max" bottom: "p" top: "cat" }
layer { name: "ave" type: "Pooling" bottom: "cat" top: "ave"
        pooling_param { pool: AVE kernel_size: 4 stride: 4 pad: 1 } }
layer { name: "leaky" type: "ReLU" bottom: "ave" top: "leaky" relu_param { negative_slope: 0.1 } }
layer { name: "flat" type: "Flatten" bottom: "leaky" top: "flat" }
layer { name: "shape" type: "Reshape" bottom: "flat" top: "shape"
        reshape_param { shape { dim: 0 dim: -1 dim: 2 } } }
layer { name: "soft" type: "Softmax" bottom: "shape" top: "soft" softmax_param { axis: 2 } }
"""


def test_remaining_layer_types(tmp_path):
    w = {"conv": [torch.randn(4, 3, 1, 1), torch.randn(4)], "prelu": [torch.rand(4)]}
    (tmp_path / "misc.prototxt").write_text(MISC)
    write_caffemodel(tmp_path / "misc.caffemodel", w, v1=False)
    x = torch.randn(2, 3, 6, 6)
    conv = F.conv2d(x, *w["conv"])
    p = F.prelu(conv, w["prelu"][0])
    mx = torch.maximum(p * torch.sigmoid(conv), torch.tanh(conv))
    ave = F.avg_pool2d(torch.cat([mx, p], 1), 4, 4, 1, ceil_mode=True, count_include_pad=True)
    flat = F.leaky_relu(ave, 0.1).flatten(1)
    expected = F.softmax(flat.reshape(2, -1, 2), dim=2)
    got = run_net(tmp_path / "misc.prototxt", tmp_path / "misc.caffemodel", ["soft"], x)
    torch.testing.assert_close(got["soft"], expected, rtol=1e-5, atol=1e-6)


def test_unsupported_layer_is_named_with_its_type(tmp_path):
    (tmp_path / "bad.prototxt").write_text(
        'input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n'
        'layer { name: "up" type: "Deconvolution" bottom: "data" top: "up" }\n')
    with pytest.raises(UsageError, match="layer 'up' has type 'Deconvolution'"):
        load_model(str(tmp_path / "bad.prototxt"), "random")


def test_bad_files_are_one_clear_error(tmp_path, vgg):
    (tmp_path / "broken.prototxt").write_text("layer { name: ")
    with pytest.raises(UsageError, match="not a valid Caffe prototxt"):
        load_model(str(tmp_path / "broken.prototxt"), "random")
    (tmp_path / "w.caffemodel").write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(UsageError, match="not a valid Caffe caffemodel"):
        load_model(str(vgg[0] / "v2.prototxt"), str(tmp_path / "w.caffemodel"))
    with pytest.raises(UsageError, match="needs its weights"):
        load_model(str(vgg[0] / "v2.prototxt"), "pretrained")


def test_extract_runs_a_caffe_net_with_caffe_preprocessing(vgg, tmp_path):
    from imgfeat.models.caffe import caffe_preprocess
    from imgfeat.pipeline.cpu_decode import decode

    folder, weights = vgg
    photos = photo_paths()[:3]
    store = imgfeat.extract([str(p) for p in photos], tmp_path / "out",
                            model=str(folder / "v1.prototxt"),
                            weights=str(folder / "v1.caffemodel"), layer=["fc7", "pool5"],
                            pool="none", dtype="float32", progress="none", devices="cpu:1",
                            precision="fp32")  # against an fp32 reference
    assert store.layers == ["fc7", "pool5"]
    preprocess = caffe_preprocess((SIZE, SIZE))
    rgb = np.stack([preprocess.geometry(decode(p.read_bytes(), min_side=preprocess.draft_side))
                    for p in photos]).astype(np.float32)
    bgr = torch.from_numpy(rgb[..., ::-1].copy()).permute(0, 3, 1, 2)
    mean = torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    expected = vgg_by_hand(bgr - mean, weights)
    np.testing.assert_allclose(np.asarray(store.features("fc7")), expected["fc7"].numpy(),
                               rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.asarray(store.features("pool5")),
                               expected["pool5"].numpy(), rtol=1e-3, atol=1e-3)


def test_mean_file_and_input_scale(vgg, tmp_path):
    from imgfeat.models.caffe import caffe_preprocess
    from imgfeat.pipeline.cpu_decode import decode

    folder, weights = vgg
    means = (90.0, 100.0, 110.0)  # B, G, R
    blob = messages()["BlobProto"]()
    blob.shape.dim.extend([1, 3, 4, 4])
    blob.data.extend(np.repeat(means, 16).tolist())
    (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())
    photo = photo_paths()[0]
    store = imgfeat.extract([str(photo)], tmp_path / "out", model=str(folder / "v2.prototxt"),
                            weights=str(folder / "v2.caffemodel"), layer="fc7",
                            mean_file=str(tmp_path / "mean.binaryproto"), input_scale=0.5,
                            dtype="float32", progress="none", devices="cpu:1",
                            precision="fp32")
    preprocess = caffe_preprocess((SIZE, SIZE))
    rgb = preprocess.geometry(decode(photo.read_bytes(), min_side=preprocess.draft_side))
    bgr = torch.from_numpy(rgb[None, ..., ::-1].astype(np.float32).copy()).permute(0, 3, 1, 2)
    x = (bgr - torch.tensor(means).view(1, 3, 1, 1)) * 0.5
    np.testing.assert_allclose(np.asarray(store.features()), vgg_by_hand(x, weights)["fc7"],
                               rtol=1e-3, atol=1e-3)
