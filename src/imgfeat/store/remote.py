"""An output on object storage (`-o s3://bucket/feats/`, any fsspec URL).

Every file is written as for a local folder, in a staging folder on this machine, and then
uploaded under the same relative name (`publish`): one PUT, or a multipart upload that
completes, so the object appears whole or not at all. A shard is committed when its object
appears under its final name; its local copy is then removed, so staging holds at most a
shard per worker. The plan files and the manifest are kept in staging too: they are the
machine's copy of the store's plan, made again from the bucket when a run starts (`pull`).

A run's lock (`store/run_lock.py`) guards the staging folder, that is one machine, and, on
S3 (s3fs), a lease per node in the bucket (`locks/`, store/object_lease.py: conditional
writes), so that a second run on the same URL from another machine is refused while nodes of
one run share it. Other object stores have no such lease: there, two machines must not run
on one output URL at once unless they are nodes of one run (`--num-nodes`, or Ray's actors).

Reading (`open_for_reading`) downloads only the small files (manifest, plan files, a
whitening): shards are read from the bucket on demand, range by range (`Remote.open_h5`),
and the reader's row index lives in a local cache folder, its shards stamped with their
objects' size and ETag (`Remote.info`). A first open counts rows from the store's record of
shard counts (store/shard_counts.py), reading a shard's header only where the record lacks
it or names another object (another ETag). A store may be hundreds of GB; reading a row costs
about one chunk of its shard (see READ_AHEAD).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import h5py

from imgfeat.errors import UsageError
from imgfeat.store import storage
from imgfeat.store.layout import Layout
from imgfeat.store.paused_collection import PausedReads

_OWN = ("manifest.json", "plan", "shards")
LOG = "imgfeat.log"  # uploaded when a run ends; kept by --overwrite, as in a local folder
_KEPT = (LOG, "whitening.npz", "locks")  # ours too, though --overwrite leaves them (the run
# that overwrites holds its lease in locks/: store/object_lease.py): not foreign

# Shards are read on demand through fsspec's read-ahead cache: a read it does not hold is one
# ranged GET of what HDF5 asked for plus READ_AHEAD bytes. HDF5 asks for whole chunks of
# features (about 1 MiB: store/writer.py, CHUNK_BYTES) and for small pieces of metadata
# (object headers, B-tree nodes) that its own cache keeps; so a chunk costs one GET, and a
# shard's row counts (the row index) two small ones. Measured on a 17 MB shard of 4,000 rows
# (moto): counts 2 GETs, 0.26 MB; one row 2 GETs, 1.3 MB; a full scan 20 GETs, 17.4 MB.
# Fixed blocks fetch more: 1 MiB blocks cost 2.1 MB for the counts and 3.2 MB for a row;
# 256 KiB blocks cut a chunk into 4 GETs one after another. s3fs's default (50 MiB ahead)
# would download a whole shard for one row. Memory: one buffer of a chunk or so per open
# shard, 32 open at most (store/shard_cache.py).
READ_AHEAD = 128 << 10
FETCH_BATCH = 64  # plan files downloaded at once (`Remote.fetch_all`)


def staging_folder(url: str, purpose: str = "run") -> Path:
    """This machine's folder for the output `url` (IMGFEAT_STAGING moves them all)."""
    base = os.environ.get("IMGFEAT_STAGING") or os.path.join(
        os.path.expanduser("~"), ".cache", "imgfeat", "staging")
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return Path(base) / f"{purpose}-{digest}"


