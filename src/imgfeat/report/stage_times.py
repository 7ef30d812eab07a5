"""Per-stage timing for --profile: where a worker's time goes (read, decode, preprocess on
the decode threads; gpu-decode, wait, forward, write on the worker's own thread)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

STAGES = ("read", "decode", "preprocess", "gpu-decode", "wait", "forward", "write")
_OPTIONAL = {"gpu-decode"}  # shown only when used
THREAD_STAGES = ("read", "decode", "preprocess")  # summed over the decode threads


class StageTimes:
    """Seconds per stage; safe to add to from the decode threads."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str):
        began = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - began
            with self._lock:
                self.seconds[name] += elapsed

    def add(self, other: dict[str, float]) -> None:
        with self._lock:
            for name, seconds in other.items():
                self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def table(self, images: int, wall: float) -> str:
        """A readable breakdown; the biggest of wait/forward/write is the bottleneck."""
        lines = ["stage       seconds   ms/image   note"]
        for name in STAGES:
            seconds = self.seconds[name]
            if name in _OPTIONAL and not seconds:
                continue
            note = "summed over decode threads" if name in THREAD_STAGES else ""
            if name == "wait":
                note = "worker idle, waiting for decoded images"
            if name == "gpu-decode":
                note = "JPEGs decoded and resized on the device (--decode)"
            lines.append(f"{name:<10} {seconds:>8.2f} {1000 * seconds / max(images, 1):>10.2f}"
                         f"   {note}")
        lines.append(f"{'wall':<10} {wall:>8.2f} {1000 * wall / max(images, 1):>10.2f}")
        return "\n".join(lines)


class _Off:
    """Stands in for StageTimes when profiling is off: costs one call per stage."""

    @contextmanager
    def stage(self, name: str):
        yield


OFF = _Off()
