"""Shard streams tell an engine which shards exist so far: a finished plan, a planner still
walking the sources on a thread, or (on nodes other than the first) the plan files another
node writes. An engine polls a stream; it never waits on a listing."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from imgfeat.plan.shards import Shard, count_shard_items
from imgfeat.store.layout import Layout
from imgfeat.store.manifest import read_manifest
from imgfeat.store.remote import refresh


class FixedStream:
    """A plan recorded in full."""

    def __init__(self, shards: list[Shard]):
        self._pending = list(shards)
        self.shards = list(shards)
        self.finished = True

    def poll(self) -> list[Shard]:
        pending, self._pending = self._pending, []
        return pending


class PlannerStream:
    """Shards as a planner thread writes them, so extraction starts before listing ends."""

    def __init__(self, planner: Iterator[Shard], known: list[Shard] = ()):
        self.shards: list[Shard] = []
        self.finished = False
        self._queue: queue.Queue = queue.Queue()
        self._known = list(known)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(planner,),
                                        name="imgfeat-plan", daemon=True)
        self._thread.start()

    def _produce(self, planner: Iterator[Shard]) -> None:
        try:
            for shard in planner:
                self._queue.put(shard)
                if self._stop.is_set():  # the run was interrupted: stop listing
                    planner.close()
                    return
            self._queue.put(None)
        except BaseException as exc:  # raised again in the polling thread
            self._queue.put(exc)

    def stop(self) -> None:
        """Stop planning after the current shard (an interrupted run); safe to call twice."""
        self._stop.set()
        self._thread.join(timeout=30)

    def poll(self) -> list[Shard]:
        found, self._known = self._known, []
        while not self.finished:
            try:
                value = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(value, BaseException):
                raise value
            if value is None:
                self.finished = True
            else:
                found.append(value)
        self.shards.extend(found)
        return found


class FollowerStream:
    """The plan as another node writes it: plan files appear one by one, and the manifest
    says when the plan is complete."""

    def __init__(self, layout: Layout):
        self._layout = layout
        self.shards: list[Shard] = []
        self.finished = False
        self._total: int | None = None

    def poll(self) -> list[Shard]:
        refresh(self._layout)  # on object storage, the other node's files are in the bucket
        if self._total is None:
            plan = (read_manifest(self._layout) or {}).get("plan", {})
            if plan.get("complete"):
                self._total = len(plan["shards"])
        found = []
        while self._layout.plan_file(len(self.shards)).exists():
            index = len(self.shards)
            shard = Shard(index, count_shard_items(self._layout, index))
            self.shards.append(shard)
            found.append(shard)
        self.finished = self._total is not None and len(self.shards) >= self._total
        return found
