"""Caffe nets written by the tests: prototxt text (the new `layer {}` format or the old V1
`layers {}` one) and a caffemodel of random weights, built layer by layer so that each layer's
blob shapes follow from the channels of its bottoms, as in Caffe."""

from __future__ import annotations

from pathlib import Path

import torch

from imgfeat.models.caffe.schema import messages

V1_TYPES = {"Convolution": "CONVOLUTION", "Pooling": "POOLING", "ReLU": "RELU", "LRN": "LRN",
            "InnerProduct": "INNER_PRODUCT", "Dropout": "DROPOUT", "Softmax": "SOFTMAX",
            "Concat": "CONCAT", "Eltwise": "ELTWISE", "Sigmoid": "SIGMOID"}

# The VGG-like net's input size, odd: pooling with kernel 2, stride 2 rounds 67 -> 34 (ceil),
# not 33 (floor).
SIZE = 67

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
    """{layer: [tensors]} as a binary NetParameter, as Caffe saves a trained net."""
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


class NetWriter:
    """Add layers in order; `prototxt()` and `save()` write the net and its random weights."""

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.layers: list[tuple[str, str, list[str], list[str], str]] = []
        self.weights: dict[str, list[torch.Tensor]] = {}
        self.channels = {"data": 3}
        self._random = torch.Generator().manual_seed(seed)

    def _randn(self, *shape, std: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, generator=self._random) * std

    def _rand(self, *shape, low: float, high: float) -> torch.Tensor:
        return low + torch.rand(shape, generator=self._random) * (high - low)

    def add(self, name, kind, bottoms, tops, params: str = "", channels: int | None = None):
        bottoms = [bottoms] if isinstance(bottoms, str) else bottoms
        tops = [tops] if isinstance(tops, str) else tops
        self.layers.append((name, kind, bottoms, tops, params))
        for top in tops:
            self.channels[top] = channels if channels is not None else self.channels[bottoms[0]]
        return tops[0]

    def conv(self, name, bottom, out, kernel, stride=1, pad=0, group=1, top=None,
             bias=True) -> str:
        fan_in = self.channels[bottom] // group * kernel * kernel
        self.weights[name] = [self._randn(out, self.channels[bottom] // group, kernel, kernel,
                                          std=fan_in ** -0.5)]
        if bias:
            self.weights[name].append(self._randn(out, std=0.1))
        params = (f"convolution_param {{ num_output: {out} kernel_size: {kernel} "
                  f"stride: {stride} pad: {pad} group: {group} "
                  f"bias_term: {str(bias).lower()} }}")
        return self.add(name, "Convolution", bottom, top or name, params, out)

    def bn_scale(self, name, blob) -> str:
        """BatchNorm with a scale factor, then Scale with a bias, both in place (ResNet)."""
        c = self.channels[blob]
        self.weights["bn_" + name] = [self._randn(c, std=2.0) * 3, self._rand(c, low=0.5,
                                      high=3.0) * 3, torch.tensor([3.0])]
        self.weights["scale_" + name] = [self._rand(c, low=0.5, high=1.5), self._randn(c)]
        self.add("bn_" + name, "BatchNorm", blob, blob,
                 "batch_norm_param { use_global_stats: true eps: 0.001 }")
        return self.add("scale_" + name, "Scale", blob, blob, "scale_param { bias_term: true }")

    def relu(self, name, blob, slope: float = 0.0) -> str:
        return self.add(name, "ReLU", blob, blob,
                        f"relu_param {{ negative_slope: {slope} }}" if slope else "")

    def pool(self, name, bottom, kind="MAX", kernel=3, stride=2, pad=0, top=None,
             global_pool=False) -> str:
        shape = "global_pooling: true" if global_pool else \
            f"kernel_size: {kernel} stride: {stride} pad: {pad}"
        return self.add(name, "Pooling", bottom, top or name,
                        f"pooling_param {{ pool: {kind} {shape} }}")

    def lrn(self, name, bottom, top=None) -> str:
        return self.add(name, "LRN", bottom, top or name,
                        "lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 }")

    def concat(self, name, bottoms, top=None) -> str:
        return self.add(name, "Concat", bottoms, top or name,
                        channels=sum(self.channels[b] for b in bottoms))

    def fc(self, name, bottom, out, top=None) -> str:
        width = self.channels[bottom]
        self.weights[name] = [self._randn(out, width, std=width ** -0.5),
                              self._randn(out, std=0.1)]
        return self.add(name, "InnerProduct", bottom, top or name,
                        f"inner_product_param {{ num_output: {out} }}", out)

    def prototxt(self, v1: bool = False) -> str:
        dims = (1, 3, self.size, self.size)
        if v1:
            head = 'name: "net"\ninput: "data"\n' + "".join(f"input_dim: {d}\n" for d in dims)
        else:
            head = ('name: "net"\nlayer { name: "data" type: "Input" top: "data" '
                    'input_param { shape { ' + " ".join(f"dim: {d}" for d in dims) + " } } }\n")
        return head + "".join(self._layer(layer, v1) for layer in self.layers)

    def _layer(self, layer, v1: bool) -> str:
        name, kind, bottoms, tops, params = layer
        wires = "".join(f' bottom: "{b}"' for b in bottoms) + \
            "".join(f' top: "{t}"' for t in tops)
        kind = V1_TYPES[kind] if v1 else f'"{kind}"'
        return f'{"layers" if v1 else "layer"} {{ name: "{name}" type: {kind}{wires} {params} }}\n'

    def save(self, folder: Path, stem: str, v1: bool = False) -> tuple[Path, Path]:
        """(prototxt, caffemodel) under `folder`."""
        prototxt, caffemodel = folder / f"{stem}.prototxt", folder / f"{stem}.caffemodel"
        prototxt.write_text(self.prototxt(v1), encoding="utf-8")
        write_caffemodel(caffemodel, self.weights, v1, legacy_dims=v1)
        return prototxt, caffemodel

    def blobs(self) -> list[str]:
        """Every blob a layer writes, each once, in order."""
        return list(dict.fromkeys(t for _, _, _, tops, _ in self.layers for t in tops))

    def last_writer(self, blob: str) -> str:
        """The layer whose output is the blob's final value (in-place layers included)."""
        return [name for name, _, _, tops, _ in self.layers if blob in tops][-1]


