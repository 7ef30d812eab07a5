"""The model side of a worker: uint8 image batches in, head-applied feature arrays out."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from imgfeat.compute.device import autocast_dtype
from imgfeat.compute.pooling import apply_head
from imgfeat.compute.whitening import Whitening
from imgfeat.errors import UsageError
from imgfeat.models import LoadedModel
from imgfeat.models.layers import Tap
from imgfeat.models.preprocess import Preprocess


class Extractor:
    """One model on one device with its layer taps and their heads; owns no images or files.
    Features come out as {layer: array}, one entry per tapped layer."""

    def __init__(self, model: LoadedModel, layers: list[str], preprocess: Preprocess, *,
                 device: torch.device, precision: str, pool: str, l2: bool, dtype: str,
                 gem_p: float = 3.0, scales: tuple[float, ...] = (1.0,),
                 whitening: Whitening | None = None, freeze: bool = True,
                 compile: bool = False):
        if whitening is not None and len(layers) > 1:
            raise UsageError("--whiten applies to one layer; extract other layers apart")
        self.device = device
        self.gem_p, self.scales, self.whitening = gem_p, tuple(scales), whitening
        self.spec, self.weights, self.layers = model.spec, model.weights, list(layers)
        self.precision = precision
        self.pool, self.l2 = pool, l2
        self.dtype = np.dtype(dtype)
        self.preprocess = preprocess
        self.module = model.module.to(device).eval()
        self.module.to(memory_format=torch.channels_last)
        self._scale, self._shift = preprocess.normalizer(device)
        self._copies = None  # the CUDA stream that uploads batches
        self._tap = model.make_tap(self.layers, device) if model.make_tap \
            else Tap(model, self.layers)
        self._run, self._graph = self._features, None
        self.feature_shapes = self._probe()
        self.precision_check: dict | None = None  # bf16 against fp32 (compute.fidelity)
        self._freeze_wanted, self.compiled = freeze and not compile, compile
        self._prepare()

    def _prepare(self) -> None:
        """The model side for this precision: compiled, frozen where that checks out, or
        eager."""
        self._run, self._graph, self.frozen = self._features, None, False
        if self.compiled:
            from imgfeat.compute.torch_compile import Compiled

            self._run = Compiled(self._features)
        elif self._freeze_wanted:
            self.frozen = self._freeze()

    def use_precision(self, precision: str) -> None:
        """Compute in `precision` from now on (the fidelity check's fall-back to fp32)."""
        if precision != self.precision:
            self.precision = precision
            self._prepare()

    @contextlib.contextmanager
    def eagerly(self):
        """Run the eager model side inside: for probes that must not compile other shapes."""
        run, self._run = self._run, self._features
        try:
            yield self
        finally:
            self._run = run

    def _freeze(self) -> bool:
        """Swap the eager model side for a checked frozen graph where that pays: on CPU, in
        fp32 or bf16 (on a GPU, kernels dominate and --compile is the tool)."""
        if self.device.type != "cpu" or self.precision not in ("fp32", "bf16"):
            return False
        from imgfeat.compute.torchscript import freeze

        generator = torch.Generator().manual_seed(0)
        example, check = (self._to_input(torch.randint(
            0, 256, (n, *self.preprocess.size, 3), dtype=torch.uint8, generator=generator))
            for n in (2, 3))
        frozen = freeze(self.module, self._features, example, check,
                        autocast_dtype(self.precision))
        if frozen is None:
            return False
        self._run = self._graph = frozen
        return True

    def identity(self) -> dict:
        """What decides the meaning of the features this extractor makes."""
        return {
            "model": {"spec": self.spec},
            "weights": self.weights,
            "layers": {layer: list(shape) for layer, shape in self.feature_shapes.items()},
            "pool": self.pool,
            "gem_p": self.gem_p if self.pool == "gem" else None,
            "scales": list(self.scales),
            "whiten": self.whitening.describe() if self.whitening else None,
            "l2": self.l2,
            "preprocess": self.preprocess.to_dict(),
            "precision": self.precision,
            "precision_check": self.precision_check,
            "dtype": self.dtype.name,
        }

    def _probe(self) -> dict[str, tuple[int, ...]]:
        """One pass on a blank image: counts tapped calls and gives the stored shapes."""
        blank = torch.zeros((1, *self.preprocess.size, 3), dtype=torch.uint8,
                            device=self.device)
        with self._context():
            self._tap.probe(self._to_input(blank))
            features = self._features(self._to_input(blank))
        shapes = {layer: tuple(tensor.shape[1:]) for layer, tensor in features.items()}
        if self.whitening is not None:
            (layer, shape), = shapes.items()
            if shape != self.whitening.mean.shape:
                raise UsageError(
                    f"the whitening expects {self.whitening.mean.shape[0]}-d vectors; this "
                    f"model, layer and pool give {shape}")
            shapes[layer] = (self.whitening.dim,)
        return shapes

    def __call__(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        """`batch`: uint8 (N, H, W, 3), on the host (pinned for a GPU) or the device."""
        return self.launch(batch).result()

    def launch(self, batch: torch.Tensor) -> Pending:
        """Queue a batch's pass without waiting for it (on a GPU: the upload on a side stream,
        overlapping the pass before it, and the features' download); on CPU it runs now."""
        with self._context():
            tensors = self._run(self._to_input(self._upload(batch)))
            host = {layer: tensor.to("cpu", non_blocking=True)
                    for layer, tensor in tensors.items()}
        done = None
        if self.device.type == "cuda":  # waited on asleep: a spinning wait takes a core
            done = torch.cuda.Event(blocking=True)  # that the decode threads need
            done.record()
        return Pending(self, host, done)

    def finish(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host-side last steps: whitening, then the stored dtype. A value beyond float16
        becomes inf here; the shard writer counts those rows (or stops a first shard)."""
        with np.errstate(over="ignore"):
            return {layer: array.astype(self.dtype, copy=False)
                    for layer, array in self._whiten(features).items()}

    def float_features(self, batch: torch.Tensor, fp32: bool = False) -> dict[str, np.ndarray]:
        """What would be stored, before the stored dtype: as this extractor runs, or with
        `fp32` eagerly in float32 (the reference of the fidelity check)."""
        run = self._features if fp32 else self._run
        with self._context(autocast=not fp32):
            tensors = run(self._to_input(self._upload(batch)))
        return self._whiten({layer: tensor.float().cpu().numpy()
                             for layer, tensor in tensors.items()})

    def _whiten(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.whitening is None:
            return features
        return {layer: self.whitening.apply(array, l2=self.l2)
                for layer, array in features.items()}

    def _upload(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda" or batch.device == self.device:
            return batch.to(self.device)
        if self._copies is None:
            self._copies = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._copies):
            pixels = batch.to(self.device, non_blocking=True)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self._copies)
        pixels.record_stream(compute)  # the allocator must not reuse it before the pass ends
        return pixels

    def _features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each layer's head output; with several scales, their generalized mean (power p
        for GeM, else 1) of L2-normalised vectors, L2-normalised again."""
        l2 = self.l2 and self.whitening is None  # with whitening, L2 comes after it
        if self.scales == (1.0,):
            return {layer: apply_head(tensor, self.pool, l2, self.gem_p)
                    for layer, tensor in self._tap(pixels).items()}
        power = self.gem_p if self.pool == "gem" else 1.0
        totals: dict[str, torch.Tensor] = {}
        for scale in self.scales:
            scaled = pixels if scale == 1 else F.interpolate(
                pixels, scale_factor=scale, mode="bilinear", align_corners=False)
            for layer, tensor in self._tap(scaled).items():
                vectors = apply_head(tensor, self.pool, True, self.gem_p).pow(power)
                totals[layer] = vectors + totals[layer] if layer in totals else vectors
        means = {layer: (total / len(self.scales)).pow(1.0 / power)
                 for layer, total in totals.items()}
        if self.whitening is not None:
            return means
        return {layer: F.normalize(mean, dim=1) for layer, mean in means.items()}

    def _to_input(self, batch: torch.Tensor) -> torch.Tensor:
        # NHWC bytes permuted to NCHW are already channels_last in memory: no copy needed.
        pixels = batch.permute(0, 3, 1, 2).float()
        if self.preprocess.bgr:
            pixels = pixels.flip(1)
        return pixels.mul_(self._scale).add_(self._shift)  # in place: half the memory traffic

    def _context(self, autocast: bool = True):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        dtype = autocast_dtype(self.precision)
        # A frozen bf16 graph holds its casts: autocast around it would only add dispatch.
        if dtype is not None and autocast and self._run is not self._graph:
            stack.enter_context(torch.autocast(self.device.type, dtype=dtype))
        return stack


class Pending:
    """A launched batch; `result()` waits for its features and finishes them on the host."""

    def __init__(self, extractor: Extractor, host: dict[str, torch.Tensor], done=None):
        self._extractor, self._host, self._done = extractor, host, done

    def result(self) -> dict[str, np.ndarray]:
        if self._done is not None:
            self._done.synchronize()
        return self._extractor.finish(
            {layer: tensor.numpy() for layer, tensor in self._host.items()})
