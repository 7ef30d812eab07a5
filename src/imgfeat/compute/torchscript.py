"""A frozen TorchScript graph of the model side, for CPU workers.

Eager PyTorch pays Python dispatch for every operator, and a light model on one core spends a
third of its time there; freezing also folds batch norms into the convolutions before them. On
a 2-core x86 machine MobileNetV3-small went from 400 to 627 images/s on one thread. The graph
is traced from a real pass (taps stop the pass by raising, which tracing records as the end of
the graph) and checked against the eager result at another batch size; any model that traces
badly (data-dependent control flow, sizes turned into constants, non-PyTorch taps) keeps the
eager path, so freezing never changes what a run computes beyond float rounding.

In bf16 the graph is traced under autocast, so that its casts become part of the graph and
freezing turns the weights into bf16 constants once (as Intel's extension for PyTorch does);
the frozen graph then runs without autocast. Its check allows bf16's rounding: every row must
keep a cosine of 0.9999 with the eager bf16 result, which a wrongly traced graph does not.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch

Features = Callable[[torch.Tensor], dict[str, torch.Tensor]]

_RTOL, _ATOL = 1e-3, 1e-4  # folded batch norms reorder float sums, nothing more
_BF16_COSINE = 0.9999  # bf16 rounds the folded weights once more than eager autocast does


class _Traced(torch.nn.Module):
    """Holds the model so that tracing sees its weights as attributes, not loose constants."""

    def __init__(self, module: torch.nn.Module, features: Features):
        super().__init__()
        self.net = module
        self._features = features

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._features(pixels)


def freeze(module: torch.nn.Module, features: Features, example: torch.Tensor,
           check: torch.Tensor, dtype: torch.dtype | None = None) -> Features | None:
    """`features` as a frozen graph traced on `example`, or None when the graph does not give
    the eager result on `check` (which must differ from `example` in batch size). `dtype`:
    bf16 to trace under autocast."""
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings: the check below decides
            with _tracing_autocast(dtype):
                traced = torch.jit.trace(_Traced(module, features).eval(), example,
                                         strict=False, check_trace=False)
            frozen = torch.jit.freeze(traced)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                expected = features(check)
            got = frozen(check)
    except Exception:  # a model that cannot be traced runs eagerly; nothing is lost
        return None
    close = _close if dtype is None else _close_in_bf16
    if expected.keys() != got.keys() or not all(close(got[k], expected[k]) for k in expected):
        return None
    return frozen


@contextlib.contextmanager
def _tracing_autocast(dtype: torch.dtype | None):
    """Autocast for tracing: casts recorded as graph operations (no cache of cast weights,
    and TorchScript's own autocast pass off, which would cast a second time)."""
    if dtype is None:
        yield
        return
    before = torch._C._jit_set_autocast_mode(False)
    try:
        with torch.autocast("cpu", dtype=dtype, cache_enabled=False):
            yield
    finally:
        torch._C._jit_set_autocast_mode(before)


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return got.shape == expected.shape and torch.allclose(
        got, expected, rtol=_RTOL, atol=_ATOL * max(1.0, scale))


def _close_in_bf16(got: torch.Tensor, expected: torch.Tensor) -> bool:
    if got.shape != expected.shape:
        return False
    got, expected = got.float().flatten(1), expected.float().flatten(1)
    same = (got == expected).all(dim=1)  # zero rows have no cosine
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=1)
    return bool((same | (cosine >= _BF16_COSINE)).all())
