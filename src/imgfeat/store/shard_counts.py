"""The store's record of its shards' counts: `shards/counts-node-R.json`, one per node of a
run, so that a reader opening a store for the first time reads these few small files and the
listing instead of every shard's HDF5 header (on object storage about 2 GETs a shard, one
shard after another: minutes for 10,000 shards).

Each record maps a shard to what its writer knew when it committed it: rows, error records,
float16 overflow rows, its identity digest, and its stamp (`Layout.shard_stamp`: size and
mtime, or size and ETag). A reader trusts an entry only while the shard's stamp is still the
one recorded (store/row_index.py); any other shard, or one the record lacks, is read as
before, so a stale or missing record costs speed, never a wrong count.

The coordinator of each node keeps its own record (`CountsRecord`): nodes of one run never
write each other's, and readers merge them all. It is written atomically (layout.write_atomic:
a rename, or one PUT) at most every WRITE_EVERY_S as shards commit, and when the run ends.
It lives in `shards/` so that --overwrite (of any version) removes it with the shards, and
versions that predate it ignore it there (they count only `shard-N.h5`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from imgfeat.store import storage
from imgfeat.store.layout import Layout, write_atomic

PREFIX, SUFFIX = "counts-node-", ".json"
WRITE_EVERY_S = 10.0  # a record is rewritten whole: often enough to be current, rarely I/O

Entry = list  # [rows, errors, overflow rows, stamp, identity digest or None]


def entry_of(layout: Layout, index: int, rows: int, errors: int, overflow: int,
             identity: str | None) -> Entry | None:
    """The record's entry of shard `index`, just committed (its stamp read now, afresh:
    on object storage one HEAD). None if the stamp cannot be read: the shard is committed
    all the same, and readers will count it from its header."""
    try:
        stamp = layout.shard_stamp(index, fresh=True)
    except Exception:
        return None
    return [rows, errors, overflow, stamp, identity]


class CountsRecord:
    """Node `rank`'s record: entries added as shards commit, written at most every
    WRITE_EVERY_S and by `flush`. Entries an earlier run of this node recorded are kept."""

    def __init__(self, layout: Layout, rank: int, warn: Callable[[str], None] = print):
        self._layout, self._warn = layout, warn
        self._path = layout.shards_dir / f"{PREFIX}{rank}{SUFFIX}"
        self._entries: dict[str, Entry] | None = None  # loaded on the first add
        self._dirty = False
        self._next_write = time.monotonic() + WRITE_EVERY_S

    def add(self, index: int, entry: Entry | None) -> None:
        if entry is None:
            return
        if self._entries is None:
            try:
                self._entries = self._load()
            except Exception as exc:  # unreachable now: start afresh, as for a new node
                self._warn(f"could not read {self._path.name}: {storage.reason(exc)}")
                self._entries = {}
        self._entries[str(index)] = entry
        self._dirty = True
        if time.monotonic() >= self._next_write:
            self.flush()

    def flush(self) -> None:
        """Write the record if anything was added since it was last written. A failure is
        a warning: without the record readers read headers, slower but as right."""
        if not self._dirty:
            return
        self._next_write = time.monotonic() + WRITE_EVERY_S
        data = json.dumps({"format": 1, "shards": self._entries}, separators=(",", ":"))
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self._path, data.encode())
        except Exception as exc:
            self._warn(f"could not record shard counts in {self._path.name}: "
                       f"{storage.reason(exc)}")
            return
        self._dirty = False

    def _load(self) -> dict[str, Entry]:
        """This node's record as the store holds it now (on object storage, the bucket's:
        another machine may have run this node since)."""
        remote = self._layout.remote
        if remote is not None and not remote.fetch(_relative(self._path), self._path):
            self._path.unlink(missing_ok=True)
        return _parse(self._path.read_bytes() if self._path.exists() else None)


def _relative(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def _parse(data: bytes | None) -> dict[str, Entry]:
    """A record's entries; {} for none or one that cannot be read (the shards can be)."""
    try:
        shards = json.loads(data)["shards"] if data else {}
    except (ValueError, KeyError, TypeError):
        return {}
    return shards if isinstance(shards, dict) else {}


def recorded(layout: Layout, names: list[str] | None = None) -> dict[int, list[Entry]]:
    """{shard: its entries in every node's record} (a shard may be in several: a node that
    ran it in an earlier run). `names`: the files of `shards/`, if already listed."""
    if names is None and layout.remote is not None:
        names = layout.remote.listed("shards")  # the reader's listing: no request more
    if names is None:
        names = layout.remote.names("shards") if layout.remote is not None else \
            [p.name for p in layout.shards_dir.glob(f"{PREFIX}*{SUFFIX}")]
    found: dict[int, list[Entry]] = {}
    for name in sorted(n for n in names if n.startswith(PREFIX) and n.endswith(SUFFIX)):
        for key, entry in _parse(_read(layout, f"shards/{name}")).items():
            if key.isdigit() and _valid(entry):
                found.setdefault(int(key), []).append(entry)
    return found


def _valid(entry) -> bool:
    return isinstance(entry, list) and len(entry) == 5 and \
        all(isinstance(n, int) and n >= 0 for n in entry[:3]) and isinstance(entry[3], str) \
        and (entry[4] is None or isinstance(entry[4], str))


def _read(layout: Layout, relative: str) -> bytes | None:
    try:
        if layout.remote is not None:
            path = layout.remote.path(relative)
            return storage.retrying(lambda: layout.remote.fs.cat_file(path))
        return (layout.root / relative).read_bytes()
    except OSError:  # gone, or unreadable: the shards' headers still tell
        return None
