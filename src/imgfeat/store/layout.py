"""Where each part of an output folder lives, and how a file is written atomically."""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from imgfeat.store import faults

TEMP_MARK = ".tmp-"  # readers ignore any name containing it


# Staging folders of outputs on object storage, and where their files go (store/remote.py).
_REMOTES: dict[str, object] = {}


class Layout:
    """The paths of one output folder (format 1). With `remote` (a `store.remote.Remote`),
    the folder stages an output on object storage: each committed file is uploaded."""

    def __init__(self, root: str | os.PathLike, remote=None):
        self.root = Path(root)
        if remote is not None:
            _REMOTES[str(self.root)] = remote
        self.remote = _REMOTES.get(str(self.root))
        self.manifest = self.root / "manifest.json"
        self.plan_dir = self.root / "plan"
        self.shards_dir = self.root / "shards"
        self.features = self.root / "features.h5"
        self.key_index = self.plan_dir / "keys.sqlite"
        self.locks_dir = self.root / ".locks"  # never removed: see store/run_lock.py
        self.log = self.root / "imgfeat.log"  # appended by every run, kept by --overwrite
        self.index_dir = self.root / "index"
        self.row_index = self.index_dir / "rows.sqlite"  # see store/row_index.py

    def plan_file(self, index: int) -> Path:
        return self.plan_dir / f"shard-{index:06d}.jsonl"

    def shard_file(self, index: int) -> Path:
        return self.shards_dir / f"shard-{index:06d}.h5"

    def open_shard(self, index: int):
        """Shard `index` open for reading (an h5py.File): the file, or on object storage its
        object, read range by range as HDF5 asks (store/remote.py, `open_h5`)."""
        if self.remote is not None:
            return self.remote.open_h5(self._relative(self.shard_file(index)))
        from imgfeat.store.shard_cache import open_h5  # h5py: not for every user of paths

        return open_h5(self.shard_file(index))

    def shard_stamp(self, index: int, fresh: bool = False) -> str:
        """What changes when shard `index` is replaced: its size and modification time (on
        object storage, its size and ETag: from the last listing, or with `fresh` asked of
        the bucket now)."""
        if self.remote is not None:
            from imgfeat.store.remote import stamp

            return stamp(self.remote.info(self._relative(self.shard_file(index)), fresh))
        info = os.stat(self.shard_file(index))
        return f"{info.st_size}:{info.st_mtime_ns}"

    def shard_size(self, index: int) -> int:
        if self.remote is not None:
            return int(self.remote.info(self._relative(self.shard_file(index)))["size"])
        return self.shard_file(index).stat().st_size

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    @property
    def location(self) -> str:
        """Where the output is, as a user named it: the URL, or the folder."""
        return self.remote.url if self.remote is not None else str(self.root)

    def committed(self) -> set[int]:
        """Indices of the shards whose file exists under its final name (on object storage:
        whose object exists)."""
        if self.remote is not None:
            return _numbers(self.remote.names("shards"), ".h5")
        return _indices(self.shards_dir, ".h5")

    def planned(self) -> set[int]:
        """Indices of the shards whose plan file exists: the plan as it is on disk."""
        return _indices(self.plan_dir, ".jsonl")

    def own_paths(self) -> list[Path]:
        """Everything imgfeat writes here; --overwrite removes these and nothing else."""
        return [self.manifest, self.plan_dir, self.shards_dir, self.features, self.index_dir]

    def remove_own(self) -> None:
        """Delete what imgfeat wrote here, leaving any other file alone."""
        if self.remote is not None:
            self.remote.remove_own()
        for path in self.own_paths():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def _indices(folder: Path, suffix: str) -> set[int]:
    """N of each `shard-N<suffix>` in `folder`, temporary files aside: one listing."""
    if not folder.is_dir():
        return set()
    return _numbers(os.listdir(folder), suffix)


def _numbers(names, suffix: str) -> set[int]:
    found = set()
    for name in names:
        if name.startswith("shard-") and name.endswith(suffix) and TEMP_MARK not in name:
            number = name[len("shard-"):-len(suffix)]
            if number.isdigit():
                found.add(int(number))
    return found


def feature_datasets(layers) -> dict[str, str]:
    """Where each layer's features live, in a shard and in features.h5: /features for a single
    layer, else /features/<layer_dataset_name(layer)>."""
    layers = list(layers)
    if len(layers) == 1:
        return {layers[0]: "features"}
    return {layer: "features/" + layer_dataset_name(layer) for layer in layers}


def layer_dataset_name(layer: str) -> str:
    """A layer name as one HDF5 link name under /features: percent-encoding of '%', of '/'
    (HDF5's separator) and of a name that is only '.' (HDF5 reads it as the group itself);
    every other character is kept. '%' is escaped too, so urllib.parse.unquote undoes it;
    '%' and '/' are escaped as in stores written before '.' was, so theirs keep their names."""
    if layer == ".":
        return "%2E"
    return layer.replace("%", "%25").replace("/", "%2F")


def temp_path(final: Path) -> Path:
    """A unique temporary name beside `final`, so the rename that commits it is atomic. It
    names the host and process, so leftovers of a killed process can be told apart."""
    return final.with_name(
        f".{final.name}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_temps_of(layout: Layout, pids: list[int] | None = None,
                    remote_after_s: float | None = None, busy_hosts=frozenset()) -> None:
    """Delete temporary files this host's processes left: those of `pids`, or (None) of any
    process of this host that is no longer running. With `remote_after_s`, also those of
    other hosts not in `busy_hosts` (hosts with a live lease) untouched for that long: a
    live writer's temporary file grows with every batch."""
    host = socket.gethostname()
    now = time.time()
    for folder in (layout.shards_dir, layout.plan_dir, layout.root):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            owner = path.name.partition(TEMP_MARK)[2]
            if not owner:
                continue
            if not owner.startswith(host + "-"):
                if remote_after_s is not None and _host_of(owner) not in busy_hosts \
                        and _age(path, now) > remote_after_s:
                    path.unlink(missing_ok=True)
                continue
            pid = owner[len(host) + 1:].split("-")[0]
            if pid.isdigit() and (int(pid) in pids if pids is not None
                                  else not pid_running(int(pid))):
                path.unlink(missing_ok=True)


def _host_of(owner: str) -> str:
    """The host of a temporary name's `HOST-PID-UUID` (a host name may hold '-')."""
    return owner.rsplit("-", 2)[0]


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0


def pid_running(pid: int) -> bool:
    """Whether process `pid` of this host is alive (one we may not signal is)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def commit(temp: Path, final: Path) -> None:
    """Make a fully written temporary file visible under its final name, durably."""
    with open(temp, "rb+") as handle:
        os.fsync(handle.fileno())
    kind, root = faults.kind_of(final), faults.root_of(final)
    faults.point(kind + "-temp", root)
    os.replace(temp, final)
    fsync_folder(final.parent)
    if (remote := _REMOTES.get(str(root))) is not None:
        remote.publish(final, final.relative_to(root).as_posix())
        if kind == "shard":  # in the bucket now: staging holds the plan, not the features
            final.unlink()
    faults.point(kind, root)


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(final: Path, data: bytes) -> None:
    temp = temp_path(final)
    try:
        temp.write_bytes(data)
        commit(temp, final)
    finally:
        temp.unlink(missing_ok=True)
