"""The local engine: one spawned worker process per device, shards pulled as workers free up.

A worker that dies is replaced and its shard retried, one image at a time, so that an image
that kills its decoder is found, recorded as an error and skipped: one poison file cannot stop
a run. The coordinator holds shard numbers, never item lists or tensors.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from imgfeat.engine.placement import Placement
from imgfeat.engine.retry import RetryPolicy
from imgfeat.engine.worker_process import worker_process_main
from imgfeat.errors import ImgfeatError, UsageError
from imgfeat.pipeline.device_worker import Task
from imgfeat.report.progress import Reporter
from imgfeat.store.layout import remove_temps_of
from imgfeat.store.remote import open_layout

OnCommit = Callable[[int, list | None], None]  # (shard, its entry in the store's record)


def ignore_commit(index: int, entry: list | None) -> None:
    pass


MAX_START_FAILURES = 3  # deaths of one device's worker before it is ready
POLL_S = 0.1
IDLE_POLL_S = 0.01


@dataclass
class _Slot:
    number: int
    placement: Placement
    process: mp.Process
    tasks: object
    current: object
    ready: bool = False
    task: Task | None = None
    done_rows: int = 0
    done_errors: int = 0
    start_failures: int = 0
    retired: bool = False

    @property
    def name(self) -> str:
        return f"{self.placement.device}#{self.number}" if self.placement.device == "cpu" \
            else self.placement.device


@dataclass
class Outcome:
    """What a run of the engine left undone (shard index -> why it failed), and, with
    --profile, each worker process's seconds per stage."""

    failed: dict[int, str] = field(default_factory=dict)
    stage_times: dict[int, dict[str, float]] = field(default_factory=dict)
    overflow_rows: int = 0  # rows stored with values beyond float16 (inf)


