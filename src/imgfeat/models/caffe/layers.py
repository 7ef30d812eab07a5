"""Caffe layer types as PyTorch modules, each with Caffe's exact semantics (pooling's ceil
rounding, BatchNorm's scale factor blob, LRN across channels, ...). A layer takes the list of
its bottom tensors and returns the list of its tops; a layer with parameters reads them from
its `Blobs` (the caffemodel's, or initial values when there is none)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imgfeat.errors import UsageError
from imgfeat.models.caffe.blobs import Blobs


def _pair(values, single_h, single_w, default: int) -> tuple[int, int]:
    """A Caffe size given as a repeated value, or as *_h / *_w, or not at all."""
    if single_h or single_w:
        return int(single_h), int(single_w)
    values = list(values) if isinstance(values, (list, tuple)) or hasattr(values, "__len__") \
        else [values]
    if not values:
        return default, default
    return (int(values[0]), int(values[-1]))


class Layer(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.layer_name = name

    def param(self, tensor: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(tensor, requires_grad=False)


class Convolution(Layer):
    def __init__(self, name, p, blobs: Blobs, in_channels: int):
        super().__init__(name)
        self.kernel = _pair(p.kernel_size, p.kernel_h, p.kernel_w, 1)
        self.stride = _pair(p.stride, p.stride_h, p.stride_w, 1)
        self.padding = _pair(p.pad, p.pad_h, p.pad_w, 0)
        self.dilation = _pair(p.dilation, 0, 0, 1)
        self.groups = int(p.group)
        shape = (int(p.num_output), in_channels // self.groups, *self.kernel)
        self.weight = self.param(blobs.get(0, shape))
        self.bias = self.param(blobs.get(1, (shape[0],), fill=0)) if p.bias_term else None

    def forward(self, bottoms):
        return [F.conv2d(bottoms[0], self.weight, self.bias, self.stride, self.padding,
                         self.dilation, self.groups)]


class Pooling(Layer):
    """MAX or AVE; Caffe rounds the output size up (ceil) unless round_mode is FLOOR, and
    averages over the window clipped to the padded input, as PyTorch's ceil_mode does."""

    def __init__(self, name, p):
        super().__init__(name)
        if p.pool not in (0, 1):
            raise UsageError(f"Caffe layer {name!r}: only MAX and AVE pooling are supported")
        self.max = p.pool == 0
        self.global_pool = p.global_pooling
        self.kernel = _pair(p.kernel_size or [], p.kernel_h, p.kernel_w, 1)
        self.stride = _pair(p.stride, p.stride_h, p.stride_w, 1)
        self.padding = _pair(p.pad, p.pad_h, p.pad_w, 0)
        self.ceil = p.round_mode == 0

    def forward(self, bottoms):
        x = bottoms[0]
        if self.global_pool:
            return [x.amax((2, 3), keepdim=True) if self.max else x.mean((2, 3), keepdim=True)]
        if self.max:
            return [F.max_pool2d(x, self.kernel, self.stride, self.padding,
                                 ceil_mode=self.ceil)]
        return [F.avg_pool2d(x, self.kernel, self.stride, self.padding, ceil_mode=self.ceil,
                             count_include_pad=True)]


class ReLU(Layer):
    def __init__(self, name, p):
        super().__init__(name)
        self.slope = float(p.negative_slope)

    def forward(self, bottoms):
        x = bottoms[0]
        return [F.leaky_relu(x, self.slope) if self.slope else F.relu(x)]


class PReLU(Layer):
    def __init__(self, name, p, blobs: Blobs, channels: int):
        super().__init__(name)
        self.weight = self.param(blobs.get(0, (1 if p.channel_shared else channels,),
                                           fill=0.25))

    def forward(self, bottoms):
        return [F.prelu(bottoms[0], self.weight)]


class LRN(Layer):
    def __init__(self, name, p):
        super().__init__(name)
        if p.norm_region != 0:
            raise UsageError(f"Caffe layer {name!r}: LRN is supported across channels only")
        self.size, self.alpha, self.beta, self.k = int(p.local_size), p.alpha, p.beta, p.k

    def forward(self, bottoms):
        return [F.local_response_norm(bottoms[0], self.size, self.alpha, self.beta, self.k)]


