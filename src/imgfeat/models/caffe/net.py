"""A Caffe net (deploy prototxt + optional caffemodel) as a PyTorch module.

Layers are built in order while a blank input runs through them, so every layer knows the
shapes of its bottoms (Caffe infers channels and fan-in the same way). The net runs blob by
blob, and can stop as soon as the blobs asked for are final: a blob's value is the one left by
the last layer that writes it (in-place ReLU and Dropout included), as `net.blobs` in Caffe.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imgfeat.errors import UsageError
from imgfeat.models.caffe import layers as L
from imgfeat.models.caffe.blobs import Blobs

V1_TYPES = {"CONVOLUTION": "Convolution", "POOLING": "Pooling", "RELU": "ReLU", "LRN": "LRN",
            "INNER_PRODUCT": "InnerProduct", "DROPOUT": "Dropout", "SOFTMAX": "Softmax",
            "CONCAT": "Concat", "ELTWISE": "Eltwise", "FLATTEN": "Flatten", "SPLIT": "Split",
            "SIGMOID": "Sigmoid", "TANH": "TanH"}
TEST = 1


class Spec:
    """One layer of either prototxt format, in a common form."""

    def __init__(self, layer, v1: bool):
        self.name = layer.name
        self.bottoms, self.tops = list(layer.bottom), list(layer.top)
        if v1:
            enum = layer.DESCRIPTOR.fields_by_name["type"].enum_type
            v1_name = enum.values_by_number[layer.type].name
            self.type = V1_TYPES.get(v1_name, v1_name)
        else:
            self.type = layer.type
        self.message = layer
        self.included = _included(layer)


def _included(layer) -> bool:
    """Caffe's NetStateRule in the TEST phase: any include rule, and no exclude rule."""
    def matches(rule):
        return not rule.HasField("phase") or rule.phase == TEST
    if layer.include and not any(matches(r) for r in layer.include):
        return False
    return not any(matches(r) for r in layer.exclude)


class CaffeNet(nn.Module):
    def __init__(self, net, weights=None):
        super().__init__()
        specs = [Spec(layer, False) for layer in net.layer] or \
            [Spec(layer, True) for layer in net.layers]
        specs = [s for s in specs if s.included]
        trained = _weights(weights) if weights is not None else None
        self.input_name, self.input_shape, specs = _input(net, specs)
        self.specs = [(s.name, s.bottoms, s.tops) for s in specs]
        self.steps = nn.ModuleList()
        values = {self.input_name: torch.zeros((1, *self.input_shape[1:]))}
        with torch.no_grad():
            for spec in specs:
                missing = [b for b in spec.bottoms if b not in values]
                if missing:
                    raise UsageError(f"Caffe layer {spec.name!r} reads blob {missing[0]!r}, "
                                     "which no earlier layer makes")
                blobs = Blobs(spec.name, None if trained is None else trained.get(spec.name, []))
                layer = _build(spec, [values[b] for b in spec.bottoms], blobs)
                self.steps.append(layer)
                values.update(zip(spec.tops, layer([values[b] for b in spec.bottoms])))
        self.last_writer = {}
        for index, (_, _, tops) in enumerate(self.specs):
            for top in tops:
                self.last_writer[top] = index
        self.layer_top = {name: tops[0] for name, _, tops in self.specs if tops}
        self.output = self.specs[-1][2][0] if self.specs else self.input_name

    def names(self) -> list[str]:
        """Blob names, then the layer names that are not also blob names."""
        blobs = list(dict.fromkeys(top for _, _, tops in self.specs for top in tops))
        return blobs + [name for name in self.layer_top if name not in self.last_writer]

    def run(self, x: torch.Tensor, wanted: list[str]) -> dict[str, torch.Tensor]:
        """The final value of each wanted blob, or a layer's top right after that layer."""
        stop = max(self._ready_after(name) for name in wanted)
        values, found = {self.input_name: x}, {}
        for index, ((_, bottoms, tops), layer) in enumerate(zip(self.specs, self.steps)):
            if index > stop:
                break
            values.update(zip(tops, layer([values[b] for b in bottoms])))
            for want in wanted:
                if self._ready_after(want) == index:
                    found[want] = values[self.layer_top.get(want, want)
                                         if want not in self.last_writer else want]
        return found

    def _ready_after(self, name: str) -> int:
        if name in self.last_writer:
            return self.last_writer[name]
        return next(i for i, (layer, _, _) in enumerate(self.specs) if layer == name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, [self.output])[self.output]


