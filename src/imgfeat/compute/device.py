"""The torch device a worker's model runs on, and the numeric precision it computes in."""

from __future__ import annotations

from imgfeat.errors import UsageError


def resolve_device(spec: str):
    """One torch device from `auto`, `cpu`, `cuda` or `cuda:N`."""
    import torch

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


def resolve_precision(precision: str, device) -> str:
    """`auto` is bf16 on GPUs that have it, else fp16 on GPU; on CPU, bf16 where the CPU has
    bf16 matrix units, else fp32 (see compute.precision, which also checks bf16 at start)."""
    from imgfeat.compute.precision import choose_precision

    return choose_precision(precision, device).precision


def autocast_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def tune_backends(device, precision: str) -> None:
    """A CUDA worker's backend settings. cuDNN times its kernels once per input shape and
    keeps the fastest (a run's batches share one shape, bar a shard's last); `--precision
    auto` lets float32 matrix products use TF32, as what autocast leaves in float32 then
    runs on tensor cores (an explicit fp32 keeps full float32)."""
    if device.type != "cuda":
        return
    import torch

    torch.backends.cudnn.benchmark = True
    if precision == "auto":
        torch.set_float32_matmul_precision("high")
