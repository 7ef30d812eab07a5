"""Shared by the benchmarks: timing a command, the machine, and the results file."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "benchmarks.md"


def machine() -> str:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {cores} cores, {gpu}"


def commit() -> str:
    if os.environ.get("IMGFEAT_BENCH_COMMIT"):  # a copy of the tree without its .git
        return os.environ["IMGFEAT_BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timed(command: list[str]) -> float:
    """Wall seconds of a command, which must succeed."""
    began = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def imgfeat_command(corpus: Path, out: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "imgfeat", "extract", str(corpus), "-o", str(out),
            "--weights", "random", "--quiet", "--overwrite", *options]


def write_section(title: str, body: str, results: Path = RESULTS) -> None:
    """Replace (or add) one `## title` section of docs/benchmarks.md (or `results`)."""
    results.parent.mkdir(parents=True, exist_ok=True)
    text = results.read_text() if results.exists() else "# Benchmarks\n"
    start = text.find(f"\n## {title}\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + text[end:] if end >= 0 else text[:start]
    results.write_text(text.rstrip("\n") + f"\n\n## {title}\n\n{body.strip()}\n")
