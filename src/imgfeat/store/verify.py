"""`imgfeat verify`: read every committed shard and check it against the manifest and the plan.
Keys are checked for uniqueness with an on-disk index, so memory stays bounded."""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import h5py

from imgfeat.plan.shards import read_shard_items
from imgfeat.store.layout import feature_datasets
from imgfeat.store.manifest import identity_digest
from imgfeat.store.paused_collection import paused
from imgfeat.store.reader import Store

MAX_DUPLICATES_SHOWN = 3


def verify(store: Store) -> list[str]:
    """Everything wrong with the store, one readable line each; empty when all is well."""
    problems: list[str] = []
    if store.planned_shards is None:
        problems.append("the plan is not complete: the extract run never finished listing")
    problems += store.plan_problems
    problems += [f"shard {i} is missing (planned, never committed)"
                 for i in store.missing_shards]
    planned = set(store.plan_files)
    problems += [f"shard {i} is not in the plan" for i in store.shards if i not in planned]
    with tempfile.TemporaryDirectory(prefix="imgfeat-verify-") as scratch:
        seen = _KeyOwners(Path(scratch) / "keys.sqlite")
        for index in store.shards:
            problems += list(_check_shard(store, index, seen))
        seen.close()
    return problems


class _KeyOwners:
    """Which shard first held each key, on disk."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(path)
        self._db.execute("CREATE TABLE owners (key TEXT PRIMARY KEY, shard INT) WITHOUT ROWID")

    def claim(self, key: str, shard: int) -> int | None:
        """None if `key` is new, else the shard that holds it already."""
        cursor = self._db.execute("INSERT OR IGNORE INTO owners VALUES (?, ?)", (key, shard))
        if cursor.rowcount == 1:
            return None
        return self._db.execute("SELECT shard FROM owners WHERE key = ?", (key,)).fetchone()[0]

    def close(self) -> None:
        self._db.close()


@paused
def _read_shard(store: Store, index: int, datasets: dict[str, str]) -> tuple:
    """(identity, keys, error keys, reasons, {layer: (shape, dtype, rows)}) of a shard,
    every feature read once (a damaged chunk raises here)."""
    with store.layout.open_shard(index) as shard:
        identity = shard.attrs.get("identity")
        keys = shard["keys"].asstr()[:].tolist()
        error_keys = shard["errors/keys"].asstr()[:].tolist()
        reasons = shard["errors/reasons"].asstr()[:].tolist()
        found = {}
        for layer, path in datasets.items():
            features = shard[path]
            found[layer] = (tuple(features.shape[1:]), features.dtype, features.shape[0])
            _read_all(features)
    return identity, keys, error_keys, reasons, found


def _check_shard(store: Store, index: int, seen: _KeyOwners) -> Iterator[str]:
    name = f"shard {index} ({store.layout.shard_file(index).name})"
    datasets = feature_datasets(store.layers)
    try:
        identity, keys, error_keys, reasons, found = _read_shard(store, index, datasets)
    except (OSError, KeyError, ValueError) as exc:
        yield f"{name} is unreadable: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        return
    if identity is not None and identity != identity_digest(store.manifest):
        yield f"{name} holds features of another run (identity {identity}, the manifest's is " \
              f"{identity_digest(store.manifest)})"
    for layer, (shape, dtype, rows) in found.items():
        label = f"{name} {datasets[layer]}"
        if shape != store.feature_shapes[layer] or dtype != store.dtype:
            yield (f"{label} holds {shape} {dtype}, the manifest says "
                   f"{store.feature_shapes[layer]} {store.dtype}")
        if rows != len(keys):
            yield f"{label} has {rows} feature rows for {len(keys)} keys"
    if len(reasons) != len(error_keys):
        yield f"{name} has {len(reasons)} reasons for {len(error_keys)} errors"
    yield from _check_plan(store, index, name, keys, error_keys)
    # a listed duplicate is recorded as an error under the same key as its row: expected
    recorded = keys + [k for k, r in zip(error_keys, reasons) if not r.startswith("duplicate")]
    duplicates = [(k, owner) for k in recorded if (owner := seen.claim(k, index)) is not None]
    for key, owner in duplicates[:MAX_DUPLICATES_SHOWN]:
        where = "earlier in this shard" if owner == index else f"also in shard {owner}"
        yield f"{name}: duplicate key {key!r} ({where})"
    if len(duplicates) > MAX_DUPLICATES_SHOWN:
        yield f"{name}: {len(duplicates) - MAX_DUPLICATES_SHOWN} more duplicate keys"


def _check_plan(store: Store, index: int, name: str, keys: list[str],
                error_keys: list[str]) -> Iterator[str]:
    if not store.layout.plan_file(index).exists():
        yield f"{name} has no plan file"
        return
    planned = [item.key for item in read_shard_items(store.layout, index)]
    if len(keys) + len(error_keys) != len(planned):
        yield (f"{name} accounts for {len(keys)} rows + {len(error_keys)} errors, "
               f"the plan has {len(planned)} items")
    elif sorted(keys + error_keys) != sorted(planned):
        yield f"{name}: its keys are not the planned ones"
    else:
        failed = set(error_keys)
        if keys != [k for k in planned if k not in failed]:
            yield f"{name}: rows are not in plan order"


def _read_all(dataset: h5py.Dataset, rows: int = 4096) -> None:
    """Read every chunk, so that a corrupt block is found, not just a good header."""
    for start in range(0, dataset.shape[0], rows):
        dataset[start:start + rows]
