"""A frozen TorchScript graph of the model side, for CPU workers.

Eager PyTorch pays Python dispatch for every operator, and a light model on one core spends a
third of its time there; freezing also folds batch norms into the convolutions before them. On
a 2-core x86 machine MobileNetV3-small went from 400 to 627 images/s on one thread. The graph
is traced from a real pass (taps stop the pass by raising, which tracing records as the end of
the graph) and checked against the eager result at another batch size; any model that traces
badly (data-dependent control flow, sizes turned into constants, non-PyTorch taps) keeps the
eager path, so freezing never changes what a run computes beyond float rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

Features = Callable[[torch.Tensor], dict[str, torch.Tensor]]

_RTOL, _ATOL = 1e-3, 1e-4  # folded batch norms reorder float sums, nothing more


class _Traced(torch.nn.Module):
    """Holds the model so that tracing sees its weights as attributes, not loose constants."""

    def __init__(self, module: torch.nn.Module, features: Features):
        super().__init__()
        self.net = module
        self._features = features

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._features(pixels)


def freeze(module: torch.nn.Module, features: Features, example: torch.Tensor,
           check: torch.Tensor) -> Features | None:
    """`features` as a frozen graph traced on `example`, or None when the graph does not give
    the eager result on `check` (which must differ from `example` in batch size)."""
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings: the check below decides
            traced = torch.jit.trace(_Traced(module, features).eval(), example, strict=False,
                                     check_trace=False)
            frozen = torch.jit.freeze(traced)
            expected, got = features(check), frozen(check)
    except Exception:  # a model that cannot be traced runs eagerly; nothing is lost
        return None
    if expected.keys() != got.keys() or not all(_close(got[k], expected[k]) for k in expected):
        return None
    return frozen


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return got.shape == expected.shape and torch.allclose(
        got, expected, rtol=_RTOL, atol=_ATOL * max(1.0, scale))
