"""An output on object storage (`-o s3://bucket/feats/`, any fsspec URL).

Every file is written as for a local folder, in a staging folder on this machine, and then
uploaded under the same relative name (`publish`): one PUT, or a multipart upload that
completes, so the object appears whole or not at all. A shard is committed when its object
appears under its final name; its local copy is then removed, so staging holds at most a
shard per worker. The plan files and the manifest are kept in staging too: they are the
machine's copy of the store's plan, made again from the bucket when a run starts (`pull`).

A run's lock (`store/run_lock.py`) guards the staging folder, that is one machine: object
storage has no lock a run could take, so two machines must not run on one output URL at once
unless they are nodes of one run (`--num-nodes`, or Ray's actors).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from imgfeat.errors import UsageError
from imgfeat.store import storage
from imgfeat.store.layout import Layout

_OWN = ("manifest.json", "plan", "shards")


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

    def names(self, folder: str = "") -> list[str]:
        """Names directly in `folder` (relative), [] when there is none."""
        where = self.path(folder) if folder else self.root
        try:
            found = storage.retrying(lambda: self.fs.ls(where, detail=False, refresh=True))
        except FileNotFoundError:
            return []
        return sorted(name.rstrip("/").rsplit("/", 1)[-1] for name in found)

    def check(self) -> None:
        """A bucket that does not exist, or that the credentials cannot reach, is refused
        before any work."""
        bucket = self.root.split("/", 1)[0]
        try:
            storage.retrying(lambda: self.fs.ls(bucket, detail=False, refresh=True))
        except Exception as exc:
            raise UsageError(f"cannot write output {self.url}: {storage.reason(exc)}") from None

    def holds_foreign(self) -> bool:
        """Whether the prefix holds anything but an imgfeat store's own files."""
        return any(name not in _OWN for name in self.names())

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


def pull(remote: Remote, root: Path) -> None:
    """Make the staging folder the bucket's store: its manifest and plan files (shards stay
    in the bucket). A staging folder of another store (one replaced since) is emptied first;
    plan files committed here but not yet uploaded (a run killed in between) are uploaded."""
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
    for name in sorted(there - here):
        if name.endswith(".jsonl"):
            remote.fetch(f"plan/{name}", plan / name)
    for name in sorted(here - there):
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


def pull_all(remote: Remote, root: Path) -> None:
    """The whole store, shards too, for reading it here."""
    pull(remote, root)
    shards = root / "shards"
    here = {p.name for p in shards.glob("shard-*.h5")} if shards.is_dir() else set()
    for name in remote.names("shards"):
        if name.endswith(".h5") and name not in here:
            remote.fetch(f"shards/{name}", shards / name)


def _empty(root: Path) -> None:
    for name in _OWN:
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


def open_for_reading(out: str | os.PathLike, storage_options: dict | None = None) -> Path:
    """A local folder holding the store `out` (a URL's store downloaded to a cache)."""
    if not storage.is_url(str(out)):
        return Path(out)
    remote = Remote(str(out), storage_options)
    if remote.manifest() is None:
        raise UsageError(f"{out} holds no imgfeat store (no manifest.json)")
    root = staging_folder(remote.url, "read")
    pull_all(remote, root)
    return root