class InnerProduct(Layer):
    def __init__(self, name, p, blobs: Blobs, in_features: int):
        super().__init__(name)
        self.axis = int(p.axis)
        out = int(p.num_output)
        shape = (in_features, out) if p.transpose else (out, in_features)
        weight = blobs.get(0, shape, fan_in=in_features)
        self.weight = self.param(weight.t().contiguous() if p.transpose else weight)
        self.bias = self.param(blobs.get(1, (out,), fill=0)) if p.bias_term else None

    def forward(self, bottoms):
        return [F.linear(bottoms[0].flatten(self.axis), self.weight, self.bias)]


class Elementwise(Layer):
    """Layers with no parameters: a function of the bottoms."""

    def __init__(self, name, function, tops: int = 1):
        super().__init__(name)
        self.function, self.tops = function, tops

    def forward(self, bottoms):
        result = self.function(*bottoms)
        return list(result) if isinstance(result, (list, tuple)) else [result] * self.tops


class BatchNorm(Layer):
    """Caffe keeps mean and variance times a scale factor (the third blob)."""

    def __init__(self, name, p, blobs: Blobs, channels: int):
        super().__init__(name)
        factor = float(blobs.get(2, (1,))[0]) if blobs.has(2) else 1.0
        factor = 0.0 if factor == 0 else 1.0 / factor
        mean = blobs.get(0, (channels,), fill=0) * factor
        var = blobs.get(1, (channels,), fill=1) * factor
        self.mean, self.var = self.param(mean), self.param(var)
        self.eps = float(p.eps)

    def forward(self, bottoms):
        x = bottoms[0]
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return [(x - self.mean.view(shape)) / torch.sqrt(self.var.view(shape) + self.eps)]


class Scale(Layer):
    """x * scale (+ bias), the scale a blob over x's axes [axis, axis + num_axes), or the
    second bottom (whose bias, if any, is then the layer's first blob), broadcast from `axis`.
    `Bias` is the same with addition. Untrained, the scale is 1 and the bias 0."""

    def __init__(self, name, p, blobs: Blobs, shapes: list[tuple[int, ...]],
                 add: bool = False, bias: bool = False):
        super().__init__(name)
        self.add, x_shape = add, shapes[0]
        if len(shapes) > 1:
            param_shape, self.value, bias_index = shapes[1], None, 0
        else:
            num_axes = int(p.num_axes)
            axis = int(p.axis) % len(x_shape)
            end = len(x_shape) if num_axes == -1 else axis + num_axes
            param_shape, bias_index = tuple(x_shape[axis:end]), 1
            self.value = self.param(blobs.get(0, param_shape, fill=0 if add else 1))
        # a scalar scale broadcasts from axis 0, as in Caffe
        self.axis = int(p.axis) % len(x_shape) if param_shape else 0
        self.trailing = len(x_shape) - self.axis - len(param_shape)
        self.bias = self.param(blobs.get(bias_index, param_shape, fill=0)) if bias else None

    def _shaped(self, value):
        return value.reshape((1,) * self.axis + tuple(value.shape) + (1,) * self.trailing)

    def forward(self, bottoms):
        x = bottoms[0]
        value = self._shaped(bottoms[1] if len(bottoms) > 1 else self.value)
        y = x + value if self.add else x * value
        if self.bias is not None:
            y = y + self._shaped(self.bias)
        return [y]


def eltwise(name, p, count: int) -> Elementwise:
    coeffs = list(p.coeff) or [1.0] * count
    if len(coeffs) != count:
        raise UsageError(f"Caffe layer {name!r}: {len(coeffs)} coefficients for {count} inputs")
    if p.operation == 1:
        return Elementwise(name, lambda *xs: sum(c * x for c, x in zip(coeffs, xs)))
    if p.operation == 0:
        return Elementwise(name, lambda *xs: math.prod(xs[1:], start=xs[0]))
    return Elementwise(name, lambda *xs: torch.stack(xs).amax(0))


def reshape(name, p) -> Elementwise:
    dims = list(p.shape.dim)
    axis, num_axes = int(p.axis), int(p.num_axes)

    def apply(x):
        shape = list(x.shape)
        start = axis % (len(shape) + 1) if axis < 0 else axis
        end = len(shape) if num_axes == -1 else start + num_axes
        middle = [shape[start + i] if d == 0 else int(d) for i, d in enumerate(dims)]
        return x.reshape(shape[:start] + middle + shape[end:])

    return Elementwise(name, apply)
