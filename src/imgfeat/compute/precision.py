"""The precision a worker computes in.

On a GPU, `auto` is bf16 where the GPU has it, else fp16. On a CPU, `auto` is bf16 where the
CPU has bf16 matrix units (Intel AMX, AVX512-BF16, Arm's BF16 extension) that oneDNN uses,
else fp32: oneDNN also runs bf16 on AVX512 CPUs without them, but emulated and slower than
fp32. A CPU's bf16 is then checked against fp32 at start (`compute.fidelity`).

A store decides for the runs that continue it: its first run's choice, the guard's outcome
included, is recorded in its manifest, and every later run (a resumed one, another node, a
worker that replaced one that died) computes in that recorded precision when its request
allows it, so one store never mixes precisions and a rerun is never refused because the
guard would decide otherwise today.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from imgfeat.errors import UsageError
from imgfeat.options import PRECISIONS

CPU_PRECISIONS = ("fp32", "bf16")  # what `auto` may choose on a CPU


@dataclass(frozen=True)
class CpuCaps:
    """What decides bf16 on a CPU: oneDNN's own bf16 support, and the matrix units."""

    mkldnn_bf16: bool  # oneDNN has bf16 kernels here (on x86: AVX512 core, maybe emulated)
    amx: bool          # Intel AMX tiles (every AMX CPU has AMX-BF16)
    avx512_bf16: bool  # AVX512-BF16 dot products (Cooper Lake, Sapphire Rapids, Zen 4)
    arm: bool          # on Arm, oneDNN reports bf16 only where the BF16 extension is

    @property
    def bf16_matrix_units(self) -> bool:
        return self.mkldnn_bf16 and (self.arm or self.amx or self.avx512_bf16)

    def describe(self) -> str:
        units = [name for name, has in (("AMX", self.amx), ("AVX512-BF16", self.avx512_bf16),
                                        ("Arm BF16", self.arm and self.mkldnn_bf16)) if has]
        return ", ".join(units) or "no bf16 matrix units"


def cpu_caps() -> CpuCaps:
    """This CPU as torch's oneDNN and cpuinfo see it."""
    import torch

    mkldnn = torch.backends.mkldnn.is_available() and bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported())
    flags = _cpuinfo_flags()
    return CpuCaps(
        mkldnn_bf16=mkldnn,
        amx=_torch_cpu_check("_is_amx_tile_supported", "amx_bf16" in flags),
        avx512_bf16=_torch_cpu_check("_is_avx512_bf16_supported", "avx512_bf16" in flags),
        arm=platform.machine().lower() in ("aarch64", "arm64"))


def _torch_cpu_check(name: str, fallback: bool) -> bool:
    """torch.cpu's cpuinfo check where this torch has it (2.3 on), else the kernel's flags."""
    import torch

    check = getattr(torch.cpu, name, None)
    return bool(check()) if check is not None else fallback


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


@dataclass(frozen=True)
class Choice:
    """A worker's precision before any image: `guard` asks for the check against fp32 at
    start, `may_fall_back` lets the check turn the run to fp32 (only `auto` may), `recorded`
    is the check of the store being continued."""

    precision: str
    guard: bool = False
    may_fall_back: bool = False
    recorded: dict | None = None


def choose_precision(requested: str, device, recorded: dict | None = None,
                     runs_in_torch: bool = True, caps: CpuCaps | None = None) -> Choice:
    """The precision for `requested` on `device`; `recorded` is the manifest of the store this
    run continues (None for a new store or --overwrite)."""
    if requested not in PRECISIONS:
        raise UsageError(f"unknown precision {requested!r}; choose {', '.join(PRECISIONS)}")
    if device.type != "cpu":
        return Choice(_gpu_precision(requested))
    if (kept := _recorded_choice(requested, recorded)) is not None:
        return kept
    if requested == "auto":
        bf16 = runs_in_torch and (caps or cpu_caps()).bf16_matrix_units
        return Choice("bf16", guard=True, may_fall_back=True) if bf16 else Choice("fp32")
    return Choice(requested, guard=requested == "bf16" and runs_in_torch)


def _recorded_choice(requested: str, recorded: dict | None) -> Choice | None:
    """The store's own precision, where this request may continue it: `auto` continues any
    CPU precision (fp32 from an older imgfeat or a failed check, bf16 even on a CPU without
    the units: slower, but the store stays one precision); a forced one continues only
    itself, and otherwise the store's identity check refuses the run in one line."""
    if not recorded or (used := recorded.get("precision")) not in CPU_PRECISIONS:
        return None
    if requested not in ("auto", used):
        return None
    return Choice(used, recorded=recorded.get("precision_check"))


def _gpu_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
