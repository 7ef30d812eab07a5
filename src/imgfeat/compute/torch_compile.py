"""`--compile`: the model side through torch.compile, one static graph per batch size.

Each batch size is compiled at most once: a short batch (a shard's last) is padded to the
smallest size already compiled that holds it, and the padding's rows dropped. After device
out-of-memory at some size, padding stops reaching up to it (the worker halves its batch and
the half gets a graph of its own) until a pass at that size succeeds again. Past MAX_SIZES
sizes, new sizes run eagerly, and it says so. If the compiler fails (no C++ compiler on a CPU
machine, an operator it cannot lower), the run goes on eagerly and says so once. Errors of
the device itself (a CUDA error) are errors, not compiler failures: they reach the worker,
whose process is then replaced.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import torch

Features = Callable[[torch.Tensor], dict[str, torch.Tensor]]

MAX_SIZES = 12  # halving 1024 down to 1 gives 11 sizes; a shard's tail may add one
_DEVICE_ERRORS = ("CUDA error", "CUDA driver error", "device-side assert",
                  "illegal memory access", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error")


def device_error(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it wraps, is the device failing rather than the
    compiler: such an error leaves the CUDA context unusable, so no eager fallback."""
    accelerator = getattr(torch, "AcceleratorError", None)
    return any((accelerator is not None and isinstance(link, accelerator))
               or any(marker in str(link) for marker in _DEVICE_ERRORS) for link in _chain(exc))


def _chain(exc: BaseException | None):
    """`exc` and what it wraps (the compiler wraps errors raised while it autotunes)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


class Compiled:
    def __init__(self, features: Features):
        # On a machine without CUDA, torch's extension builder warns about it at each compile.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        _allow_recompiles(MAX_SIZES + 1)  # beyond its limit dynamo goes eager silently
        self._eager = features
        self._compiled = torch.compile(features, dynamic=False)
        self._sizes: set[int] = set()  # compiled, and ran at least once
        self._ceiling = sys.maxsize  # padding goes up to this size
        self._said_too_many = False
        self.failure: str | None = None

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.failure is not None:
            return self._eager(pixels)
        count = len(pixels)
        size = self.target(count)
        if size not in self._sizes and len(self._sizes) >= MAX_SIZES:
            self._too_many(size)
            return self._eager(pixels)
        if size > count:
            filler = pixels[-1:].expand(size - count, *pixels.shape[1:])
            padded = torch.cat([pixels, filler]).contiguous(memory_format=torch.channels_last)
            return {layer: tensor[:count] for layer, tensor in self._call(padded).items()}
        return self._call(pixels)

    def target(self, count: int) -> int:
        """The batch size a pass of `count` images runs at."""
        if count in self._sizes:
            return count
        return min((size for size in self._sizes if count < size <= self._ceiling),
                   default=count)

    def _call(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        size = len(pixels)
        try:
            features = self._compiled(pixels)
        except Exception as exc:
            if any(isinstance(link, torch.cuda.OutOfMemoryError) for link in _chain(exc)):
                self._ceiling = size - 1  # the worker halves its batch: do not pad back up
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    raise
                raise torch.cuda.OutOfMemoryError(_first_line(exc)) from exc  # was wrapped
            if size in self._sizes or device_error(exc):
                raise  # not compiling: the pass itself failed
            self._fall_back(exc)
            return self._eager(pixels)
        self._sizes.add(size)
        self._ceiling = max(self._ceiling, size)
        return features

    def _fall_back(self, exc: Exception) -> None:
        self.failure = _first_line(exc)
        print(f"imgfeat: --compile failed ({self.failure}); running eagerly",
              file=sys.stderr, flush=True)

    def _too_many(self, size: int) -> None:
        if not self._said_too_many:
            self._said_too_many = True
            print(f"imgfeat: --compile has compiled {MAX_SIZES} batch sizes; batches of new "
                  f"sizes (here {size}) run eagerly", file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _allow_recompiles(count: int) -> None:
    import torch._dynamo.config as config

    for name in ("recompile_limit", "cache_size_limit"):  # its name before torch 2.6
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), count))
            return