class Remote:
    """The bucket side of one output: where each staged file goes."""

    def __init__(self, url: str, storage_options: dict | None):
        self.url = url.rstrip("/")
        self.options = storage_options
        self.fs, self.root = storage.filesystem(self.url, storage_options)
        self.root = self.root.rstrip("/")
        self._listed: dict[str, dict[str, dict]] = {}  # folder: {name: its last listed info}

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def publish(self, local: Path, relative: str) -> None:
        storage.retrying(lambda: self.fs.put_file(str(local), self.path(relative)))

    def fetch(self, relative: str, local: Path) -> bool:
        """Download one file if it is there; False if it is not."""
        local.parent.mkdir(parents=True, exist_ok=True)
        temp = local.with_name(f".{local.name}.download-{os.getpid()}")
        try:
            storage.retrying(lambda: self.fs.get_file(self.path(relative), str(temp)))
        except FileNotFoundError:
            return False
        os.replace(temp, local)
        return True

    def fetch_all(self, relatives: list[str], root: Path) -> None:
        """Download many small files (plan files) to `root`, FETCH_BATCH at once through
        fsspec's concurrent `cat`: one after another, 10,000 of them take minutes. A file that
        failed in a batch is fetched alone (retried, or skipped if it is gone)."""
        for start in range(0, len(relatives), FETCH_BATCH):
            batch = relatives[start:start + FETCH_BATCH]
            found = self.fs.cat([self.path(r) for r in batch], on_error="return")
            for relative in batch:
                data = found.get(self.path(relative))
                if not isinstance(data, bytes):
                    self.fetch(relative, root / relative)
                    continue
                local = root / relative
                local.parent.mkdir(parents=True, exist_ok=True)
                temp = local.with_name(f".{local.name}.download-{os.getpid()}")
                temp.write_bytes(data)
                os.replace(temp, local)

    def names(self, folder: str = "") -> list[str]:
        """Names directly in `folder` (relative), [] when there is none."""
        where = self.path(folder) if folder else self.root
        try:
            found = storage.listing(self.fs, where)
        except FileNotFoundError:
            found = []
        listed = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry for entry in found}
        self._listed[folder] = listed  # one listing gives every shard's stamp (`info`)
        return sorted(listed)

    def listed(self, folder: str) -> list[str] | None:
        """The names of `folder`'s last listing (`names`), None if never listed."""
        found = self._listed.get(folder)
        return None if found is None else sorted(found)

    def info(self, relative: str, fresh: bool = False) -> dict:
        """What the last listing of its folder said of an object (else, or with `fresh`, the
        bucket now: one HEAD)."""
        folder, _, name = relative.rpartition("/")
        if fresh:  # fsspec's listings cache may hold what was there before
            self.fs.invalidate_cache(self.path(relative))
        entry = None if fresh else self._listed.get(folder, {}).get(name)
        return entry or storage.retrying(lambda: self.fs.info(self.path(relative)))

    def open_h5(self, relative: str) -> h5py.File:
        """The HDF5 file `relative`, read from its object as HDF5 asks (see READ_AHEAD)."""
        # s3fs takes the object's size from the listing `names` made (fsspec's listings
        # cache), so an open costs no HEAD request (measured: open and read a row, 3 GETs).
        handle = storage.retrying(lambda: self.fs.open(
            self.path(relative), "rb", block_size=READ_AHEAD, cache_type="readahead"))
        try:
            return _ObjectFile(handle)
        except BaseException:
            handle.close()
            raise

    def check(self) -> None:
        """A bucket that does not exist, or that the credentials cannot reach, is refused
        before any work."""
        bucket = self.root.split("/", 1)[0]
        try:
            storage.listing(self.fs, bucket, detail=False)
        except Exception as exc:
            raise UsageError(f"cannot write output {self.url}: {storage.reason(exc)}") from None

    def holds_foreign(self) -> bool:
        """Whether the prefix holds anything but an imgfeat store's own files."""
        return any(name not in _OWN + _KEPT and not _is_node_log(name)
                   for name in self.names())

    def remove_own(self) -> None:
        for name in _OWN:
            target = self.path(name)
            if storage.retrying(lambda t=target: self.fs.exists(t)):
                storage.retrying(lambda t=target: self.fs.rm(t, recursive=True))

    def manifest(self) -> dict | None:
        try:
            data = storage.retrying(lambda: self.fs.cat_file(self.path("manifest.json")))
        except FileNotFoundError:
            return None
        return json.loads(data)


class _ObjectFile(h5py.File):
    """An HDF5 file read through an fsspec file object, which it closes when it closes. Its
    reads pause the cyclic collector (store/paused_collection.py: else a collection on
    fsspec's I/O thread can deadlock with h5py's lock)."""

    def __init__(self, handle):
        super().__init__(PausedReads(handle), "r")
        self._handle = handle

    def close(self) -> None:
        super().close()
        self._handle.close()


def stamp(info: dict) -> str:
    """An object's size and version, as the row index records a shard's (store/row_index.py):
    the ETag where the service gives one, else its modification time."""
    version = next((info[field] for field in ("ETag", "etag", "LastModified", "last_modified",
                                              "updated", "mtime") if info.get(field)), "")
    return f"{info.get('size')}:{version}"


