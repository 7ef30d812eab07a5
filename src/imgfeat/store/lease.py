"""The lease: one run per output folder, across hosts. The flock of store/run_lock.py is exact
on one host but says nothing across NFS clients (and some NFS mounts have no locks at all), so
each node of a run also holds a lease file, `OUT/.locks/lease-node-R.json`, naming its host,
pid, run id and a heartbeat the running process refreshes.

A run refuses to start while another run's lease is alive, naming its holder. A lease is gone
when its host is this host and its process is not running, or when its heartbeat is older than
STALE_S (minutes: a holder on another host cannot be asked). A gone lease is taken over with a
notice. The nodes of one multi-node run share one run id (plan/nodes.py, `run_id`), so they
never refuse each other.

Creating a lease is atomic on NFS too: the record is written under a temporary name and linked
to the lease name (link fails if the name exists). Taking over renames the old lease away
first, which only one of several takers can do (`LocalLeases`). The same protocol runs on
objects of a bucket, with conditional writes in place of link and rename
(store/object_lease.py)."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from imgfeat.errors import UsageError
from imgfeat.store.layout import Layout, pid_running

HEARTBEAT_S = float(os.environ.get("IMGFEAT_LEASE_HEARTBEAT_S", "30"))
STALE_S = float(os.environ.get("IMGFEAT_LEASE_STALE_S", "300"))


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    run: str
    node: int
    heartbeat: float

    def describe(self) -> str:
        age = max(0.0, time.time() - self.heartbeat)
        return (f"run {self.run}, node {self.node}, on {self.host} pid {self.pid}, "
                f"heartbeat {age:.0f}s ago")

    def gone(self) -> str | None:
        """Why this holder is no longer at work, or None while it may be."""
        if self.host == socket.gethostname() and not pid_running(self.pid):
            return "its process is no longer running"
        age = time.time() - self.heartbeat
        if age > STALE_S:
            return f"its heartbeat stopped {age:.0f}s ago"
        return None

    def is_me(self) -> bool:
        return self.host == socket.gethostname() and self.pid == os.getpid()


class Lease:
    """This node's lease on an output folder, for run `run` (see plan/nodes.py, `run_id`):
    a file of `OUT/.locks`, or with `leases` another place for them (store/object_lease.py:
    objects of an output on object storage, shared by every machine)."""

    def __init__(self, layout: Layout, run: str, rank: int, leases=None):
        self._run, self._rank = run, rank
        self._leases = leases or LocalLeases(layout.locks_dir, str(layout.root))
        self._where = self._leases.where
        self.name = f"lease-node-{rank}.json"
        self.path = layout.locks_dir / self.name  # of the local kind
        self._version = None  # what the place said of our lease when we last wrote it
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self, overwrite: bool = False) -> None:
        """Hold this node's lease, and make sure no other run holds one; start heartbeats."""
        if self._beat is not None:
            return
        self._leases.prepare()
        self._claim()
        try:
            self._check_others(overwrite)
        except UsageError:
            self._drop()
            raise
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeats, name="imgfeat-lease",
                                      daemon=True)
        self._beat.start()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        self._drop()

    def _record(self) -> Holder:
        return Holder(socket.gethostname(), os.getpid(), self._run, self._rank, time.time())

    def _claim(self) -> None:
        for _ in range(3):
            if (version := self._leases.create(self.name, self._record())) is not None:
                self._version = version
                return
            holder, version = self._leases.read(self.name)
            if holder is not None and holder.is_me():
                self._version = version
                return
            why = "its record is unreadable" if holder is None else holder.gone()
            if why is None:
                raise self._busy(holder, "a second run would duplicate its work")
            taken = self._leases.take_over(self.name, holder, version, self._record())
            if taken is not None:
                print(f"imgfeat: taking over {self._where} from "
                      f"{holder.describe() if holder else self.name}: {why}",
                      file=sys.stderr)
                self._version = taken
                return
        raise UsageError(f"{self.name} of {self._where} keeps changing: another run is "
                         "starting there; start one run at a time")

    def _check_others(self, overwrite: bool) -> None:
        for name in self._leases.names():
            holder = self._leases.read(name)[0] if name != self.name else None
            if holder is None or holder.run == self._run or holder.gone():
                continue
            raise self._busy(holder, "--overwrite would delete its files" if overwrite
                             else "a second run would duplicate its work")

    def _busy(self, holder: Holder, why: str) -> UsageError:
        return UsageError(f"another imgfeat run ({holder.describe()}) is writing "
                          f"{self._where}; {why}: wait for it to end or stop it first (a "
                          f"run that died elsewhere loses its lease {STALE_S:.0f}s after its "
                          "last heartbeat)")

    def _heartbeats(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                version = self._leases.refresh(self.name, self._version, self._record())
            except Exception as exc:  # a failed beat: the next may pass, long before STALE_S
                print(f"imgfeat: warning: the lease on {self._where} could not be refreshed "
                      f"({type(exc).__name__}: {exc})", file=sys.stderr)
                continue
            if version is None:
                holder = self._leases.read(self.name)[0]
                print(f"imgfeat: warning: the lease on {self._where} was taken over "
                      f"({holder.describe() if holder else 'removed'})", file=sys.stderr)
                return
            self._version = version

    def _drop(self) -> None:
        self._leases.remove(self.name)


class LocalLeases:
    """Leases as files of a folder (`OUT/.locks`): created by a link, which fails if the name
    exists (on NFS too); taken over by renaming the old one away, which only one taker can.
    A lease's version is its record."""

    def __init__(self, folder: Path, where: str):
        self.folder, self.where = folder, where

    def prepare(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def create(self, name: str, holder: Holder) -> Holder | None:
        return holder if _create(self.folder / name, holder) else None

    def read(self, name: str) -> tuple[Holder | None, Holder | None]:
        holder = read_holder(self.folder / name)
        return holder, holder

    def take_over(self, name: str, old: Holder | None, version, new: Holder) -> Holder | None:
        if not _remove(self.folder / name, old):
            return None
        return self.create(name, new)

    def refresh(self, name: str, version, new: Holder) -> Holder | None:
        holder = read_holder(self.folder / name)
        if holder is None or not holder.is_me():
            return None
        _write(self.folder / name, new)
        return new

    def remove(self, name: str) -> None:
        holder = read_holder(self.folder / name)
        if holder is not None and holder.is_me():
            _remove(self.folder / name, holder)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.folder.glob("lease-node-*.json"))


def read_holder(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def live_holders(layout: Layout) -> list[Holder]:
    """Every lease of the folder whose holder may still be at work."""
    if not layout.locks_dir.is_dir():
        return []
    found = (read_holder(p) for p in sorted(layout.locks_dir.glob("lease-node-*.json")))
    return [h for h in found if h is not None and h.gone() is None]


def _create(path: Path, holder: Holder) -> bool:
    """Write `holder` as the lease at `path` unless one is there; whether it was created."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temp.write_text(json.dumps(asdict(holder)), encoding="utf-8")
    try:
        os.link(temp, path)
        return True
    except FileExistsError:
        return False
    finally:
        temp.unlink(missing_ok=True)


def _write(path: Path, holder: Holder) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temp.write_text(json.dumps(asdict(holder)), encoding="utf-8")
    os.replace(temp, path)


def _remove(path: Path, expected: Holder | None = None) -> bool:
    """Remove the lease `expected` (any, if None); renamed away first, so that of two takers
    only one removes it. A lease that turns out to be another (a taker was faster) is put
    back; False then."""
    away = path.with_name(f".{path.name}.gone-{uuid.uuid4().hex}")
    try:
        os.rename(path, away)
    except FileNotFoundError:
        return False
    try:
        if expected is not None and read_holder(away) != expected:
            try:
                os.link(away, path)
            except FileExistsError:
                pass
            return False
        return True
    finally:
        away.unlink(missing_ok=True)
