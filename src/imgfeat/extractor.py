"""The model side of a worker: uint8 image batches in, head-applied feature arrays out."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from imgfeat.devices import autocast_dtype
from imgfeat.errors import UsageError
from imgfeat.head import apply_head
from imgfeat.models import LoadedModel
from imgfeat.models.layers import Tap
from imgfeat.models.preprocess import Preprocess
from imgfeat.whitening import Whitening


class Extractor:
    """One model on one device with its layer tap and head; owns no images or files."""

    def __init__(self, model: LoadedModel, layer: str, preprocess: Preprocess, *,
                 device: torch.device, precision: str, pool: str, l2: bool, dtype: str,
                 gem_p: float = 3.0, scales: tuple[float, ...] = (1.0,),
                 whitening: Whitening | None = None):
        self.device = device
        self.gem_p, self.scales, self.whitening = gem_p, tuple(scales), whitening
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
            "gem_p": self.gem_p if self.pool == "gem" else None,
            "scales": list(self.scales),
            "whiten": self.whitening.describe() if self.whitening else None,
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
            self._tap.probe(self._to_input(blank))
            features = self._features(self._to_input(blank))
        if self.whitening is not None:
            if features.ndim != 2 or features.shape[1] != self.whitening.mean.shape[0]:
                raise UsageError(
                    f"the whitening expects {self.whitening.mean.shape[0]}-d vectors; this "
                    f"model, layer and pool give {tuple(features.shape[1:])}")
            return (self.whitening.dim,)
        return tuple(features.shape[1:])

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """`batch`: uint8 (N, H, W, 3), on the host (pinned for a GPU) or the device."""
        with self._context():
            features = self._features(self._to_input(batch)).to("cpu").numpy()
        if self.whitening is not None:
            features = self.whitening.apply(features, l2=self.l2)
        return features.astype(self.dtype, copy=False)

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The head's output; with several scales, their generalized mean (power p for
        GeM, else 1) of L2-normalised vectors, L2-normalised again."""
        l2 = self.l2 and self.whitening is None  # with whitening, L2 comes after it
        if self.scales == (1.0,):
            return apply_head(self._tap(pixels), self.pool, l2, self.gem_p)
        power = self.gem_p if self.pool == "gem" else 1.0
        total = None
        for scale in self.scales:
            scaled = pixels if scale == 1 else F.interpolate(
                pixels, scale_factor=scale, mode="bilinear", align_corners=False)
            vectors = apply_head(self._tap(scaled), self.pool, True, self.gem_p).pow(power)
            total = vectors if total is None else total + vectors
        mean = (total / len(self.scales)).pow(1.0 / power)
        return F.normalize(mean, dim=1) if self.whitening is None else mean

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
