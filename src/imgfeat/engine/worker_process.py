"""The local engine's worker process: it sets up its device's worker (the model loaded once),
then runs the shards its engine sends until told to stop, or until its parent dies."""

from __future__ import annotations

import atexit
import os
import queue
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path

from imgfeat.engine.placement import Placement, own_device_only
from imgfeat.errors import UsageError
from imgfeat.pipeline.device_worker import DeviceWorker, Task
from imgfeat.store.storage import warm_up

PARENT_CHECK_S = 1.0


def worker_process_main(slot: int, placement: Placement, opts, out: str, tasks, results,
                current, remote: tuple[str, ...] = ()) -> None:
    """Entry point of a spawned worker process of the local engine. `remote`: a URL of each
    remote file system the shards will read, made ready while the first shard is planned."""
    placement = own_device_only(placement)  # first: before anything can start CUDA
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    try:
        runner = DeviceWorker(placement, opts, out)
    except UsageError as exc:
        results.put(("fatal", slot, str(exc)))
        return
    _warnings_to(results, slot)
    results.put(("ready", slot, runner.identity()))
    if remote:
        threading.Thread(target=warm_up, args=(list(remote), opts.storage_options),
                         name="imgfeat-warm-up", daemon=True).start()
    parent = os.getppid()

    def progress(rows: int, errors: int) -> None:
        results.put(("progress", slot, rows, errors))

    while (task := _next_task(tasks, parent)) is not None:
        try:
            done = runner.run(task, progress, current)
        except UsageError as exc:  # the run must stop (e.g. float16 overflow in a first shard)
            results.put(("stop", slot, str(exc)))
            sys.exit(1)
        except BaseException:  # any failure here is the shard's: report it, let a new
            results.put(("failed", slot, task.index, _last_line(traceback.format_exc())))
            sys.exit(1)         # process retry it (a CUDA error leaves this one unusable)
        results.put(("done", slot, *done))
    runner.close()
    _exit_now(results)


def _exit_now(results) -> None:
    """End without the interpreter's teardown of every object, which (torch's above all) kept
    every run waiting about a second for its workers. What must outlive the process is done
    first: the messages to the coordinator and the standard streams flushed, and the exit
    handlers run (multiprocessing's unlink the decode pool's named semaphores: skipped, they
    were left in /dev/shm)."""
    results.close()
    results.join_thread()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _warnings_to(results, slot: int) -> None:
    """Python warnings of this worker go to the coordinator, which prints them above the
    progress bar and logs them (a worker writing to the terminal would garble the bar)."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        results.put(("warn", slot, f"{category.__name__}: {message} ({Path(filename).name}"
                                   f":{lineno})"))

    warnings.showwarning = show


def _next_task(tasks, parent: int) -> Task | None:
    while True:
        try:
            return tasks.get(timeout=PARENT_CHECK_S)
        except queue.Empty:
            if os.getppid() != parent:  # orphaned: the coordinator is gone
                return None


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (kill -9 of the coordinator)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "unknown error"