def pull(remote: Remote, root: Path, reading: bool = False) -> None:
    """Make the staging folder the bucket's store: its manifest and plan files (shards stay
    in the bucket). A staging folder of another store (one replaced since) is emptied first;
    plan files committed here but not yet uploaded (a run killed in between) are uploaded,
    or, for a reader's cache (`reading`), removed."""
    recorded = remote.manifest()
    local = root / "manifest.json"
    if recorded is None or not local.exists() or \
            json.loads(local.read_text()).get("created") != recorded.get("created"):
        _empty(root)
    root.mkdir(parents=True, exist_ok=True)
    if recorded is None:
        return
    local.write_text(json.dumps(recorded, indent=1))
    plan = root / "plan"
    there = set(remote.names("plan"))
    here = {p.name for p in plan.glob("shard-*.jsonl")} if plan.is_dir() else set()
    remote.fetch_all([f"plan/{name}" for name in sorted(there - here)  # not the key index
                      if name.endswith(".jsonl") or name == "skipped.json"], root)
    for name in sorted(here - there):
        if reading:
            (plan / name).unlink()
        else:
            remote.publish(plan / name, f"plan/{name}")


REFRESH_S = 1.0  # how often a node that follows another's plan asks the bucket for news


def refresh(layout: Layout) -> None:
    """For a node that follows another's plan on object storage: the manifest and any plan
    files that node has uploaded since (at most once a second)."""
    remote = layout.remote
    if remote is None or time.monotonic() < getattr(remote, "_next_refresh", 0.0):
        return
    remote._next_refresh = time.monotonic() + REFRESH_S
    remote.fetch("manifest.json", layout.manifest)
    here = layout.planned()
    for name in remote.names("plan"):
        number = name[len("shard-"):-len(".jsonl")]
        if name.startswith("shard-") and name.endswith(".jsonl") and number.isdigit() \
                and int(number) not in here:
            remote.fetch(f"plan/{name}", layout.plan_dir / name)


def _empty(root: Path) -> None:
    # index/ too: its row index (and a search index) describe the store replaced; its keys
    # of shards the new store does not have would hide the same keys in the new one's.
    for name in (*_OWN, "index"):
        target = root / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def open_layout(out: str | os.PathLike, storage_options: dict | None = None,
                pulled: bool = True) -> Layout:
    """The layout of an output: a local folder, or a URL's staging folder (made the bucket's
    store first, unless `pulled` is False: a worker, whose coordinator did that)."""
    if not storage.is_url(str(out)):
        return Layout(Path(out).resolve())
    remote = Remote(str(out), storage_options)
    root = staging_folder(remote.url)
    if pulled:
        remote.check()
        pull(remote, root)
    root.mkdir(parents=True, exist_ok=True)
    return Layout(root, remote)


def open_for_reading(out: str | os.PathLike, storage_options: dict | None = None) -> Layout:
    """The layout of the store `out` for reading: its folder, or for a URL a local cache of
    its small files and row index, whose shards are read from the bucket on demand."""
    if not storage.is_url(str(out)):
        return Layout(Path(out))
    remote = Remote(str(out), storage_options)
    try:
        manifest = remote.manifest()
    except Exception as exc:  # no access, a bad endpoint: the user's to fix
        raise UsageError(f"cannot read {out}: {storage.reason(exc)}") from None
    if manifest is None:
        raise UsageError(f"{out} holds no imgfeat store (no manifest.json)")
    root = staging_folder(remote.url, "read")
    pull(remote, root, reading=True)
    shutil.rmtree(root / "shards", ignore_errors=True)  # whole shards older versions fetched
    whitening = root / "whitening.npz"  # search embeds queries with it (search/query.py)
    whitening.unlink(missing_ok=True)
    if manifest.get("whiten"):
        remote.fetch("whitening.npz", whitening)
    return Layout(root, remote)


def log_name(rank: int) -> str:
    """The bucket's name of a node's run log: each node of a run stages its own."""
    return LOG if rank == 0 else f"imgfeat-node{rank}.log"


def _is_node_log(name: str) -> bool:
    return name.startswith("imgfeat-node") and name.endswith(".log")


def push_log(layout: Layout, name: str = LOG) -> None:
    """Upload a remote output's run log from staging, so the bucket tells how runs went; a
    failed upload is a warning, as the run's own outcome matters more."""
    if layout.remote is None or not layout.log.exists():
        return
    try:
        layout.remote.publish(layout.log, name)
    except Exception as exc:
        print(f"imgfeat: warning: could not upload {name} to {layout.location}: "
              f"{storage.reason(exc)}", file=sys.stderr)


def pull_log(layout: Layout, name: str = LOG) -> None:
    """Continue the bucket's run log (written by runs on other machines too), if it has one."""
    if layout.remote is not None:
        layout.remote.fetch(name, layout.log)
