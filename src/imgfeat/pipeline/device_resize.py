"""Resize and centre crop of decoded uint8 images on the device, computed as Pillow computes
them on the CPU, without ever holding a whole photo in float.

Pillow's antialiasing resampler is separable: a horizontal pass, rounded to 8 bits, then a
vertical pass, each output pixel a weighted sum of source pixels under a filter stretched by the
downscaling factor. Here each pass is a matrix product with those same weights, for only the
rows and columns the crop keeps, and the planes go through in slices of bounded size: a 12 MP
photo costs a slice of floats, not the 144 MB of a float copy. The rounding between the passes
is Pillow's, so results match the CPU path to a level (the decoders' IDCTs aside).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FLOAT_SLICE_BYTES = 64 * 2**20  # the working set of one slice of planes (see slice_planes)
_TF32_HIGH_BITS = np.uint32(0xFFFFE000)  # sign, exponent and TF32's 10 mantissa bits


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _cubic(x: np.ndarray) -> np.ndarray:
    a, x = -0.5, np.abs(x)  # Pillow's bicubic (Keys, a = -0.5)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


FILTERS = {"bilinear": (1.0, _triangle), "bicubic": (2.0, _cubic)}  # support, kernel


def axis_weights(in_size: int, out_size: int, start: int, count: int,
                 interpolation: str) -> np.ndarray:
    """(count, in_size) weights giving outputs start .. start+count-1 of a resize of one axis
    from in_size to out_size, as Pillow's resampler weighs them; rows for outputs outside
    [0, out_size) are zero, which is the zero padding of a crop larger than the image."""
    support, kernel = FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    outputs = np.arange(start, start + count)
    center = (outputs + 0.5) * scale
    low = np.maximum(np.floor(center - support + 0.5), 0)
    high = np.minimum(np.floor(center + support + 0.5), in_size)
    source = np.arange(in_size)
    weights = kernel((source[None, :] - center[:, None] + 0.5) * (1.0 / filterscale))
    inside = (source >= low[:, None]) & (source < high[:, None])
    inside &= ((outputs >= 0) & (outputs < out_size))[:, None]
    weights = np.where(inside, weights, 0.0)
    total = weights.sum(axis=1, keepdims=True)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total != 0)


def split_tf32(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) float32 with high + low == weights in float32 and `high` exact in TF32.

    Pixels are integers below 256, exact in TF32, so a product with `high` is exact and
    `low` carries the rest: a matrix product stays float32-accurate whether or not TF32 is
    allowed for matmuls (it is under --precision auto), and the rounding to 8 bits stays
    Pillow's."""
    full = weights.astype(np.float32)
    high = (full.view(np.uint32) & _TF32_HIGH_BITS).view(np.float32)
    return high, full - high


@dataclass(frozen=True)
class AxisPass:
    """One axis's pass on the device: the source range it reads and its weights, high and
    low parts stacked (2 * count, last - first)."""

    first: int
    last: int
    weights: torch.Tensor


def slice_bytes(planes: int, rows: int, width: int, out_h: int, out_w: int) -> int:
    """Device bytes one slice of `planes` source planes (rows x width, the rows the crop
    reads) needs in flight: the uint8 stack, its float copy, the horizontal product (high and
    low halves) and its sum, the vertical product and its sum."""
    per_plane = rows * width * (1 + 4) + rows * out_w * 4 * 3 + out_h * out_w * 4 * 3
    return planes * per_plane


def slice_planes(rows: int, width: int, out_h: int, out_w: int) -> int:
    """How many planes a slice takes: as many as fit in FLOAT_SLICE_BYTES, and at least one
    (so the working set is at most the larger of the two)."""
    return max(1, FLOAT_SLICE_BYTES // slice_bytes(1, rows, width, out_h, out_w))


class DeviceResizer:
    """Resizes (keeping aspect) and centre crops same-sized uint8 (3, H, W) images to the
    model's (h, w, 3), as `Preprocess.geometry` does in crop mode."""

    def __init__(self, preprocess, device: torch.device):
        self.preprocess, self.device = preprocess, device
        self._passes: dict[tuple, AxisPass] = {}

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(N, h, w, 3) uint8 on the device for N images of one size."""
        _, height, width = images[0].shape
        out_h, out_w = self.preprocess.size
        resized_h, resized_w = self.preprocess.resized_size(height, width)
        rows = self._axis(height, resized_h, out_h)
        cols = self._axis(width, resized_w, out_w)
        planes = [image[channel, rows.first:rows.last, cols.first:cols.last]
                  for image in images for channel in range(3)]
        out = torch.empty((len(planes), out_h, out_w), dtype=torch.uint8, device=self.device)
        step = slice_planes(rows.last - rows.first, cols.last - cols.first, out_h, out_w)
        for begin in range(0, len(planes), step):
            stack = torch.stack(planes[begin:begin + step]).float()
            horizontal = _rounded(stack @ cols.weights.T, out_w)
            out[begin:begin + step] = _rounded(rows.weights @ horizontal, out_h, rows=True)
        return out.view(len(images), 3, out_h, out_w).permute(0, 2, 3, 1)

    def _axis(self, in_size: int, resized: int, crop: int) -> AxisPass:
        key = (in_size, resized, crop)
        if key not in self._passes:
            if len(self._passes) > 256:  # a collection of many sizes: keep the cache small
                self._passes.clear()
            start = round((resized - crop) / 2.0) if crop <= resized else -((crop - resized) // 2)
            weights = axis_weights(in_size, resized, start, crop, self.preprocess.interpolation)
            used = np.flatnonzero(np.abs(weights).sum(axis=0))
            first, last = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
            high, low = split_tf32(weights[:, first:last])
            stacked = torch.from_numpy(np.concatenate([high, low])).to(self.device)
            self._passes[key] = AxisPass(first, last, stacked)
        return self._passes[key]


def _rounded(product: torch.Tensor, count: int, rows: bool = False) -> torch.Tensor:
    """Sum the high and low halves of a pass and round to 8 bits as Pillow does (half up,
    clamped), kept in float for the next pass."""
    high, low = (product[..., :count, :], product[..., count:, :]) if rows \
        else (product[..., :count], product[..., count:])
    return high.add(low).add_(0.5).floor_().clamp_(0, 255)
