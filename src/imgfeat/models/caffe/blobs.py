"""A Caffe layer's parameters: its blobs in the caffemodel, or, with no caffemodel
(`--weights random`, `imgfeat layers`), initial values, so that every layer with parameters
builds from the prototxt alone.

Initial values follow Caffe's default fillers where those keep a signal alive (scales 1,
biases and means 0, variances 1, PReLU slopes 0.25); weights are seeded random normals of
standard deviation 1/sqrt(fan-in), so that a deep random net neither vanishes nor overflows
float16 (Caffe's own default, all zeros, would make every feature 0).
"""

from __future__ import annotations

import math

import torch

from imgfeat.errors import UsageError


class Blobs:
    """`found`: the layer's blobs in the caffemodel; None when the net has no caffemodel."""

    def __init__(self, layer: str, found: list | None):
        self.layer, self.found = layer, found

    def has(self, index: int) -> bool:
        return self.found is not None and index < len(self.found)

    def get(self, index: int, shape, *, fill: float | None = None,
            fan_in: int | None = None) -> torch.Tensor:
        """Blob `index` as a tensor of `shape`; untrained: `fill` everywhere, else random
        normals scaled by `fan_in` (default: the product of the dimensions after the first)."""
        shape = tuple(int(d) for d in shape)
        if self.found is None:
            if fill is not None:
                return torch.full(shape, float(fill))
            fan_in = fan_in or math.prod(shape[1:]) or 1
            return torch.randn(shape) / math.sqrt(fan_in)
        if not self.found:
            raise UsageError(f"the caffemodel has no weights for Caffe layer {self.layer!r}")
        if index >= len(self.found):
            raise UsageError(f"Caffe layer {self.layer!r}: weights have {len(self.found)} "
                             f"blobs, blob {index} is missing")
        blob = self.found[index]
        tensor = torch.tensor(list(blob.data) or list(blob.double_data), dtype=torch.float32)
        if tensor.numel() != math.prod(shape):
            raise UsageError(f"Caffe layer {self.layer!r}: weight blob {index} holds "
                             f"{tensor.numel()} values, the net needs {shape}")
        return tensor.reshape(shape)
