"""List files: one image path (or URL) per line."""

from __future__ import annotations

import io
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path

from imgfeat.errors import UsageError
from imgfeat.sources.item import Item
from imgfeat.store import storage

LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})


def is_list(path: Path | str) -> bool:
    return Path(str(path)).suffix.lower() in LIST_EXTENSIONS


def read_list(list_file: Path | str, storage_options: dict | None = None) -> Iterator[Item]:
    """One path per line; relative paths resolve against the list's folder; '#' comments."""
    remote = storage.is_url(str(list_file))
    try:
        handle = _open(str(list_file), storage_options) if remote else \
            open(list_file, encoding="utf-8")
    except Exception as exc:
        raise UsageError(f"cannot read list file {list_file}: {storage.reason(exc)}") from None
    base = storage.parent(str(list_file)) if remote else str(Path(list_file).resolve().parent)
    with handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if storage.is_url(line):
                yield Item(line, line)
            elif remote:
                yield Item(posixpath.normpath(line), storage.join(base, line))
            else:
                yield Item(Path(os.path.normpath(line)).as_posix(), os.path.join(base, line))


def _open(url: str, storage_options: dict | None):
    fs, path = storage.filesystem(url, storage_options)
    data = storage.retrying(lambda: fs.cat_file(path))
    return io.StringIO(data.decode("utf-8"))
