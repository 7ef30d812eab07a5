"""The plan cuts the ordered item stream into fixed shards and records them in the output folder.

A shard's item list is written to `plan/shard-NNNNNN.jsonl` (atomically) before any work on it,
so a rerun sees the same shards even if the source folder has changed since. Planning streams:
it holds one shard's items at a time, and finds duplicate keys with an on-disk index rather
than a set of every key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

from imgfeat.errors import UsageError
from imgfeat.plan.key_index import KeyIndex
from imgfeat.sources import Item
from imgfeat.store.layout import Layout, write_atomic


@dataclass(frozen=True)
class Shard:
    """A description of one shard: small enough for a coordinator to hold millions."""

    index: int
    count: int


SKIPPED_FILE = "skipped.json"  # in plan/: files the walk skipped for their type, so far


def write_shard_items(layout: Layout, index: int, items: list[Item]) -> None:
    lines = [json.dumps(item.to_json()) for item in items]
    write_atomic(layout.plan_file(index), ("\n".join(lines) + "\n").encode())


def read_shard_items(layout: Layout, index: int) -> list[Item]:
    plan_file = layout.plan_file(index)
    if layout.remote is not None and not plan_file.exists():  # a worker on another machine
        layout.remote.fetch(f"plan/{plan_file.name}", plan_file)
    try:
        text = layout.plan_file(index).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"plan of shard {index} is unreadable: {exc}") from None
    return [Item.from_json(json.loads(line)) for line in text.splitlines() if line]


def record_skipped(layout: Layout, shards: int, skipped: int) -> None:
    """Record how many files the walk skipped for their type up to the end of the first
    `shards` shards. Written before that plan file, and keeping the count before it too, so
    that whichever instant a run dies at, the count at its last plan file's end is there."""
    counts = _skipped_counts(layout)
    kept = {str(shards - 1): counts[str(shards - 1)]} if str(shards - 1) in counts else {}
    write_atomic(layout.plan_dir / SKIPPED_FILE,
                 json.dumps({**kept, str(shards): skipped}).encode())


def recorded_skipped(layout: Layout, shards: int) -> int | None:
    """The files skipped up to the end of the first `shards` shards, if recorded."""
    return _skipped_counts(layout).get(str(shards))


def _skipped_counts(layout: Layout) -> dict[str, int]:
    try:
        return json.loads((layout.plan_dir / SKIPPED_FILE).read_text())
    except (OSError, ValueError):
        return {}  # none yet, or a store written before the count was recorded


def last_planned_key(layout: Layout, already: list[Shard]) -> str | None:
    """The key of the last item of the recorded plan: where a resumed walk starts after."""
    return read_shard_items(layout, already[-1].index)[-1].key if already else None


def recorded_shards(layout: Layout, counts: list[int] = ()) -> list[Shard]:
    """Shards already planned, in order: the contiguous run of plan files from 0. The plan files
    are the truth a resumed run schedules from; the manifest's copy of the plan may lag. Where
    that copy (`counts`) records exactly the shards on disk, its counts are theirs (a plan file
    never changes once written), so a resume need not read every plan file again."""
    on_disk = layout.planned()
    if len(counts) != len(on_disk):  # a plan being written, or a damaged store: count them
        counts = ()
    shards = []
    while (index := len(shards)) in on_disk:
        count = counts[index] if index < len(counts) else count_shard_items(layout, index)
        shards.append(Shard(index, count))
    return shards


def count_shard_items(layout: Layout, index: int) -> int:
    """Items in a plan file: its lines, counted without parsing them (one item a line)."""
    try:
        with open(layout.plan_file(index), "rb") as handle:
            return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))
    except OSError as exc:
        raise UsageError(f"plan of shard {index} is unreadable: {exc}") from None


def plan_shards(
    items: Iterable[Item], layout: Layout, shard_size: int, already: list[Shard],
    skip_known: bool = False, seeked: bool = False, tally=None,
) -> Iterator[Shard]:
    """Write and yield the shards after `already` (those recorded before).

    Without `skip_known`, the walk is a resumed one: its first items are those of `already`
    and are skipped. With it (incremental runs), items whose key is already planned are
    skipped wherever they are, and only new keys make new shards. With `seeked`, `items`
    start after the recorded ones already (sources.iter_items with `after`). With `tally`
    (the walk's count of files skipped for their type), the count up to each shard's end is
    recorded before its plan file, so that a walk resumed after it can start from it.
    """
    rebuild = bool(already) and not layout.key_index.exists()  # a fresh staging folder
    index = KeyIndex(layout.key_index)
    try:
        stream = iter(items)
        for shard in (already if rebuild else already[-1:]):  # also: a crash between a plan
            index.add_new([item.key for item in read_shard_items(layout, shard.index)])  # file
        # and its key commit left keys out
        if skip_known:
            stream = (item for item in stream if not index.contains(item.key))
        elif not seeked:
            _skip_recorded(stream, index, layout, already)
        index.commit()  # only keys of plan files on disk: what a resumed walk agrees with
        number = len(already)
        while batch := list(islice(stream, shard_size)):
            fresh = index.add_new([item.key for item in batch])
            batch = [item if new or item.error else
                     item.failed("duplicate key: an earlier item has the same key")
                     for item, new in zip(batch, fresh)]
            if tally is not None:
                record_skipped(layout, number + 1, tally.skipped)
            write_shard_items(layout, number, batch)
            index.commit()  # after the plan file: a crash in between re-adds on resume
            yield Shard(number, len(batch))
            number += 1
    finally:
        index.close()


def _skip_recorded(stream: Iterator[Item], index: KeyIndex, layout: Layout,
                   already: list[Shard]) -> None:
    """Consume the items a resumed walk has already planned, checking the walk agrees."""
    keys: list[str] = []
    # Keys of recorded shards are in the index already (committed after each plan file; the
    # last one re-added above), unless the index was lost: only then are they added again.
    readd = index.empty()
    for shard in already:
        keys = [item.key for item in islice(stream, shard.count)]
        if readd:
            index.add_new(keys)
    if already and keys[-1:] != [read_shard_items(layout, already[-1].index)[-1].key]:
        raise UsageError(
            "the source changed since this run's plan was recorded; "
            "rerun with --overwrite to start again from the source as it is now"
        )
