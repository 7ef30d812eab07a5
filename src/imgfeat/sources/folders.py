"""A folder's image files, recursively, in a fixed order: names sorted within each folder, so
two walks of an unchanged folder give the same items, holding one folder's listing at a time.
Unreadable folders, symlink loops and broken links become items with an error."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from imgfeat.sources.item import Item, is_image_name
from imgfeat.store import storage


def walk_folder(root: Path, tally=None) -> Iterator[Item]:
    """Image files under `root`, depth first, sorted by name; hidden entries are skipped.
    Files of other types are counted in `tally.skipped` (a user should know of them)."""
    root_stat = root.stat()
    yield from _walk(str(root), "", ((root_stat.st_dev, root_stat.st_ino),), tally)


def _walk(folder: str, prefix: str, ancestors: tuple[tuple[int, int], ...],
          tally) -> Iterator[Item]:
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
            yield from _walk_subfolder(entry, key, ancestors, tally)
        elif is_file:
            if is_image_name(entry.name):
                yield Item(key, entry.path)
            elif tally is not None:
                tally.skipped += 1
        elif entry.is_symlink() and is_image_name(entry.name):
            yield Item(key, None, "broken symbolic link")


def _utf8(name: str) -> str:
    """File names that are not valid UTF-8 get a readable, storable key (the path is kept)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _walk_subfolder(entry: os.DirEntry, key: str, ancestors, tally) -> Iterator[Item]:
    try:
        stat = entry.stat()
    except OSError as exc:
        yield Item(key + "/", None, f"unreadable folder: {exc.strerror or exc}")
        return
    ident = (stat.st_dev, stat.st_ino)
    if ident in ancestors:
        yield Item(key + "/", None, "symbolic link loop: the folder contains itself")
        return
    yield from _walk(entry.path, key + "/", ancestors + (ident,), tally)


def walk_remote_folder(url: str, storage_options: dict | None, tally=None) -> Iterator[Item]:
    """A folder (prefix) on a remote file system, in the same order as a local walk: names
    sorted within each folder, depth first, one listing at a time."""
    fs, root = storage.filesystem(url, storage_options)
    root = root.rstrip("/")
    scheme = url.split("://", 1)[0]
    yield from _walk_remote(fs, scheme, root, "", tally)


def _walk_remote(fs, scheme: str, folder: str, prefix: str, tally) -> Iterator[Item]:
    try:
        entries = storage.retrying(lambda: fs.ls(folder, detail=True, refresh=True))
    except Exception as exc:
        yield Item(prefix or "./", None, f"unreadable folder: {storage.reason(exc)}")
        return
    for entry in sorted(entries, key=lambda e: e["name"]):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(".") or entry["name"].rstrip("/") == folder:
            continue
        key = prefix + name
        if entry["type"] == "directory":
            yield from _walk_remote(fs, scheme, entry["name"].rstrip("/"), key + "/", tally)
        elif is_image_name(name):
            yield Item(key, f"{scheme}://{entry['name']}")
        elif tally is not None:
            tally.skipped += 1
