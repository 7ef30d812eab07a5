"""`--compile`: the model side through torch.compile, at one batch shape.

A shard's last batch is short; rather than compile again for each new size, short batches are
padded to the largest size seen and the padding's rows dropped. If the compiler fails (no C++
compiler on a CPU machine, an operator it cannot lower), the run goes on eagerly and says so
once; out-of-memory still reaches the worker, which halves its batch.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import torch

Features = Callable[[torch.Tensor], dict[str, torch.Tensor]]


class Compiled:
    def __init__(self, features: Features):
        # On a machine without CUDA, torch's extension builder warns about it at each compile.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        self._eager = features
        self._compiled = torch.compile(features, dynamic=False)
        self._rows = 0
        self.failure: str | None = None

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.failure is not None:
            return self._eager(pixels)
        count = len(pixels)
        self._rows = max(self._rows, count)
        if count < self._rows:
            filler = pixels[-1:].expand(self._rows - count, *pixels.shape[1:])
            padded = torch.cat([pixels, filler]).contiguous(memory_format=torch.channels_last)
            return {layer: tensor[:count] for layer, tensor in self._call(padded).items()}
        return self._call(pixels)

    def _call(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        try:
            return self._compiled(pixels)
        except torch.cuda.OutOfMemoryError:
            self._rows = 0  # the worker retries with smaller batches: compile for those
            raise
        except Exception as exc:  # the compiler's failure, not the images'
            self.failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
            print(f"imgfeat: --compile failed ({self.failure}); running eagerly",
                  file=sys.stderr, flush=True)
            return self._eager(pixels)
