"""Device specs: which device a worker runs on, and the numeric precision it computes in."""

from __future__ import annotations

import torch

from imgfeat.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(spec: str) -> torch.device:
    """One device from `auto`, `cpu`, `cuda` or `cuda:N`."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--devices {spec}: no CUDA device is visible "
                             "(use --devices cpu or auto)")
        index = spec.partition(":")[2] or "0"
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise UsageError(f"--devices {spec}: there are {torch.cuda.device_count()} "
                             "CUDA devices (cuda:0 ...)")
        return torch.device(f"cuda:{index}")
    raise UsageError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on GPUs that have it, else fp16 on GPU, and fp32 on CPU."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
