"""Stores derived from a store: the same plan, keys and errors, with transformed features
(e.g. whitened). The result is a store like any other: open, verify and export it. Its
destination is a folder or, as for extract, a URL: written in a staging folder, each file
uploaded as it is committed (store/remote.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from imgfeat.errors import UsageError
from imgfeat.store.layout import Layout, write_atomic
from imgfeat.store.manifest import identity_digest, write_manifest
from imgfeat.store.paused_collection import paused
from imgfeat.store.reader import Store
from imgfeat.store.remote import open_for_reading, open_layout
from imgfeat.store.virtual import build_virtual_file
from imgfeat.store.writer import ShardWriter


def derive_store(store: Store, layer: str, dest: str | Path,
                 transform: Callable[[np.ndarray], np.ndarray], changes: dict,
                 overwrite: bool = False, files: dict[str, bytes] | None = None,
                 storage_options: dict | None = None) -> Store:
    """Write `dest` with the features of `layer` in every committed shard passed through
    `transform`; `changes` are the manifest fields that differ ("layers" among them), `files`
    small files written beside them (a whitening)."""
    target = _target(store, dest, overwrite, storage_options)
    manifest = json.loads(json.dumps(store.manifest))
    manifest.update(changes, derived_from=store.location)
    write_manifest(target, manifest)
    _copy_plan(store.layout, target)
    shapes = {name: tuple(shape) for name, shape in manifest["layers"].items()}
    for index in store.shards:
        _derive_shard(store, index, layer, target, manifest, transform)
    for name, data in (files or {}).items():
        write_atomic(target.root / name, data)
        if target.remote is not None:
            target.remote.publish(target.root / name, name)
    if target.remote is not None:  # elsewhere, readers stitch the shards themselves
        return Store(open_for_reading(target.location, storage_options))
    build_virtual_file(target, sorted(target.committed()), shapes, manifest["dtype"])
    return Store(target.root)


def _target(store: Store, dest: str | Path, overwrite: bool,
            storage_options: dict | None) -> Layout:
    """The destination's layout, emptied of a store there with `overwrite`, else refused."""
    target = open_layout(dest, storage_options)
    if _where(target) == _where(store.layout):
        raise UsageError("the derived store must go to another folder than its source")
    if target.remote is not None:
        occupied = bool(target.remote.names())
    else:
        occupied = target.root.exists() and any(target.root.iterdir())
    if occupied:
        if not overwrite:
            raise UsageError(f"{target.location} is not empty; choose another "
                             f"{'prefix' if target.remote else 'folder'} or pass --overwrite")
        target.remove_own()
    return target


def _where(layout: Layout) -> str:
    return layout.remote.url if layout.remote is not None else str(layout.root.resolve())


def _copy_plan(source: Layout, target: Layout) -> None:
    shutil.copytree(source.plan_dir, target.plan_dir,
                    ignore=shutil.ignore_patterns("*.position", ".*"))
    if target.remote is not None:
        for index in sorted(target.planned()):
            path = target.plan_file(index)
            target.remote.publish(path, f"plan/{path.name}")


@paused
def _derive_shard(store: Store, index: int, layer: str, target: Layout, manifest: dict,
                  transform: Callable[[np.ndarray], np.ndarray]) -> None:
    source = store._shard(index)
    shapes = {name: tuple(shape) for name, shape in manifest["layers"].items()}
    keys = source["keys"].asstr()[:].tolist()
    writer = ShardWriter(target, index, shapes, manifest["dtype"], max(1, len(keys)),
                         identity=identity_digest(manifest))
    try:
        if keys:
            features = transform(store._dataset(index, layer)[:])
            writer.add_rows(keys, {name: features.astype(manifest["dtype"])
                                   for name in shapes})
        for key, reason in zip(source["errors/keys"].asstr()[:],
                               source["errors/reasons"].asstr()[:]):
            writer.add_error(key, reason)
        writer.commit()
    finally:
        writer.discard()
