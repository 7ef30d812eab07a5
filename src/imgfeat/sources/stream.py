"""The item stream of all the sources of a run, in order, with keys kept apart between
sources; and the check, before any work, that every source exists and is of a known kind.

A source is a folder, a list file, a webdataset tar (or a brace pattern of them), a table, or
one image; each may be local or an fsspec URL (`store/storage.py`)."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand

from imgfeat.errors import UsageError
from imgfeat.sources.folders import walk_folder, walk_remote_folder
from imgfeat.sources.item import Item, is_image_name
from imgfeat.sources.lists import LIST_EXTENSIONS, is_list, read_list
from imgfeat.sources.tables import TableOptions, check_table, is_table, read_table
from imgfeat.sources.tars import is_tar, read_tar, tar_stem
from imgfeat.store import storage

CHECKS_IN_FLIGHT = 32


@dataclass(frozen=True)
class SourceOptions:
    """How sources are read: the fsspec `storage_options` and the table columns."""

    storage_options: dict | None = None
    table: TableOptions = field(default_factory=TableOptions)


@dataclass
class Tally:
    """What a walk passed over: files whose extension is not an image type."""

    skipped: int = 0


def iter_items(sources: Iterable[str], options: SourceOptions | None = None,
               tally: Tally | None = None, *, after: str | None = None) -> Iterator[Item]:
    """Items of all sources in order; with several sources each key starts with its name.
    With `after` (the last key a resumed plan recorded), only the items after it: sources
    before the one holding it are not read, and a local folder is walked from that key on."""
    sources = [str(s) for s in sources]
    options = options or SourceOptions()
    if not sources:
        raise UsageError("no source given: name a folder of images or a list file")
    prefixes = _prefixes(sources, options)
    start, inner = (0, None) if after is None else _resume_point(sources, prefixes, after)
    for number in range(start, len(sources)):
        source, prefix = sources[number], prefixes[number]
        seek = inner if number == start else None
        items = (item for part in expand(source)
                 for item in _iter_source(part, options, tally, seek))
        for item in items:
            yield item.with_key(prefix + item.key) if prefix else item


def can_resume_after(sources: list[str], after: str, options: SourceOptions | None = None
                     ) -> bool:
    """Whether `iter_items(sources, after=after)` can seek to `after`: in a local folder or
    past a local image file. Other kinds are read from their start (a list's key may repeat,
    and a tar or a table has no order to seek in without reading it)."""
    sources = [str(s) for s in sources]
    options = options or SourceOptions()
    try:
        number, _ = _resume_point(sources, _prefixes(sources, options), after)
    except UsageError:
        return False
    source = sources[number]
    if storage.is_url(source) or "{" in source:
        return False
    path = Path(source)
    return path.is_dir() or (path.is_file() and is_image_name(path.name))


def _resume_point(sources: list[str], prefixes: list[str], after: str) -> tuple[int, str]:
    """(the source holding the key `after`, the key within it)."""
    if len(sources) == 1:
        return 0, after
    for number in reversed(range(len(sources))):
        prefix = prefixes[number]
        if (prefix and after.startswith(prefix)) or \
                (not prefix and after == posixpath.basename(sources[number].rstrip("/"))):
            return number, after[len(prefix):]
    raise _changed()


def _changed() -> UsageError:
    return UsageError("the source changed since this run's plan was recorded; rerun with "
                      "--overwrite to start again from the source as it is now")


def expand(source: str) -> list[str]:
    """A brace pattern's names ('data/{00000..00099}.tar'), or the source itself."""
    if "{" not in source:
        return [source]
    return list(braceexpand(source))


def check_sources(sources: Iterable[str], options: SourceOptions | None = None) -> list[str]:
    """Fail early, before any work, on sources that do not exist or cannot be read."""
    options = options or SourceOptions()
    checked = []
    for source in sources:
        source = str(source)
        parts = expand(source)
        kinds = _kinds(parts, options)
        missing = [p for p, kind in zip(parts, kinds) if kind is None]
        if missing and len(parts) > 1:
            raise UsageError(f"pattern {source} names {len(parts)} files and {len(missing)} "
                             f"do not exist (the first: {missing[0]})" if len(missing) < len(parts)
                             else f"pattern {source} matches nothing ({len(parts)} names, "
                             "none exists)")
        if missing:
            raise UsageError(f"source not found: {source}")
        for part, kind in zip(parts, kinds):
            _check_kind(part, kind, options)
        checked.append(source if storage.is_url(source) or len(parts) > 1
                       else str(Path(source)))
    _prefixes(checked, options)
    return checked


