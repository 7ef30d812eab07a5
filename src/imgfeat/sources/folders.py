"""A folder's image files, recursively, in a fixed order: names sorted within each folder, so
two walks of an unchanged folder give the same items, holding one folder's listing at a time.
Unreadable folders, symlink loops and broken links become items with an error."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from imgfeat.sources.item import Item, is_image_name


def walk_folder(root: Path) -> Iterator[Item]:
    """Image files under `root`, depth first, sorted by name; hidden entries are skipped."""
    root_stat = root.stat()
    yield from _walk(str(root), "", ((root_stat.st_dev, root_stat.st_ino),))


def _walk(folder: str, prefix: str, ancestors: tuple[tuple[int, int], ...]) -> Iterator[Item]:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        yield Item(prefix or "./", None, f"unreadable folder: {exc.strerror or exc}")
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        key = prefix + _utf8(entry.name)
        try:
            is_dir = entry.is_dir()
            is_file = not is_dir and entry.is_file()
        except OSError as exc:
            yield Item(key, None, f"unreadable entry: {exc.strerror or exc}")
            continue
        if is_dir:
            yield from _walk_subfolder(entry, key, ancestors)
        elif is_file:
            if is_image_name(entry.name):
                yield Item(key, entry.path)
        elif entry.is_symlink() and is_image_name(entry.name):
            yield Item(key, None, "broken symbolic link")


def _utf8(name: str) -> str:
    """File names that are not valid UTF-8 get a readable, storable key (the path is kept)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _walk_subfolder(entry: os.DirEntry, key: str, ancestors) -> Iterator[Item]:
    try:
        stat = entry.stat()
    except OSError as exc:
        yield Item(key + "/", None, f"unreadable folder: {exc.strerror or exc}")
        return
    ident = (stat.st_dev, stat.st_ino)
    if ident in ancestors:
        yield Item(key + "/", None, "symbolic link loop: the folder contains itself")
        return
    yield from _walk(entry.path, key + "/", ancestors + (ident,))
