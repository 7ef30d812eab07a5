"""Sources enumerate items: the key a user will look up, and where the bytes are.

Every source streams in a fixed order (names sorted within each folder), so two walks of an
unchanged source give the same items in the same order, and the walk never holds more than one
folder's listing at a time. Problems met while walking (an unreadable folder, a symlink loop, a
broken link) become items with an `error`, so that they are recorded, not lost.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imgfeat.errors import UsageError

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .webp .gif .bmp .dib .tif .tiff .ppm .pgm .pbm .pnm "
    ".tga .ico .avif .jp2 .j2k .qoi".split()
)
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})


@dataclass(frozen=True)
class Item:
    """One input: `key` names it in the store; `path` is None when `error` says why."""

    key: str
    path: str | None
    error: str | None = None


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def iter_items(sources: Iterable[str]) -> Iterator[Item]:
    """Items of all sources in order; with several sources each key starts with its name."""
    sources = [str(s) for s in sources]
    if not sources:
        raise UsageError("no source given: name a folder of images or a list file")
    prefixes = _prefixes(sources)
    for source, prefix in zip(sources, prefixes):
        for item in _iter_source(source):
            yield Item(prefix + item.key, item.path, item.error) if prefix else item


def check_sources(sources: Iterable[str]) -> list[str]:
    """Fail early, before any work, on sources that do not exist."""
    checked = []
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise UsageError(f"source not found: {source}")
        if path.is_file() and not (is_image_name(path.name) or _is_list(path)):
            raise UsageError(
                f"source {source} is neither a folder, an image nor a list file "
                f"({', '.join(sorted(LIST_EXTENSIONS))})"
            )
        checked.append(str(path))
    _prefixes(checked)
    return checked


def _is_list(path: Path) -> bool:
    return path.suffix.lower() in LIST_EXTENSIONS


def _prefixes(sources: list[str]) -> list[str]:
    """Key prefixes that keep keys of several sources apart ('' for a single source)."""
    if len(sources) == 1:
        return [""]
    prefixes, seen = [], {}
    for source in sources:
        path = Path(source)
        if path.is_file() and is_image_name(path.name):
            prefixes.append("")
            continue
        name = path.resolve().stem if path.is_file() else path.resolve().name
        if name in seen:
            raise UsageError(
                f"sources {seen[name]} and {source} would both give keys starting with "
                f"'{name}/'; pass their common parent folder, or one list file"
            )
        seen[name] = source
        prefixes.append(name + "/")
    return prefixes


def _iter_source(source: str) -> Iterator[Item]:
    path = Path(source)
    if path.is_dir():
        yield from walk_folder(path)
    elif _is_list(path):
        yield from read_list(path)
    else:
        yield Item(path.name, str(path))


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
