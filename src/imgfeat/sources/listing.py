"""One folder's entries, sorted by name, in bounded memory. A `DirEntry` costs about 245 bytes;
an entry here is one compact string (name, a NUL, one letter for its kind), and past
SPILL_ENTRIES entries the sorted runs go to temporary files and are merged back, so a folder of
ten million files costs a fixed amount of memory whatever its size."""

from __future__ import annotations

import heapq
import os
import tempfile
from collections.abc import Iterator

SPILL_ENTRIES = int(os.environ.get("IMGFEAT_SPILL_ENTRIES", "200000"))
DIR, FILE, LINK, OTHER, UNKNOWN = "d", "f", "l", "o", "?"  # LINK: a link to nothing usable
_SEP = "/"  # ends a record in a spill file: no file name holds "/" (or NUL)


def sorted_entries(folder: str) -> Iterator[tuple[str, str]]:
    """(name, kind) of every entry of `folder` but hidden ones, sorted by name. Raises
    OSError if the folder cannot be listed."""
    runs: list[str] = []
    chunk: list[str] = []
    try:
        with os.scandir(folder) as listing:
            for entry in listing:
                if not entry.name.startswith("."):
                    chunk.append(entry.name + "\0" + _kind(entry))
                if len(chunk) >= SPILL_ENTRIES:
                    runs.append(_spill(chunk))
                    chunk = []
        chunk.sort()  # NUL sorts first, so "a\0f" < "ab\0f": the order of the names
        if not runs:
            yield from (_split(record) for record in chunk)
            return
        runs.append(_spill(chunk))
        chunk = []
        yield from (_split(r) for r in heapq.merge(*(_read_run(path) for path in runs)))
    finally:
        for path in runs:
            os.unlink(path)


def _kind(entry: os.DirEntry) -> str:
    try:
        if entry.is_dir():
            return DIR
        if entry.is_file():
            return FILE
        return LINK if entry.is_symlink() else OTHER
    except OSError:
        return UNKNOWN


def _split(record: str) -> tuple[str, str]:
    name, _, kind = record.rpartition("\0")
    return name, kind


def _spill(chunk: list[str]) -> str:
    chunk.sort()
    handle, path = tempfile.mkstemp(prefix="imgfeat-listing-")
    with os.fdopen(handle, "w", encoding="utf-8", errors="surrogateescape") as out:
        for record in chunk:
            out.write(record + _SEP)
    return path


def _read_run(path: str, block: int = 1 << 13) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="surrogateescape") as run:
        rest = ""
        while data := run.read(block):
            records = (rest + data).split(_SEP)
            rest = records.pop()
            yield from records