class LocalEngine:
    def __init__(self, placements: list[Placement], options, out: str,
                 remote: tuple[str, ...] = ()):
        """`remote`: URLs whose file systems workers make ready (worker_process_main)."""
        self._ctx = mp.get_context("spawn")
        self._remote = tuple(remote)
        self._results = self._ctx.Queue()
        self._options, self._out = options, out
        self._pids: list[int] = []
        self._slots = [self._spawn(i, p) for i, p in enumerate(placements)]
        self._policy = RetryPolicy()
        self.outcome = Outcome(failed=self._policy.failed)

    # -- workers -------------------------------------------------------------------------

    def _spawn(self, number: int, placement: Placement, start_failures: int = 0) -> _Slot:
        tasks = self._ctx.Queue()
        current = self._ctx.Value("q", -1, lock=False)
        # Not a daemon: a daemon may not start processes, and a worker decodes on processes
        # of its own (pipeline.decode_processes). stop() ends every worker; a killed
        # coordinator takes them along through PDEATHSIG (worker_process).
        process = self._ctx.Process(
            target=worker_process_main, name=f"imgfeat-worker-{number}", daemon=False,
            args=(number, placement, self._options, self._out, tasks, self._results, current,
                  self._remote))
        process.start()
        self._pids.append(process.pid)
        return _Slot(number, placement, process, tasks, current, start_failures=start_failures)

    def start(self) -> dict:
        """Wait until every worker has loaded the model; their common identity."""
        identities: dict[int, dict] = {}
        while len(identities) < len(self._slots):
            message = self._next_message()
            if message and message[0] == "fatal":
                raise UsageError(message[2])
            if message and message[0] == "ready":
                identities[message[1]] = message[2]
                self._slots[message[1]].ready = True
            for slot in self._slots:
                if not slot.ready and slot.process.exitcode is not None:
                    raise ImgfeatError(f"worker on {slot.placement.device} died while loading "
                                       f"the model ({describe_exit(slot.process.exitcode)})")
        first = identities[0]
        if any(identity != first for identity in identities.values()):
            raise ImgfeatError("workers disagree on the model they loaded; "
                               "use devices of one kind")
        return first

    def abandon(self) -> None:
        """End the workers of a run refused before its first shard: nothing of theirs to wait
        for or clean up. Safe after stop()."""
        for slot in self._slots:
            if slot.process.is_alive():
                slot.process.kill()
            slot.process.join()

    def stop(self, graceful: bool = True) -> None:
        for slot in self._slots:
            if graceful and slot.process.is_alive():
                slot.tasks.put(None)
        for slot in self._slots:
            slot.process.join(timeout=10 if graceful else 0.5)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
        storage_options = getattr(self._options, "storage_options", None)
        remove_temps_of(open_layout(self._out, storage_options, pulled=False), self._pids)

    # -- the run ---------------------------------------------------------------------------

    def run(self, stream, reporter: Reporter, skip: set[int],
            on_commit: OnCommit = ignore_commit) -> Outcome:
        """Extract every shard `stream` yields that is not in `skip`; `on_commit(index,
        entry)` for each shard committed (store/shard_counts.py)."""
        self._on_commit = on_commit
        waiting: deque[Task] = deque()
        while True:
            waiting.extend(Task(s.index) for s in stream.poll() if s.index not in skip)
            self._dispatch(waiting)
            busy = any(slot.task for slot in self._slots)
            if not busy and not waiting and stream.finished:
                return self.outcome
            if not any(not slot.retired for slot in self._slots):
                raise ImgfeatError("every worker failed to start; see the messages above")
            idle = any(s.ready and s.task is None and not s.retired for s in self._slots)
            # An idle worker waits on the planner: look for its next shard sooner.
            message = self._next_message(IDLE_POLL_S if idle and not stream.finished else POLL_S)
            if message:
                self._handle(message, reporter, waiting)
            self._check_deaths(reporter, waiting)

    def _dispatch(self, waiting: deque[Task]) -> None:
        for slot in self._slots:
            if waiting and slot.ready and slot.task is None and not slot.retired:
                slot.task = waiting.popleft()
                slot.done_rows = slot.done_errors = 0
                slot.tasks.put(slot.task)

    def _next_message(self, timeout: float = POLL_S):
        try:
            return self._results.get(timeout=timeout)
        except queue.Empty:
            return None

    def _handle(self, message, reporter: Reporter, waiting: deque[Task]) -> None:
        kind, number = message[0], message[1]
        slot = self._slots[number]
        if kind == "ready":
            slot.ready = True
        elif kind == "progress":
            slot.done_rows += message[2]
            slot.done_errors += message[3]
            reporter.advance(message[2], message[3], worker=slot.name)
        elif kind == "done":
            slot.task = None
            if message[5]:
                self.outcome.stage_times[slot.process.pid] = message[5]
            self.outcome.overflow_rows += message[6]
            self._on_commit(message[2], message[7])
        elif kind == "failed" and slot.task is not None:
            self._retry(slot, message[3], reporter, waiting)
        elif kind == "warn":
            reporter.warn(f"{slot.name}: {message[2]}")
        elif kind == "stop":  # a worker found that the run cannot go on
            raise UsageError(message[2])
        elif kind == "fatal":  # a replacement worker could not load the model
            slot.retired = True

    def _check_deaths(self, reporter: Reporter, waiting: deque[Task]) -> None:
        for number, slot in enumerate(self._slots):
            if slot.retired or slot.process.exitcode is None:
                continue
            reason = describe_exit(slot.process.exitcode)
            if slot.task is not None:
                self._retry(slot, reason, reporter, waiting)
            failures = slot.start_failures + (0 if slot.ready else 1)
            replacement = self._spawn(number, slot.placement, failures)
            replacement.retired = failures >= MAX_START_FAILURES
            self._slots[number] = replacement

    def _retry(self, slot: _Slot, reason: str, reporter: Reporter,
               waiting: deque[Task]) -> None:
        """Put the shard back: with the image being decoded excluded if there was one."""
        task, slot.task = slot.task, None
        reporter.advance(-slot.done_rows, -slot.done_errors, worker=slot.name)
        reporter.append_log(f"shard {task.index} failed on {slot.name} ({reason}); "
                            "retried one image at a time")
        retry = self._policy.after_death(task, slot.current.value, reason)
        if retry is not None:
            waiting.appendleft(retry)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"