def inception(size: int = 40, names: dict[str, str] | None = None) -> NetWriter:
    """GoogLeNet's pattern: stem with LRN, two inception modules (Concat of 1x1, 3x3, 5x5 and
    pool-projection branches), global average pool, classifier. Names hold '/' as GoogLeNet's
    do; `names` renames blobs (a name may hold anything)."""
    n = {"out_a": "inception_3a/output", "out_b": "inception_3b/output",
         "pool": "pool5/7x7_s1", "prob": "prob", **(names or {})}
    net = NetWriter(size, seed=1)
    x = net.relu("conv1/relu_7x7", net.conv("conv1/7x7_s2", "data", 8, 7, 2, 3))
    x = net.lrn("pool1/norm1", net.pool("pool1/3x3_s2", x))
    x = net.relu("conv2/relu_3x3", net.conv("conv2/3x3", x, 12, 3, pad=1))
    x = net.pool("pool2/3x3_s2", net.lrn("conv2/norm2", x))
    for key, tag in (("out_a", "3a"), ("out_b", "3b")):
        x = _module(net, f"inception_{tag}", x, n[key])
    x = net.pool("pool5", x, "AVE", global_pool=True, top=n["pool"])
    x = net.add("pool5/drop_7x7_s1", "Dropout", x, x, "dropout_param { dropout_ratio: 0.4 }")
    net.add("prob", "Softmax", net.fc("loss3/classifier", x, 10), n["prob"])
    return net


def _module(net: NetWriter, tag: str, x: str, output: str) -> str:
    one = net.relu(f"{tag}/relu_1x1", net.conv(f"{tag}/1x1", x, 4, 1))
    three = net.relu(f"{tag}/relu_3x3_reduce", net.conv(f"{tag}/3x3_reduce", x, 4, 1))
    three = net.relu(f"{tag}/relu_3x3", net.conv(f"{tag}/3x3", three, 6, 3, pad=1))
    five = net.relu(f"{tag}/relu_5x5_reduce", net.conv(f"{tag}/5x5_reduce", x, 2, 1))
    five = net.relu(f"{tag}/relu_5x5", net.conv(f"{tag}/5x5", five, 3, 5, pad=2))
    pool = net.pool(f"{tag}/pool", x, kernel=3, stride=1, pad=1)
    pool = net.relu(f"{tag}/relu_pool_proj", net.conv(f"{tag}/pool_proj", pool, 3, 1))
    return net.concat(f"{tag}/output", [one, three, five, pool], top=output)


