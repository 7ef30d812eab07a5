"""Decoding on processes of their own, for workers with many cores.

Decode threads of one process take turns on its GIL: on the 16 cores of an H200 machine a
ResNet-50 worker decoding on 16 threads ran 1,294 images/s, where one process per core decodes
7,590 (docs/benchmarks.md, "GPU acceptance"). Here each process decodes a chunk of items into
slots of a shared-memory ring, and the worker copies each slot into its batch (150 KB, some
microseconds), so pixels never pass through a pipe. A decoder that kills its process breaks
the pool: the shard fails, and the engine retries it one image at a time in the worker
itself, where the image that kills it is found and recorded as an error (engine.retry).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from imgfeat.models.preprocess import Preprocess
from imgfeat.pipeline.decode_pool import load_pixels, ordered_map
from imgfeat.report.stage_times import OFF, StageTimes
from imgfeat.sources import Item

# Decode threads from which a worker decodes on processes: below it the GIL is not what holds
# decoding up, and processes would only cost their start (a second or two each).
PROCESSES_FROM = 4
PARENT_CHECK_S = 0.5
# Items per task: a task's round trip costs the worker's threads some GIL time, a larger
# chunk more waiting for its slowest image. IMGFEAT_DECODE_CHUNK is for measuring it
# (bench/gpu_acceptance.py's probes).
CHUNK = int(os.environ.get("IMGFEAT_DECODE_CHUNK", "8"))


def use_processes(threads: int) -> bool:
    """Whether a worker with `threads` decode threads decodes on processes instead;
    IMGFEAT_DECODE_PROCESSES=1 or 0 decides it outright."""
    forced = os.environ.get("IMGFEAT_DECODE_PROCESSES")
    if forced in ("0", "1"):
        return forced == "1"
    return threads >= PROCESSES_FROM


def decoders(threads: int, preprocess: Preprocess, max_pixels: int | None, ahead: int, *,
             low_priority: bool = False, profile: bool = False) -> DecodeProcesses | None:
    """Decode processes for a worker with `threads` decoders, where they pay and their ring
    fits in shared memory; else None, and the worker decodes on threads."""
    if not use_processes(threads):
        return None
    need, free = ring_bytes(preprocess, ahead), shared_memory_free()
    if free is not None and need > free // 2:  # the other workers of the machine need theirs
        warnings.warn(f"decoding on threads, not processes: shared memory (/dev/shm) has "
                      f"{free / 2**20:.0f} MiB free where the decoders' ring needs "
                      f"{need / 2**20:.0f} MiB; give it more for faster decoding (in a "
                      "container: docker run --shm-size=4g)", stacklevel=2)
        return None
    return DecodeProcesses(threads, preprocess, max_pixels, ahead,
                           low_priority=low_priority, profile=profile)


def ring_bytes(preprocess: Preprocess, ahead: int) -> int:
    height, width = preprocess.size
    return (_chunks_ahead(ahead) + 1) * CHUNK * height * width * 3


def _chunks_ahead(ahead: int) -> int:
    return max(2, -(-ahead // CHUNK))


def shared_memory_free(path: str = "/dev/shm") -> int | None:
    """Bytes free where POSIX shared memory lives (a container's default is 64 MiB, and a
    page written past it kills the writer with SIGBUS); None where it cannot be told."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


