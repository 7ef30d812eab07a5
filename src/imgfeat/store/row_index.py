"""The store's index, in SQLite beside the shards (`OUT/index/rows.sqlite`): the row and error
counts of every committed shard, and, once a key is looked up, every key's shard and row.

Why SQLite: it is in the standard library, it is an on-disk B-tree whose page cache is bounded
(so a lookup in a hundred million keys costs a few pages, not 150 bytes a key in memory), it
survives a crash mid-update (a transaction per shard), and several readers may share it. The
plan's key index (`plan/keys.sqlite`) is the same kind of file.

A shard is immutable once committed, but `--overwrite` replaces a store's shards: each indexed
shard is recorded with a stamp of its file (size and modification time; for an object, size
and ETag: `Layout.shard_stamp`) and indexed again if it changed. A shard not indexed yet is
counted from the store's own record of counts where that record's stamp is the shard's
(store/shard_counts.py): a first open of a big store on object storage reads a few small
files, not every shard's header. A folder that cannot be
written (a read-only copy, a full disk) gets a private index in a temporary file that lives
as long as the reader. A store on object storage keeps its index in this machine's cache
folder for it (store/remote.py, `open_for_reading`)."""

from __future__ import annotations

import functools
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import h5py

from imgfeat.store.paused_collection import paused

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS shards (shard INTEGER PRIMARY KEY, stamp TEXT, rows INT, "
    "errors INT, identity TEXT, overflow INT, keyed INT DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, shard INT, row INT) WITHOUT ROWID",
)
KEY_BATCH = 65_536
COMMIT_KEYS = 1_000_000


def _serialised(method):
    """One call at a time: a Store may be read from several threads (the page's server)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class RowIndex:
    """`counts(shards)` and `find(key)` over the shards of one store, stamped by
    `stamp_of(i)` and read through `open_shard(i)` (the reader's cache of open files). Safe to
    share between threads."""

    def __init__(self, path: Path, stamp_of: Callable[[int], str],
                 open_shard: Callable[[int], h5py.File],
                 recorded: Callable[[], dict[int, list[list]]] = dict):
        self._stamp_of, self._open_shard = stamp_of, open_shard
        self._recorded_of = recorded  # the store's own record (store/shard_counts.py)
        self._recorded: dict[int, list[list]] | None = None  # read once, when first needed
        self._private: tempfile.TemporaryDirectory | None = None
        self._stamps: dict[int, str] = {}
        self._all_keyed = False  # set once every shard of this reader's store is keyed
        self._lock = threading.RLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._connect(path)
        except (OSError, sqlite3.Error):
            self._private = tempfile.TemporaryDirectory(prefix="imgfeat-index-")
            self._db = self._connect(Path(self._private.name) / "rows.sqlite")

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, timeout=60, check_same_thread=False)  # _serialised
        try:
            db.execute("BEGIN IMMEDIATE")  # a folder where SQLite cannot lock (NFS without a
            for statement in SCHEMA:       # lock daemon) fails here, not halfway through
                db.execute(statement)
            db.commit()
        except sqlite3.Error:
            db.close()
            raise
        return db

    @_serialised
    def counts(self, shards: Iterable[int]) -> dict[int, tuple[int, int]]:
        """{shard: (rows, errors)}, reading only shards not indexed yet (or changed since)."""
        known = {s: (st, r, e) for s, st, r, e in
                 self._db.execute("SELECT shard, stamp, rows, errors FROM shards")}
        found, fresh, stale = {}, [], []
        for index in shards:
            now = self._stamp(index)
            entry = known.get(index)
            if entry is None or entry[0] != now:
                if entry is not None:
                    stale.append((index,))
                fresh.append(self._read(index, now))
                entry = fresh[-1][1:4]
            found[index] = entry[1:]
        with self._db:  # one transaction: a commit costs an fsync
            self._db.executemany("DELETE FROM keys WHERE shard = ?", stale)  # --overwrite
            self._db.executemany("INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?, ?, ?, 0)",
                                 fresh)
        return found

    @paused
    def _read(self, index: int, stamp: str) -> tuple:
        """(index, stamp, rows, errors, identity, overflow rows) of a shard not indexed yet:
        from the store's record if it counted this very file (same stamp), else its header."""
        if self._recorded is None:
            self._recorded = self._recorded_of()
        for rows, errors, overflow, recorded_stamp, identity in self._recorded.get(index, ()):
            if recorded_stamp == stamp:
                return index, stamp, rows, errors, identity, overflow
        shard = self._open_shard(index)
        return (index, stamp, shard["keys"].shape[0], shard["errors/keys"].shape[0],
                shard.attrs.get("identity"), int(shard.attrs.get("float16_overflow_rows", 0)))

    @_serialised
    def foreign(self, shards: Iterable[int], identity: str) -> list[int]:
        """Indexed shards among `shards` that record another identity digest than `identity`
        (shards written before digests were recorded have none, and pass)."""
        wanted = set(shards)
        return sorted(s for s, found in
                      self._db.execute("SELECT shard, identity FROM shards")
                      if s in wanted and found is not None and found != identity)

    @_serialised
    def overflow_rows(self, shards: Iterable[int]) -> int:
        """Rows stored with values beyond float16 (inf) in the indexed `shards`."""
        wanted = set(shards)
        return sum(n for s, n in self._db.execute("SELECT shard, overflow FROM shards")
                   if s in wanted and n)

    @_serialised
    def find(self, key: str, shards: Iterable[int]) -> tuple[int, int] | None:
        """(shard, row within it) of `key` among `shards`, indexing their keys first."""
        self._index_keys(shards)
        hit = self._db.execute("SELECT shard, row FROM keys WHERE key = ?", (key,)).fetchone()
        return None if hit is None else (hit[0], hit[1])

    def _index_keys(self, shards: Iterable[int]) -> None:
        if self._all_keyed:
            return
        shards = list(shards)
        self.counts(shards)  # a changed shard is reset (keyed = 0) first
        keyed = {s for (s,) in self._db.execute("SELECT shard FROM shards WHERE keyed = 1")}
        pending = 0
        for index in shards:
            if index not in keyed:
                pending += self._add_keys(index)
            if pending >= COMMIT_KEYS:  # a crash loses the uncommitted shards' keys only:
                self._db.commit()      # they are still marked unkeyed
                pending = 0
        self._db.commit()
        self._all_keyed = True

    @paused
    def _add_keys(self, index: int) -> int:
        keys = self._open_shard(index)["keys"]
        for start in range(0, keys.shape[0], KEY_BATCH):
            names = keys.asstr()[start:start + KEY_BATCH]
            self._db.executemany("INSERT OR IGNORE INTO keys VALUES (?, ?, ?)",
                                 ((k, index, start + i) for i, k in enumerate(names)))
        self._db.execute("UPDATE shards SET keyed = 1 WHERE shard = ?", (index,))
        return keys.shape[0]

    def _stamp(self, index: int) -> str:
        if index not in self._stamps:
            self._stamps[index] = self._stamp_of(index)
        return self._stamps[index]

    @_serialised
    def close(self) -> None:
        self._db.close()
        if self._private is not None:
            self._private.cleanup()