def resnet(size: int = 33) -> NetWriter:
    """ResNet-50's pattern: BatchNorm + Scale after every convolution, bottleneck blocks with a
    projection and an identity shortcut (Eltwise SUM), ceil-mode pooling, a squeeze-excitation
    Scale whose scale is its second bottom, a PReLU, and an Eltwise MAX and PROD."""
    net = NetWriter(size, seed=2)
    x = net.conv("conv1", "data", 8, 7, 2, 3, bias=False)
    x = net.relu("conv1_relu", net.bn_scale("conv1", x))
    x = net.pool("pool1", x)
    x = _bottleneck(net, "res2a", x, 16, project=True)
    x = _bottleneck(net, "res2b", x, 16, project=False)
    squeeze = net.pool("res2b_pool", x, "AVE", global_pool=True)
    excite = net.add("res2b_excite", "Sigmoid", net.fc("res2b_fc", squeeze, 16),
                     "res2b_excite")
    x = net.add("res2b_se", "Scale", [x, excite], "res2b_se", "scale_param { axis: 0 }")
    net.weights["res2b_prelu"] = [net._rand(16, low=0.1, high=0.4)]
    x = net.add("res2b_prelu", "PReLU", x, "res2b_prelu")
    pooled = net.pool("pool5", x, "AVE", global_pool=True)
    peak = net.pool("pool5_max", x, "MAX", global_pool=True)
    x = net.add("pool5_both", "Eltwise", [pooled, peak], "pool5_both",
                "eltwise_param { operation: MAX }")
    x = net.add("pool5_prod", "Eltwise", [x, pooled], "pool5_prod",
                "eltwise_param { operation: PROD }")
    net.add("prob", "Softmax", net.fc("fc10", x, 10), "prob")
    return net


def _bottleneck(net: NetWriter, tag: str, x: str, out: int, project: bool) -> str:
    shortcut = x
    if project:
        shortcut = net.bn_scale(f"{tag}_branch1",
                                net.conv(f"{tag}_branch1", x, out, 1, bias=False))
    y = x
    for part, (width, kernel, pad) in zip("abc", ((out // 4, 1, 0), (out // 4, 3, 1),
                                                   (out, 1, 0))):
        name = f"{tag}_branch2{part}"
        y = net.bn_scale(name, net.conv(name, y, width, kernel, pad=pad, bias=False))
        if part != "c":
            y = net.relu(f"{name}_relu", y)
    summed = net.add(tag, "Eltwise", [shortcut, y], tag,
                     "eltwise_param { operation: SUM coeff: 1 coeff: 0.5 }")
    return net.relu(f"{tag}_relu", summed)


def mobilenet(size: int = 32) -> NetWriter:
    """MobileNet's pattern: depthwise 3x3 (group = channels) and pointwise 1x1 convolutions,
    each followed by BatchNorm + Scale + ReLU, names with '/' (conv2_1/dw), global pool, fc."""
    net = NetWriter(size, seed=3)
    x = net.conv("conv1", "data", 8, 3, 2, 1, bias=False)
    x = net.relu("relu1", net.bn_scale("conv1", x))
    for tag, out, stride in (("conv2_1", 16, 1), ("conv2_2", 24, 2)):
        channels = net.channels[x]
        x = net.conv(f"{tag}/dw", x, channels, 3, stride, 1, group=channels, bias=False)
        x = net.relu(f"relu{tag[4:]}/dw", net.bn_scale(f"{tag}/dw", x))
        x = net.conv(f"{tag}/sep", x, out, 1, bias=False)
        x = net.relu(f"relu{tag[4:]}/sep", net.bn_scale(f"{tag}/sep", x))
    x = net.pool("pool6", x, "AVE", global_pool=True)
    net.add("prob", "Softmax", net.fc("fc7", x, 10), "prob")
    return net
