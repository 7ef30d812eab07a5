"""The model side of a worker: uint8 image batches in, head-applied feature arrays out."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from imgfeat.devices import autocast_dtype
from imgfeat.head import apply_head
from imgfeat.models import LoadedModel
from imgfeat.models.layers import Tap
from imgfeat.models.preprocess import Preprocess


class Extractor:
    """One model on one device with its layer tap and head; owns no images or files."""

    def __init__(self, model: LoadedModel, layer: str, preprocess: Preprocess, *,
                 device: torch.device, precision: str, pool: str, l2: bool, dtype: str):
        self.device = device
        self.spec, self.weights, self.layer = model.spec, model.weights, layer
        self.precision = precision
        self.pool, self.l2 = pool, l2
        self.dtype = np.dtype(dtype)
        self.preprocess = preprocess
        self.module = model.module.to(device).eval()
        self.module.to(memory_format=torch.channels_last)
        self._scale, self._shift = preprocess.normalizer(device)
        self._tap = Tap(model, layer)
        self.feature_shape = self._probe()

    def identity(self) -> dict:
        """What decides the meaning of the features this extractor makes."""
        return {
            "model": {"spec": self.spec},
            "weights": self.weights,
            "layer": self.layer,
            "pool": self.pool,
            "l2": self.l2,
            "preprocess": self.preprocess.to_dict(),
            "precision": self.precision,
            "dtype": self.dtype.name,
            "feature_shape": list(self.feature_shape),
        }

    def _probe(self) -> tuple[int, ...]:
        """One pass on a blank image: counts tapped calls and gives the stored shape."""
        blank = torch.zeros((1, *self.preprocess.size, 3), dtype=torch.uint8)
        with self._context():
            tensor = self._tap.probe(self._to_input(blank))
            return tuple(apply_head(tensor, self.pool, self.l2).shape[1:])

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """`batch`: uint8 (N, H, W, 3), on the host (pinned for a GPU) or the device."""
        with self._context():
            tensor = self._tap(self._to_input(batch))
            features = apply_head(tensor, self.pool, self.l2)
        return features.to("cpu").numpy().astype(self.dtype, copy=False)

    def _to_input(self, batch: torch.Tensor) -> torch.Tensor:
        # NHWC bytes permuted to NCHW are already channels_last in memory: no copy needed.
        pixels = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return pixels.mul_(self._scale).add_(self._shift)  # in place: half the memory traffic

    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        dtype = autocast_dtype(self.precision)
        if dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=dtype))
        return stack
