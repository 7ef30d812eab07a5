"""A folder's image files, recursively, in a fixed order: names sorted within each folder, so
two walks of an unchanged folder give the same items, holding one folder's listing at a time
(in bounded memory: sources/listing.py). Unreadable folders, symlink loops and broken links
become items with an error.

A walk can start after a key (`after`): folders and names that sort before it are skipped
without being listed, so a resumed plan does not walk again what it has recorded."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from imgfeat.sources.item import Item, is_image_name
from imgfeat.sources.listing import DIR, FILE, LINK, UNKNOWN, sorted_entries
from imgfeat.store import storage


def walk_folder(root: Path, after: str | None = None, tally=None) -> Iterator[Item]:
    """Image files under `root`, depth first, sorted by name; hidden entries are skipped.
    With `after`, only the items that come after that key in this order. Files of other
    types are counted in `tally.skipped` (a user should know of them)."""
    root_stat = root.stat()
    seek = after.split("/") if after else None
    yield from _walk(str(root), "", ((root_stat.st_dev, root_stat.st_ino),), seek, tally)


def _walk(folder: str, prefix: str, ancestors: tuple[tuple[int, int], ...],
          seek: list[str] | None, tally) -> Iterator[Item]:
    try:
        entries = sorted_entries(folder)
        first = next(entries, None)
    except OSError as exc:
        yield Item(prefix or "./", None, f"unreadable folder: {exc.strerror or exc}")
        return
    if first is None:
        return
    entries = _chain(first, entries)
    if seek:
        entries = _after(entries, seek, folder, prefix, ancestors, tally)
    for name, kind in entries:
        yield from _entry(folder, prefix, name, kind, ancestors, tally)


def _chain(first, rest):
    yield first
    yield from rest


def _after(entries, seek: list[str], folder: str, prefix: str, ancestors, tally):
    """The entries after the key `seek` (its path components): those sorting before its first
    component are skipped unlisted; the folder it names is walked from its rest onwards."""
    head, rest = seek[0], seek[1:]
    for name, kind in entries:
        key = _utf8(name)
        if key == head:
            if rest and rest != [""] and _is_dir(folder, name, kind):
                yield from _as_entries(_walk_subfolder(os.path.join(folder, name),
                                                       prefix + key, ancestors, rest,
                                                       tally))
            break
        if name > head:  # the recorded key is gone: resume at the next name
            yield name, kind
            break
    yield from entries


def _as_entries(items: Iterator[Item]):
    """Items passed through `_after`'s stream of entries, marked as already walked."""
    for item in items:
        yield None, item


def _entry(folder: str, prefix: str, name: str | None, kind, ancestors,
           tally) -> Iterator[Item]:
    if name is None:  # an item of a sub-folder walked by the seek
        yield kind
        return
    key = prefix + _utf8(name)
    path = os.path.join(folder, name)
    try:
        is_dir = _is_dir(folder, name, kind)
        is_file = not is_dir and (kind == FILE or (kind == UNKNOWN and os.path.isfile(path)))
    except OSError as exc:
        yield Item(key, None, f"unreadable entry: {exc.strerror or exc}")
        return
    if is_dir:
        yield from _walk_subfolder(path, key, ancestors, None, tally)
    elif is_file:
        if is_image_name(name):
            yield Item(key, path)
        elif tally is not None:
            tally.skipped += 1
    elif kind == LINK and is_image_name(name):
        yield Item(key, None, "broken symbolic link")


def _is_dir(folder: str, name: str, kind: str) -> bool:
    if kind != UNKNOWN:
        return kind == DIR
    os.stat(os.path.join(folder, name))  # raises the reason the kind was unknown
    return os.path.isdir(os.path.join(folder, name))


def _utf8(name: str) -> str:
    """File names that are not valid UTF-8 get a readable, storable key (the path is kept)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _walk_subfolder(path: str, key: str, ancestors, seek: list[str] | None,
                    tally) -> Iterator[Item]:
    try:
        stat = os.stat(path)
    except OSError as exc:
        yield Item(key + "/", None, f"unreadable folder: {exc.strerror or exc}")
        return
    ident = (stat.st_dev, stat.st_ino)
    if ident in ancestors:
        yield Item(key + "/", None, "symbolic link loop: the folder contains itself")
        return
    yield from _walk(path, key + "/", ancestors + (ident,), seek, tally)


def walk_remote_folder(url: str, storage_options: dict | None, tally=None) -> Iterator[Item]:
    """A folder (prefix) on a remote file system, in the same order as a local walk: names
    sorted within each folder, depth first, one listing at a time."""
    fs, root = storage.filesystem(url, storage_options)
    root = root.rstrip("/")
    scheme = url.split("://", 1)[0]
    yield from _walk_remote(fs, scheme, root, "", tally)


def _walk_remote(fs, scheme: str, folder: str, prefix: str, tally) -> Iterator[Item]:
    try:
        entries = storage.listing(fs, folder)
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
