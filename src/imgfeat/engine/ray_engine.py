"""The Ray engine: the local engine's worker code as Ray actors across a cluster, one per GPU
(or CPU worker), with shards as the tasks. The output folder must be one every node can reach.

Ray restarts an actor that dies (its process, or its node); the driver retries the shard it
held, one image at a time, as the local engine does. Which image a careful attempt was
decoding is written to a small file in the output folder, so the driver can read it even
when the actor's node is gone.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

from imgfeat.engine.local import OnCommit, Outcome, ignore_commit
from imgfeat.engine.placement import Placement
from imgfeat.engine.retry import RetryPolicy
from imgfeat.errors import ImgfeatError, UsageError
from imgfeat.pipeline.device_worker import Task
from imgfeat.report.progress import Reporter
from imgfeat.store.storage import filesystem, is_url, read_bytes, retrying

INSTALL_HINT = "the Ray engine needs Ray: pip install 'imgfeat[ray]'"
POLL_S = 0.2
PROGRESS_EVERY_S = 1.0
PROBE_EVERY_S = 0.5


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return ray


class PositionFile:
    """The position of the image a careful attempt is decoding, kept in a file beside the
    output's plan: -1 when none. On object storage (machines that share no file system) it is
    an object; only careful attempts, one image at a time after a death, write it."""

    def __init__(self, location: str, storage_options: dict | None = None):
        self.location, self._options = location, storage_options

    @property
    def value(self) -> int:
        try:
            return int(read_bytes(self.location, self._options).decode() or -1)
        except (OSError, ValueError):
            return -1

    @value.setter
    def value(self, position: int) -> None:
        if is_url(self.location):
            fs, path = filesystem(self.location, self._options)
            retrying(lambda: fs.pipe_file(path, str(position).encode()))
        else:
            Path(self.location).write_text(str(position))

    def clear(self) -> None:
        if is_url(self.location):
            fs, path = filesystem(self.location, self._options)
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path)
        else:
            Path(self.location).unlink(missing_ok=True)


def ray_placements(ray, devices: str, threads: int | None) -> list[Placement]:
    """One actor per GPU of the cluster, or `cpu:N` CPU actors."""
    spec = devices.strip().lower()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if spec in ("auto", "all", "cuda") and gpus:  # decode threads: 0 is per node, below
        return [Placement("cuda:0", torch_threads=4, decode_threads=threads or 0)] * gpus
    if spec in ("all", "cuda"):
        raise UsageError(f"--devices {spec}: the Ray cluster has no GPU")
    if spec in ("auto", "cpu") or spec.startswith("cpu:"):
        count = 1 if spec in ("auto", "cpu") else spec[4:]
        if not str(count).isdigit() or int(count) < 1:
            raise UsageError(f"--devices {spec}: write cpu:N with N >= 1 workers")
        share = max(1, (os.cpu_count() or 1) // int(count))
        return [Placement("cpu", torch_threads=share, decode_threads=threads or share)] \
            * int(count)
    raise UsageError(f"--devices {spec}: with --engine ray use auto, cuda (every GPU of the "
                     "cluster) or cpu:N")


def node_decode_threads(ray) -> int:
    """A GPU actor's decode threads: its node's CPUs divided by the node's GPUs, as Ray
    counts them (nodes of a cluster differ; the driver does not know where an actor lands)."""
    node = ray.get_runtime_context().get_node_id()
    resources = next((n.get("Resources", {}) for n in ray.nodes() if n.get("NodeID") == node),
                     {})
    cpus = resources.get("CPU") or os.cpu_count() or 1
    return max(1, int(cpus // max(1, resources.get("GPU", 1))))


def _actor_class(ray):
    @ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=2)
    class ImgfeatWorker:
        """A DeviceWorker in an actor; `progress` answers while `run` works (two threads)."""

        def __init__(self, placement: Placement, opts, out: str):
            from imgfeat.pipeline.device_worker import DeviceWorker

            if not placement.decode_threads:
                placement = replace(placement, decode_threads=node_decode_threads(ray))
            self.runner = DeviceWorker(placement, opts, out)
            self.storage_options = getattr(opts, "storage_options", None)
            self.counts = [0, 0]

        def identity(self) -> dict:
            return self.runner.identity()

        def progress(self) -> tuple[int, int]:
            return tuple(self.counts)

        def run(self, task: Task, position_path: str) -> tuple:
            self.counts = [0, 0]

            def progress(rows: int, errors: int) -> None:
                self.counts = [self.counts[0] + rows, self.counts[1] + errors]

            return self.runner.run(task, progress,
                                   PositionFile(position_path, self.storage_options))

    return ImgfeatWorker


class _Actor:
    def __init__(self, number: int, handle):
        self.number, self.handle = number, handle
        self.task: Task | None = None
        self.ref = None
        self.reported = (0, 0)
        self.alive = True
        self.probe = None  # an identity call, sent to learn when a restarted actor is back
        self.next_probe = 0.0

    def lost(self) -> None:
        """The actor died or is restarting: give it no work until it answers again."""
        self.alive, self.probe = False, None
        self.next_probe = time.monotonic() + PROBE_EVERY_S

    @property
    def name(self) -> str:
        return f"ray#{self.number}"


class RayEngine:
    def __init__(self, placements_for, opts, out: str, address: str = "auto"):
        self._ray = ray = import_ray()
        self._started_ray = _connect(ray, address)
        self._out = out
        self._storage_options = getattr(opts, "storage_options", None)
        placements = placements_for(ray)
        worker = _actor_class(ray)
        self._actors = [
            _Actor(i, worker.options(
                num_gpus=1 if p.device.startswith("cuda") else 0,
                num_cpus=0 if p.device.startswith("cuda") else p.torch_threads,
            ).remote(p, opts, out))
            for i, p in enumerate(placements)]
        self._policy = RetryPolicy()
        self.outcome = Outcome(failed=self._policy.failed)

    def start(self) -> dict:
        ray = self._ray
        try:
            identities = ray.get([a.handle.identity.remote() for a in self._actors])
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if hasattr(exc, "cause") else exc
            if isinstance(cause, UsageError):
                raise UsageError(str(cause)) from None
            raise ImgfeatError(f"a Ray worker failed to start: {_first_line(cause)}") from None
        if any(identity != identities[0] for identity in identities):
            raise ImgfeatError("Ray workers disagree on the model they loaded")
        return identities[0]

    def stop(self, graceful: bool = True) -> None:
        for actor in self._actors:
            self._ray.kill(actor.handle, no_restart=True)
        if self._started_ray:
            self._ray.shutdown()

    def run(self, stream, reporter: Reporter, skip: set[int],
            on_commit: OnCommit = ignore_commit) -> Outcome:
        """As the local engine's `run`."""
        self._on_commit = on_commit
        waiting: deque[Task] = deque()
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        while True:
            waiting.extend(Task(s.index) for s in stream.poll() if s.index not in skip)
            self._dispatch(waiting)
            busy = [a for a in self._actors if a.task is not None]
            if not busy and not waiting and stream.finished:
                return self.outcome
            ready, _ = self._ray.wait([a.ref for a in busy], num_returns=1, timeout=POLL_S) \
                if busy else ([], [])
            for actor in busy:
                if actor.ref in ready:
                    self._collect(actor, reporter, waiting)
            if time.monotonic() >= next_progress:
                self._poll_progress(reporter)
                next_progress = time.monotonic() + PROGRESS_EVERY_S

    def _dispatch(self, waiting: deque[Task]) -> None:
        for actor in self._actors:
            if waiting and actor.task is None and self._available(actor):
                actor.task = waiting.popleft()
                actor.reported = (0, 0)
                position = self._position_file(actor.task.index)
                position.value = -1
                actor.ref = actor.handle.run.remote(actor.task, position.location)

    def _available(self, actor: _Actor) -> bool:
        """Whether an actor can take work; a lost one is probed until Ray has restarted it."""
        if actor.alive:
            return True
        if actor.probe is None:
            if time.monotonic() >= actor.next_probe:
                actor.probe = actor.handle.identity.remote()
            return False
        ready, _ = self._ray.wait([actor.probe], timeout=0)
        if not ready:
            return False
        try:
            self._ray.get(actor.probe)
        except self._ray.exceptions.RayError:
            actor.lost()
            return False
        actor.alive, actor.probe = True, None
        return True

    def _position_file(self, index: int) -> PositionFile:
        name = f"plan/shard-{index:06d}.position"
        if is_url(self._out):
            return PositionFile(f"{self._out.rstrip('/')}/{name}", self._storage_options)
        return PositionFile(str(Path(self._out) / name))

    def _collect(self, actor: _Actor, reporter: Reporter, waiting: deque[Task]) -> None:
        ray = self._ray
        task, actor.task = actor.task, None
        try:
            index, rows, errors, times, overflow, entry = ray.get(actor.ref)
        except ray.exceptions.ActorUnavailableError:
            actor.lost()  # restarting: the shard never ran there, so it costs no attempt
            self._report(reporter, actor, 0, 0)
            waiting.appendleft(task)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError,
                ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError) as exc:
            if isinstance(getattr(exc, "cause", None), UsageError):  # the run must stop
                raise UsageError(str(exc.cause)) from None
            actor.lost()
            if isinstance(exc, ray.exceptions.RayTaskError):  # alive but maybe unusable
                ray.kill(actor.handle, no_restart=False)     # (a CUDA error): a fresh one
            self._report(reporter, actor, 0, 0)
            position = self._position_file(task.index)
            retry = self._policy.after_death(task, position.value, _reason(exc))
            if retry is not None:
                waiting.appendleft(retry)
            return
        actor.alive = True
        self._report(reporter, actor, rows, errors)
        self._position_file(task.index).clear()
        if times:
            self.outcome.stage_times[actor.number] = times
        self.outcome.overflow_rows += overflow
        self._on_commit(index, entry)

    def _poll_progress(self, reporter: Reporter) -> None:
        busy = [a for a in self._actors if a.task is not None]
        refs = [a.handle.progress.remote() for a in busy]
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=POLL_S)
        for actor, ref in zip(busy, refs):
            if ref in ready and actor.task is not None:
                try:
                    self._report(reporter, actor, *self._ray.get(ref))
                except self._ray.exceptions.RayError:
                    pass  # the shard's own call will tell what happened
        alive = sum(a.alive for a in self._actors)
        reporter.note(f"workers alive {alive}/{len(self._actors)}")

    @staticmethod
    def _report(reporter: Reporter, actor: _Actor, rows: int, errors: int) -> None:
        """Bring the reporter to (rows, errors) for this actor's shard: progress polls,
        the final count, or zero when the attempt died."""
        reporter.advance(rows - actor.reported[0], errors - actor.reported[1],
                         worker=actor.name)
        actor.reported = (rows, errors)


def _connect(ray, address: str) -> bool:
    """Join the cluster at `address` ('auto': a running one if any, else start one here).
    True if this call started Ray, so that stopping imgfeat stops it too."""
    if ray.is_initialized():
        return False
    options = {"logging_level": "WARNING", "log_to_driver": False}
    if address not in ("auto", "local"):
        try:
            ray.init(address=address, **options)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UsageError(f"cannot reach the Ray cluster at {address}: "
                             f"{_first_line(exc)}") from None
        return False
    if address == "auto":
        try:
            ray.init(address="auto", **options)
            return False
        except (ConnectionError, ValueError, RuntimeError):
            pass  # no running cluster: start one on this machine
    ray.init(include_dashboard=False, **options)
    return True


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__
