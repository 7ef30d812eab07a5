"""A small cache of open shard files. A store may hold any number of shards; keeping each one
open would exhaust the process's file descriptors (`ulimit -n`) long before a hundred million
rows, so at most `capacity` stay open and the least recently used is closed first.

HDF5's file locking makes every open fail on NFS without lock daemons, and imgfeat's files need
none (a shard is written once under a temporary name, immutable once renamed). Files imgfeat
writes are opened without it. Files it reads are opened with HDF5's default first, and without
locking only where locking fails: HDF5 refuses to open one file twice in a process with
different locking flags, and a user reading features.h5 with h5py beside a `Store` (its virtual
datasets open the same shards) opens them with the default."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable

import h5py

from imgfeat.store.paused_collection import paused

DEFAULT_CAPACITY = 32


def open_h5(path: str | os.PathLike, mode: str = "r") -> h5py.File:
    """An HDF5 file opened for writing without file locking, or for reading with it where the
    file system allows (see the module's note)."""
    if mode != "r":
        return h5py.File(path, mode, locking=False)
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if "lock" not in str(exc).lower():
            raise
        return h5py.File(path, "r", locking=False)


class ShardCache:
    """`get(index)` is the open shard `index`, opened by `open_shard(index)` (a file, or an
    object on object storage: `Layout.open_shard`)."""

    def __init__(self, open_shard: Callable[[int], h5py.File],
                 capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError("a shard cache holds at least one file")
        self._open_shard, self._capacity = open_shard, capacity
        self._open: OrderedDict[int, h5py.File] = OrderedDict()
        self._lock = threading.Lock()  # a Store may be read from several threads

    @paused  # opening and closing read the file
    def get(self, index: int) -> h5py.File:
        with self._lock:
            handle = self._open.get(index)
            if handle is not None:
                self._open.move_to_end(index)
                return handle
            while len(self._open) >= self._capacity:
                self._open.popitem(last=False)[1].close()
            handle = self._open[index] = self._open_shard(index)
            return handle

    def __len__(self) -> int:
        return len(self._open)

    @paused
    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()
