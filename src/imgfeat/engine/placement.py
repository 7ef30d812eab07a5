"""Placement: which devices a run's workers get (`--devices`), and each worker's share of the
machine's cores and threads."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, replace

from imgfeat.compute.device import resolve_device
from imgfeat.errors import UsageError

_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg")
DEVICE_HELP = "auto, all, cpu, cpu:N, cuda or cuda:0,2,..."


@dataclass(frozen=True)
class Placement:
    """Where one worker runs: its device, its share of the CPU cores and its threads."""

    device: str
    torch_threads: int
    decode_threads: int
    cpus: tuple[int, ...] | None = None


def gpu_count() -> int:
    """Visible CUDA devices; on a Linux machine with no NVIDIA driver (or WSL GPU bridge)
    this is known without the second it takes to import torch."""
    if sys.platform == "linux" and not any(os.path.exists(p) for p in _DRIVER_FILES):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_devices(spec: str) -> list[str]:
    """One device string per worker: `cpu:2` is two CPU workers, `cuda` every GPU."""
    spec = spec.strip().lower()
    gpus = 0 if spec.startswith("cpu") else gpu_count()
    if spec == "auto":
        return [f"cuda:{i}" for i in range(gpus)] or ["cpu"]
    if spec in ("all", "cuda"):
        if not gpus:
            raise UsageError(f"--devices {spec}: no CUDA device is visible "
                             "(use --devices cpu, cpu:N or auto)")
        return [f"cuda:{i}" for i in range(gpus)]
    if spec == "cpu":
        return ["cpu"]
    if spec.startswith("cpu:"):
        count = spec[4:]
        if not count.isdigit() or int(count) < 1:
            raise UsageError(f"--devices {spec}: write cpu:N with N >= 1 workers")
        return ["cpu"] * int(count)
    if spec.startswith("cuda:"):
        indices = [i.strip() for i in spec[5:].split(",")]
        if not all(i.isdigit() for i in indices) or len(set(indices)) != len(indices):
            raise UsageError(f"--devices {spec}: write cuda:0,1,... with distinct indices")
        return [str(resolve_device(f"cuda:{i}")) for i in indices]
    raise UsageError(f"unknown device {spec!r}; use {DEVICE_HELP}")


@dataclass(frozen=True)
class LocalTask:
    """This process's place among the tasks a launcher started on this machine
    (`srun --ntasks-per-node=8`, torchrun's processes per node): rank among `size`."""

    rank: int = 0
    size: int = 1

    @classmethod
    def of(cls, env: Mapping[str, str] = os.environ) -> LocalTask:
        try:
            if "SLURM_LOCALID" in env and "SLURM_STEP_ID" in env:
                return cls(int(env["SLURM_LOCALID"]), _slurm_tasks_here(env))
            if "LOCAL_RANK" in env and "LOCAL_WORLD_SIZE" in env:
                return cls(int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"]))
        except ValueError:
            raise UsageError("the launcher's local task variables (SLURM_LOCALID, LOCAL_RANK) "
                             "are not numbers; pass --devices for each task") from None
        return cls()

    def devices(self, devices: list[str], spec: str) -> list[str]:
        """This task's GPUs when `spec` asked for every GPU: every size-th from its rank, or
        one shared GPU when there are fewer GPUs than tasks (a task started with GPUs of its
        own, `--gpus-per-task`, sees only those and keeps them)."""
        if self.size == 1 or spec.strip().lower() not in ("auto", "all", "cuda") \
                or len(devices) <= 1 or not devices[0].startswith("cuda"):
            return devices
        mine = devices[self.rank::self.size]
        return mine or [devices[self.rank % len(devices)]]

    def cores(self, cores: list[int]) -> list[int]:
        """This task's share of the cores when the launcher did not bind it to its own."""
        if self.size == 1 or len(cores) < (os.cpu_count() or len(cores)) \
                or len(cores) < self.size:
            return cores
        share = len(cores) // self.size
        return cores[self.rank * share:(self.rank + 1) * share]


def _slurm_tasks_here(env: Mapping[str, str]) -> int:
    """Tasks of this step on this node: SLURM_STEP_TASKS_PER_NODE is e.g. '8(x2),7', one
    count per node of the step, in node order."""
    if "SLURM_NTASKS_PER_NODE" in env:
        return int(env["SLURM_NTASKS_PER_NODE"])
    counts: list[int] = []
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", "1").split(","):
        number, _, repeat = part.partition("(x")
        counts += [int(number)] * (int(repeat.rstrip(")")) if repeat else 1)
    node = int(env.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else counts[-1]


def place_workers(devices: list[str], threads: int | None = None,
                  local: LocalTask = LocalTask()) -> list[Placement]:
    """Split this task's cores between the workers; CPU workers get disjoint cores."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else list(range(os.cpu_count() or 1))
    cores = local.cores(cores)
    share = max(1, len(cores) // len(devices))
    placements = []
    for slot, device in enumerate(devices):
        mine = cores[slot * share:(slot + 1) * share] if len(cores) >= len(devices) else None
        pinned = tuple(mine) if mine and device == "cpu" else None
        placements.append(Placement(device, torch_threads=share,
                                    decode_threads=threads or share, cpus=pinned))
    return placements


def own_device_only(placement: Placement, environ: MutableMapping[str, str] = os.environ
                    ) -> Placement:
    """Make a worker process see only its own GPU (none for a CPU worker) and give its
    placement as the process then names the device: cuda:N becomes cuda:0.

    CUDA reads CUDA_VISIBLE_DEVICES once, when it starts in a process, so this must run in
    the spawned worker before anything touches CUDA. Then no library, no stray
    `torch.cuda` call and no allocator can create a context on, or take memory of, another
    worker's GPU. An index counts among the devices the parent saw: cuda:1 under
    CUDA_VISIBLE_DEVICES=4,6 is device 6."""
    if not placement.device.startswith("cuda"):
        environ["CUDA_VISIBLE_DEVICES"] = ""
        return placement
    index = int(placement.device.partition(":")[2] or 0)
    seen = [entry.strip() for entry in environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    seen = [entry for entry in seen if entry]
    environ["CUDA_VISIBLE_DEVICES"] = seen[index] if index < len(seen) else str(index)
    return replace(placement, device="cuda:0")
