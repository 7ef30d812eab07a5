"""The item stream of all the sources of a run, in order, with keys kept apart between
sources; and the check, before any work, that every source exists and is of a known kind."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from imgfeat.errors import UsageError
from imgfeat.sources.folders import walk_folder
from imgfeat.sources.item import Item, is_image_name
from imgfeat.sources.lists import LIST_EXTENSIONS, is_list, read_list


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
        if path.is_file() and not (is_image_name(path.name) or is_list(path)):
            raise UsageError(
                f"source {source} is neither a folder, an image nor a list file "
                f"({', '.join(sorted(LIST_EXTENSIONS))})"
            )
        checked.append(str(path))
    _prefixes(checked)
    return checked


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
    elif is_list(path):
        yield from read_list(path)
    else:
        yield Item(path.name, str(path))
