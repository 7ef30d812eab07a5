"""No cyclic garbage collection while HDF5 reads a shard on object storage.

Such a shard is an HDF5 file read through an fsspec file object (store/remote.py): HDF5 calls
back into Python for its bytes, holding h5py's global lock, and for an async file system
(s3fs, gcsfs, adlfs) the callback waits for fsspec's I/O thread. A cyclic collection that
frees an h5py object (a user's, or one in an exception's traceback) in the middle of that:

- on the I/O thread, needs h5py's lock: each thread waits on the other for ever (seen: the
  test suite hung in a whiten that read from S3; reproduced by tests/test_object_reading.py);
- on the reading thread, re-enters HDF5 from its own callback, which HDF5 does not promise to
  survive (not seen; a pause at the read alone would make it the rule).

So every h5py call on a store's shards runs with the collector paused (`paused`), and starts
only once a collection already running on another thread has ended (one that began before the
pause could still be freeing h5py objects). Collections that come due meanwhile run after the
call, outside HDF5. Reads themselves pause too (`PausedReads`), for a call this module's users
have not wrapped. Local shards need none of it (HDF5 reads them in C), but the pause costs
about 2 us (measured: a pause's start and end), against about 245 us to read one row of a
local shard, so the reader does not tell them apart.
"""

from __future__ import annotations

import functools
import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

_lock = threading.Lock()
_pausers = 0
_resume = False  # whether the collector was on when the first pauser paused it
_collections = threading.Condition()
_collecting: set[int] = set()  # threads inside a collection now


def _track(phase: str, info: dict, collections=_collections, collecting=_collecting,
           ident=threading.get_ident) -> None:
    # Bound as defaults: collections run while the interpreter ends, after module globals
    # are gone.
    with collections:
        if phase == "start":
            collecting.add(ident())
        else:
            collecting.discard(ident())
            collections.notify_all()


gc.callbacks.append(_track)


@contextmanager
def collection_paused(wait: bool = True) -> Iterator[None]:
    """The cyclic collector off while any thread is inside this block; as it was, after.
    With `wait`, the block starts once no other thread is collecting (not from inside an
    h5py call: that collection may need h5py's lock)."""
    global _pausers, _resume
    with _lock:
        if _pausers == 0:
            _resume = gc.isenabled()
            gc.disable()
        _pausers += 1
    try:
        if wait:
            me = threading.get_ident()
            with _collections:
                _collections.wait_for(lambda: not (_collecting - {me}))
        yield
    finally:
        with _lock:
            _pausers -= 1
            if _pausers == 0 and _resume:
                gc.enable()


F = TypeVar("F", bound=Callable)


def paused(function: F) -> F:
    """`function` run with the collector paused (see the module's note)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with collection_paused():
            return function(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


class PausedReads:
    """A file object for h5py whose reads pause the collector; all else is `handle`'s."""

    def __init__(self, handle):
        self._handle = handle

    def readinto(self, buffer) -> int:
        with collection_paused(wait=False):  # inside HDF5: it holds h5py's lock
            return self._handle.readinto(buffer)

    def read(self, size: int = -1) -> bytes:
        with collection_paused(wait=False):
            return self._handle.read(size)

    def __getattr__(self, name: str):
        return getattr(self._handle, name)
