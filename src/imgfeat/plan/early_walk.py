"""The walk of a fresh plan, started while the workers load the model: the store it plans into
is opened only once the model is known, but listing a bucket or streaming its tars need not
wait for that. Items wait in a bounded queue until the planner takes them."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from imgfeat.sources.stream import Tally

AHEAD_SHARDS = 2  # items walked ahead of the planner, in shards: bounded memory
_END = object()


class EarlyWalk:
    """`items` walked on a thread into a queue of at most `limit` items."""

    def __init__(self, items: Iterator, tally: Tally, limit: int):
        self._tally = tally
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, limit))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._walk, args=(items,),
                                        name="imgfeat-walk", daemon=True)
        self._thread.start()

    def _walk(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put((item, self._tally.skipped)):
                    return
            self._put((_END, self._tally.skipped))
        except BaseException as exc:  # raised again where the planner takes items
            self._put((exc, 0))

    def _put(self, entry: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def items(self, tally: Tally) -> Iterator:
        """The walk's items in order; `tally` counts what the walk skipped up to each one (the
        plan records it per shard, so it must not run ahead with the walk)."""
        while True:
            value, tally.skipped = self._queue.get()
            if value is _END:
                return
            if isinstance(value, BaseException):
                raise value
            yield value

    def close(self) -> None:
        """Stop walking (the plan was not needed, or the run ended); safe to call twice. The
        thread ends before its next item; one waiting on a slow read is not waited for."""
        self._stop.set()
        self._thread.join(timeout=1.0)