def _input(net, specs):
    """The single image input: declared by input/input_dim/input_shape, or an Input layer."""
    if net.input:
        if len(net.input) != 1:
            raise UsageError(f"the Caffe net has {len(net.input)} inputs; imgfeat feeds one")
        shape = list(net.input_shape[0].dim) if net.input_shape else list(net.input_dim[:4])
        return net.input[0], _check_shape(shape), specs
    inputs = [s for s in specs if s.type == "Input"]
    if len(inputs) != 1 or len(inputs[0].tops) != 1:
        raise UsageError("the Caffe net must declare one image input (input: / input_dim: or "
                         "one Input layer)")
    shapes = inputs[0].message.input_param.shape
    shape = list(shapes[0].dim) if shapes else []
    return inputs[0].tops[0], _check_shape(shape), [s for s in specs if s.type != "Input"]


def _check_shape(shape: list[int]) -> tuple[int, ...]:
    if len(shape) != 4 or shape[1] not in (1, 3):
        raise UsageError(f"the Caffe net's input shape {shape} is not N x 3 x H x W")
    return tuple(int(d) for d in shape)


def _weights(weights) -> dict[str, list]:
    layers = list(weights.layer) or list(weights.layers)
    return {layer.name: list(layer.blobs) for layer in layers if layer.blobs}


def _build(spec: Spec, bottoms: list[torch.Tensor], blobs: Blobs) -> nn.Module:
    name, kind, m = spec.name, spec.type, spec.message
    x = bottoms[0] if bottoms else None
    if kind == "Convolution":
        return L.Convolution(name, m.convolution_param, blobs, x.shape[1])
    if kind == "Pooling":
        return L.Pooling(name, m.pooling_param)
    if kind == "ReLU":
        return L.ReLU(name, m.relu_param)
    if kind == "PReLU":
        return L.PReLU(name, m.prelu_param, blobs, x.shape[1])
    if kind == "LRN":
        return L.LRN(name, m.lrn_param)
    if kind == "InnerProduct":
        axis = int(m.inner_product_param.axis) % x.ndim
        return L.InnerProduct(name, m.inner_product_param, blobs, math.prod(x.shape[axis:]))
    if kind == "BatchNorm":
        return L.BatchNorm(name, m.batch_norm_param, blobs, x.shape[1])
    if kind in ("Scale", "Bias"):
        p = m.scale_param if kind == "Scale" else m.bias_param
        bias = kind == "Scale" and p.bias_term
        return L.Scale(name, p, blobs, [tuple(b.shape) for b in bottoms], add=kind == "Bias",
                       bias=bias)
    if kind == "Eltwise":
        return L.eltwise(name, m.eltwise_param, len(bottoms))
    if kind == "Reshape":
        return L.reshape(name, m.reshape_param)
    return _simple(spec, kind, m)


def _simple(spec: Spec, kind: str, m) -> nn.Module:
    name, tops = spec.name, len(spec.tops)
    functions = {
        "Dropout": lambda x: x,
        "Sigmoid": torch.sigmoid,
        "TanH": torch.tanh,
        "Softmax": lambda x: F.softmax(x, dim=int(m.softmax_param.axis)),
        "Flatten": lambda x: x.flatten(int(m.flatten_param.axis),
                                       int(m.flatten_param.end_axis)),
        "Concat": lambda *xs: torch.cat(xs, dim=_concat_axis(m.concat_param)),
        "Split": lambda x: x,
    }
    if kind not in functions:
        raise UsageError(f"Caffe layer {name!r} has type {kind!r}, which imgfeat does not "
                         "run; supported: Convolution, Pooling, ReLU, PReLU, Sigmoid, TanH, "
                         "LRN, InnerProduct, Dropout, Softmax, Concat, Eltwise, BatchNorm, "
                         "Scale, Bias, Flatten, Split, Reshape")
    return L.Elementwise(name, functions[kind], tops)


def _concat_axis(p) -> int:
    return int(p.axis) if p.HasField("axis") or not p.HasField("concat_dim") \
        else int(p.concat_dim)
