"""List files: one image path per line."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from imgfeat.errors import UsageError
from imgfeat.sources.item import Item

LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})


def is_list(path: Path) -> bool:
    return path.suffix.lower() in LIST_EXTENSIONS


def read_list(list_file: Path) -> Iterator[Item]:
    """One path per line; relative paths resolve against the list's folder; '#' comments."""
    base = list_file.resolve().parent
    try:
        handle = open(list_file, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read list file {list_file}: {exc.strerror or exc}") from None
    with handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key = Path(os.path.normpath(line)).as_posix()
            yield Item(key, str(base / line))
