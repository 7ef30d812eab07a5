"""One run per output folder and node. Two runs writing one folder duplicate work, and a second
run with --overwrite would delete files under the first.

Across hosts a flock proves nothing (NFS clients, mounts without locks): each node also holds a
lease in the folder, with a heartbeat (store/lease.py); this lock takes both. For an output on
object storage the folder is this machine's staging folder, so each node also holds a lease
in the bucket (store/object_lease.py), where every machine sees it.

A run holds an exclusive flock on `OUT/.locks/node-R.lock` while it works. The kernel drops the
lock when the process ends, however it ends (kill -9 included), so a lock never goes stale and a
rerun after a crash is never refused. The lock files are left in place: deleting one that
another process holds would let a third run take a fresh lock beside it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from pathlib import Path

from imgfeat.errors import UsageError
from imgfeat.store import object_lease
from imgfeat.store.layout import Layout
from imgfeat.store.lease import Lease

_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}  # e.g. NFS without a lock daemon


class RunLock:
    def __init__(self, layout: Layout, rank: int, run: str):
        self._layout, self._rank = layout, rank
        self._lease = Lease(layout, run, rank)
        # an output on object storage: a lease in the bucket too, seen by every machine
        leases = object_lease.for_remote(layout.remote)
        self._bucket = Lease(layout, run, rank, leases) if leases is not None else None
        self._fd: int | None = None
        self._held = False

    def acquire(self, overwrite: bool = False) -> None:
        """Take this node's lock (once); with `overwrite`, first make sure no node's run is at
        work."""
        if self._held:
            return
        self._layout.locks_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for path in sorted(self._layout.locks_dir.glob("node-*.lock")):
                if path != self._path:
                    self._release(self._take(path, "--overwrite would delete its files"))
        self._fd = self._take(self._path, "a second run would duplicate its work")
        try:  # across hosts, the flock says nothing: the lease does (store/lease.py)
            self._lease.acquire(overwrite)
            if self._bucket is not None:
                self._bucket.acquire(overwrite)
        except BaseException:
            self.release()
            raise
        self._held = True

    def release(self) -> None:
        if self._bucket is not None:
            self._bucket.release()
        self._lease.release()
        self._release(self._fd)
        self._fd, self._held = None, False

    @property
    def _path(self) -> Path:
        return self._layout.locks_dir / f"node-{self._rank}.lock"

    def _take(self, path: Path, why: str) -> int | None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            node = path.stem.partition("-")[2]
            raise UsageError(f"another imgfeat run (node {node}) is writing {self._layout.root}; "
                             f"{why}: wait for it to end or stop it first") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_LOCKS:
                raise
            print(f"imgfeat: warning: {self._layout.root} cannot be locked ({exc.strerror}); "
                  "make sure no other run writes it", file=sys.stderr)
            return None
        return fd

    @staticmethod
    def _release(fd: int | None) -> None:
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the flock