def _kinds(parts: list[str], options: SourceOptions) -> list[str | None]:
    """'directory', 'file' or None (missing) for each name. A remote pattern's names are
    looked up CHECKS_IN_FLIGHT at a time: one by one, ten thousand tars on object storage
    took minutes before any work."""
    if len(parts) == 1 or not storage.is_url(parts[0]):
        return [_kind(part, options) for part in parts]
    first = _kind(parts[0], options)  # alone: it makes the client that the others share
    with ThreadPoolExecutor(min(CHECKS_IN_FLIGHT, len(parts) - 1)) as pool:
        return [first, *pool.map(lambda part: _kind(part, options), parts[1:])]


def _kind(source: str, options: SourceOptions) -> str | None:
    if not storage.is_url(source):
        path = Path(source)
        return "directory" if path.is_dir() else "file" if path.exists() else None
    fs, path = storage.filesystem(source, options.storage_options)
    try:
        info = storage.retrying(lambda: fs.info(path))
    except Exception as exc:
        if storage.is_missing(exc):
            return None
        raise UsageError(f"cannot read source {source}: {storage.reason(exc)}") from None
    return "directory" if info.get("type") == "directory" else "file"


def _check_kind(source: str, kind: str, options: SourceOptions) -> None:
    name = posixpath.basename(source.rstrip("/"))
    if is_table(name):
        check_table(source, options.table, options.storage_options)
    elif not (kind == "directory" or is_image_name(name) or is_list(name) or is_tar(name)
              or _is_folder(source, options)):  # an http(s) page of links is a folder too
        raise UsageError(
            f"source {source} is neither a folder, an image, a list file "
            f"({', '.join(sorted(LIST_EXTENSIONS))}), a tar (.tar, .tar.gz, .tgz) "
            "nor a table (.parquet, .csv, .jsonl)")


def _is_folder(source: str, options: SourceOptions) -> bool:
    if not storage.is_url(source):
        return Path(source).is_dir()
    fs, path = storage.filesystem(source, options.storage_options)
    return storage.retrying(lambda: fs.isdir(path))


def _prefixes(sources: list[str], options: SourceOptions) -> list[str]:
    """Key prefixes that keep keys of several sources apart ('' for a single source)."""
    if len(sources) == 1:
        return [""]
    prefixes, seen = [], {}
    for source in sources:
        base = posixpath.basename(source.rstrip("/"))
        if is_image_name(base) and not _is_folder(source, options):
            prefixes.append("")
            continue
        name = _source_name(source, options)
        if name in seen:
            raise UsageError(
                f"sources {seen[name]} and {source} would both give keys starting with "
                f"'{name}/'; pass their common parent folder, or one list file"
            )
        seen[name] = source
        prefixes.append(name + "/")
    return prefixes


def _source_name(source: str, options: SourceOptions) -> str:
    if storage.is_url(source) or "{" in source:
        base = posixpath.basename(source.rstrip("/"))
        if is_tar(base):
            return tar_stem(base)
        return base if _is_folder(source, options) else base.rsplit(".", 1)[0]
    path = Path(source)
    if is_tar(path.name):
        return tar_stem(path.name)
    return path.resolve().stem if path.is_file() else path.resolve().name


def _iter_source(source: str, options: SourceOptions, tally: Tally | None,
                 after: str | None = None) -> Iterator[Item]:
    name = posixpath.basename(source.rstrip("/"))
    if not storage.is_url(source):
        if Path(source).is_dir():
            yield from walk_folder(Path(source), after, tally)
            return
        source = os.path.abspath(source)  # workers may run elsewhere (another cwd)
    if after is not None and is_image_name(name) and not is_tar(name):
        return  # the single image is the recorded key
    yield from _after_key(_read_source(source, name, options, tally), after)


def _read_source(source: str, name: str, options: SourceOptions,
                 tally: Tally | None) -> Iterator[Item]:
    so = options.storage_options
    if is_tar(name):
        yield from read_tar(source, so)
    elif is_table(name):
        yield from read_table(source, options.table, so)
    elif is_list(name):
        yield from read_list(source, so)
    elif storage.is_url(source):
        if _is_folder(source, options):
            yield from walk_remote_folder(source, so, tally)
        else:
            yield Item(name, source)
    else:
        yield Item(name, str(Path(source)))


def _after_key(items: Iterator[Item], after: str | None) -> Iterator[Item]:
    """The items after the key `after`, found by reading (these kinds have no order to seek
    in); callers seek only where `can_resume_after` allows, so this is the safe fallback."""
    if after is not None:
        for item in items:
            if item.key == after:
                break
        else:
            raise _changed()
    yield from items
