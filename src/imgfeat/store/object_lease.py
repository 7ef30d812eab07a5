"""Leases of an output on object storage, as objects beside the store (`URL/locks/`), so that
two machines cannot run on one output URL at once: the staging folder's lock
(store/run_lock.py) guards one machine only.

The protocol is store/lease.py's (a lease per node naming host, pid, run id and heartbeat;
nodes of one run share; a gone holder's lease is taken over), on S3's conditional writes:
a lease is created with `If-None-Match: *` (the PUT fails with 412 if the object exists),
refreshed and taken over with `If-Match: <the ETag last seen>` (it fails if anyone wrote
the object since), so of two machines racing for one lease exactly one wins. s3fs passes
both to PutObject (`mode="create"`, and extra arguments); AWS S3 has honoured them since
2024, as do MinIO and moto. A service that ignores them would let two writers both win:
imgfeat cannot tell, so only s3fs file systems get these leases (`for_remote`), and other
URLs keep the staging lock alone, as before.

A lease's version is its ETag. Reading one costs a HEAD then a GET: if it changed between
them, a conditional write with the HEAD's ETag fails, which is safe. Removing is not
conditional (S3's conditional DELETE is not general yet): a holder removes only its own
lease, read just before, which no one may take over while its heartbeat is fresh."""

from __future__ import annotations

import errno
import json
from dataclasses import asdict

from imgfeat.store import storage
from imgfeat.store.lease import Holder


def for_remote(remote) -> ObjectLeases | None:
    """Leases in the bucket of `remote` (a store.remote.Remote), or None where the file
    system cannot write conditionally."""
    if remote is None or not type(remote.fs).__module__.startswith("s3fs"):
        return None
    return ObjectLeases(remote.fs, remote.path("locks"), remote.url)


def _precondition_failed(exc: BaseException) -> bool:
    """s3fs's 412: FileExistsError for If-None-Match, OSError(EINVAL) for If-Match; an
    object gone meanwhile fails If-Match too (404)."""
    return isinstance(exc, (FileExistsError, FileNotFoundError)) or (
        isinstance(exc, OSError) and exc.errno == errno.EINVAL)


class ObjectLeases:
    """The leases of one output URL: objects `<prefix>/lease-node-R.json`."""

    def __init__(self, fs, prefix: str, where: str):
        self.fs, self.prefix, self.where = fs, prefix, where

    def prepare(self) -> None:
        pass  # object storage has no folders to make

    def create(self, name: str, holder: Holder) -> str | None:
        return self._put(name, holder, mode="create")

    def read(self, name: str) -> tuple[Holder | None, str | None]:
        path = f"{self.prefix}/{name}"
        try:
            self.fs.invalidate_cache(path)
            etag = storage.retrying(lambda: self.fs.info(path))["ETag"]
            data = storage.retrying(lambda: self.fs.cat_file(path))
        except FileNotFoundError:
            return None, None
        try:
            return Holder(**json.loads(data)), etag
        except (ValueError, TypeError):
            return None, etag

    def take_over(self, name: str, old: Holder | None, version: str | None,
                  new: Holder) -> str | None:
        return None if version is None else self._put(name, new, IfMatch=version)

    def refresh(self, name: str, version: str | None, new: Holder) -> str | None:
        return None if version is None else self._put(name, new, IfMatch=version)

    def remove(self, name: str) -> None:
        holder, _ = self.read(name)
        if holder is not None and holder.is_me():
            path = f"{self.prefix}/{name}"
            storage.retrying(lambda: self.fs.rm_file(path))

    def names(self) -> list[str]:
        try:
            found = storage.retrying(lambda: self.fs.ls(self.prefix, detail=False,
                                                        refresh=True))
        except FileNotFoundError:
            return []
        names = (path.rstrip("/").rsplit("/", 1)[-1] for path in found)
        return sorted(n for n in names if n.startswith("lease-node-") and n.endswith(".json"))

    def _put(self, name: str, holder: Holder, **condition) -> str | None:
        """Write `holder` if `condition` holds: its new ETag, or None if it did not. A PUT
        whose answer was lost and that was retried fails its own condition: the lease then
        reads as ours, and counts as written."""
        path, data = f"{self.prefix}/{name}", json.dumps(asdict(holder)).encode()
        try:
            answer = storage.retrying(lambda: self.fs.pipe_file(path, data, **condition))
        except OSError as exc:
            if not _precondition_failed(exc):
                raise
            found, etag = self.read(name)
            return etag if found == holder else None
        return answer["ETag"]
