"""The item stream of all the sources of a run, in order, with keys kept apart between
sources; and the check, before any work, that every source exists and is of a known kind."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from imgfeat.errors import UsageError
from imgfeat.sources.folders import walk_folder
from imgfeat.sources.item import Item, is_image_name
from imgfeat.sources.lists import LIST_EXTENSIONS, is_list, read_list


def iter_items(sources: Iterable[str], after: str | None = None) -> Iterator[Item]:
    """Items of all sources in order; with several sources each key starts with its name.
    With `after` (the last key a resumed plan recorded), only the items after it: sources
    before the one holding it are not read, and a folder is walked from that key on."""
    sources = [str(s) for s in sources]
    if not sources:
        raise UsageError("no source given: name a folder of images or a list file")
    prefixes = _prefixes(sources)
    start, inner = (0, None) if after is None else _resume_point(sources, prefixes, after)
    for number in range(start, len(sources)):
        source, prefix = sources[number], prefixes[number]
        for item in _iter_source(source, inner if number == start else None):
            yield Item(prefix + item.key, item.path, item.error) if prefix else item


def can_resume_after(sources: list[str], after: str) -> bool:
    """Whether `iter_items(sources, after)` can seek to `after`: in a folder or past an image
    file. A list is read from its start (a listed key may repeat: only counting finds the
    recorded place in it)."""
    number, _ = _resume_point([str(s) for s in sources], _prefixes([str(s) for s in sources]),
                              after)
    return not is_list(Path(sources[number]))


def _resume_point(sources: list[str], prefixes: list[str], after: str) -> tuple[int, str]:
    """(the source holding the key `after`, the key within it)."""
    if len(sources) == 1:
        return 0, after
    for number in reversed(range(len(sources))):
        prefix = prefixes[number]
        if (prefix and after.startswith(prefix)) or \
                (not prefix and after == Path(sources[number]).name):
            return number, after[len(prefix):]
    raise _changed()


def _changed() -> UsageError:
    return UsageError("the source changed since this run's plan was recorded; rerun with "
                      "--overwrite to start again from the source as it is now")


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


def _iter_source(source: str, after: str | None = None) -> Iterator[Item]:
    path = Path(source)
    if path.is_dir():
        yield from walk_folder(path, after)
    elif is_list(path):
        yield from _after_key(read_list(path), after)
    elif after != path.name:
        yield Item(path.name, str(path))


def _after_key(items: Iterator[Item], after: str | None) -> Iterator[Item]:
    """A list's items after the key `after` (a list has no order to seek in: it is read)."""
    if after is not None:
        for item in items:
            if item.key == after:
                break
        else:
            raise _changed()
    yield from items