class DecodeProcesses:
    """`processes` decoders and a ring of model-sized slots they fill, for one worker."""

    def __init__(self, processes: int, preprocess: Preprocess, max_pixels: int | None,
                 ahead: int, *, low_priority: bool = False, profile: bool = False):
        self._chunks_ahead = _chunks_ahead(ahead)
        height, width = preprocess.size
        shape = ((self._chunks_ahead + 1) * CHUNK, height, width, 3)
        self._memory = SharedMemory(create=True, size=int(np.prod(shape)))
        self.ring = np.ndarray(shape, dtype=np.uint8, buffer=self._memory.buf)
        # spawn, not fork: the worker holds CUDA and threads, which a forked child inherits
        # in whatever state they were in.
        self._pool = ProcessPoolExecutor(
            processes, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
            initargs=(os.getpid(), self._memory.name, shape, preprocess, max_pixels,
                      low_priority, profile))

    def decode(self, items: Iterable[tuple[Item, bytes | str | None]], times=OFF
               ) -> Iterator[tuple[Item, np.ndarray | str]]:
        """(item, its pixels or why none) in order; the pixels are a view of the ring, valid
        until the next item is asked for."""
        for tasks, (results, seconds) in ordered_map(self._pool, _decode_chunk,
                                                     self._numbered(items), self._chunks_ahead):
            if seconds:
                times.add(seconds)
            for (slot, item, _), result in zip(tasks, results):
                yield item, self.ring[slot] if result is None else result

    def _numbered(self, items: Iterable[tuple[Item, bytes | str | None]]):
        """Chunks of (slot, item, bytes): chunk n fills the ring's part n mod (chunks ahead
        + 1), which no chunk still in flight or being read uses."""
        chunk, number = [], 0
        for item, data in items:
            chunk.append(((number % (self._chunks_ahead + 1)) * CHUNK + len(chunk), item, data))
            if len(chunk) == CHUNK:
                yield chunk
                chunk, number = [], number + 1
        if chunk:
            yield chunk

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        del self.ring  # the memory cannot be closed while an array still views it
        try:
            self._memory.close()
        except BufferError:  # a view outlived its shard; the mapping goes with the process
            pass
        self._memory.unlink()


# -- in each decode process ---------------------------------------------------------------------

_state: dict = {}


def _start(worker: int, name: str, shape: tuple, preprocess: Preprocess,
           max_pixels: int | None, low_priority: bool, profile: bool) -> None:
    # The worker's pid, not getppid(): the worker may have died while this process started.
    threading.Thread(target=_exit_with, args=(worker,), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    atexit.register(_end_now)
    if low_priority and sys.platform.startswith("linux"):
        os.setpriority(os.PRIO_PROCESS, 0, 10)  # as decode threads sharing the model's cores
    try:
        import torch

        torch.set_num_threads(1)  # one core per process: the resize's own threads would fight
    except ImportError:
        pass
    try:  # the worker owns the memory: its tracker, not this process's, may unlink it
        memory = SharedMemory(name=name, track=False)
    except TypeError:  # before Python 3.13, where attaching does not unlink it either
        memory = SharedMemory(name=name)
    _state.update(memory=memory, ring=np.ndarray(shape, dtype=np.uint8, buffer=memory.buf),
                  preprocess=preprocess, max_pixels=max_pixels, profile=profile)


def _end_now() -> None:
    """An exit handler: end without the interpreter's teardown (handlers registered after
    this one have run; those before it need not), which, torch's above all, took this
    process seconds at a low priority on a busy machine: its worker then waited past its
    engine's patience and was killed, leaving the pool's semaphores and ring to the resource
    tracker's warnings. multiprocessing has run its own exit handlers already."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _exit_with(parent: int) -> None:
    """End this process once its worker is gone: a worker killed with SIGKILL cannot shut its
    pool down, and the pool's processes would wait for work forever. (Not PDEATHSIG: that
    follows the thread that started the process, which need not live as long as the worker.)"""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _decode_chunk(tasks: list[tuple[int, Item, bytes | str | None]]
                  ) -> tuple[list[str | None], dict[str, float] | None]:
    """Per task: None where its pixels are in its slot, else why it has none; and the
    seconds per stage when profiling."""
    times = StageTimes() if _state["profile"] else OFF
    ring, results = _state["ring"], []
    for slot, item, data in tasks:
        pixels = load_pixels(item, _state["preprocess"], _state["max_pixels"], times, data=data)
        if isinstance(pixels, str):
            results.append(pixels)
        else:
            ring[slot] = pixels
            results.append(None)
    return results, (times.seconds if _state["profile"] else None)
