"""Stores derived from a store: the same plan, keys and errors, with transformed features
(e.g. whitened). The result is a store like any other: open, verify and export it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from imgfeat.errors import UsageError
from imgfeat.store.layout import Layout
from imgfeat.store.manifest import write_manifest
from imgfeat.store.reader import Store
from imgfeat.store.virtual import build_virtual_file
from imgfeat.store.writer import ShardWriter


def derive_store(store: Store, dest: str | Path, transform: Callable[[np.ndarray], np.ndarray],
                 changes: dict, overwrite: bool = False) -> Store:
    """Write `dest` with every committed shard's features passed through `transform`;
    `changes` are the manifest fields that differ (feature_shape among them)."""
    target = Layout(Path(dest).resolve())
    if target.root.resolve() == store.layout.root.resolve():
        raise UsageError("the derived store must go to another folder than its source")
    if target.root.exists() and any(target.root.iterdir()):
        if not overwrite:
            raise UsageError(f"{target.root} is not empty; choose another folder or pass "
                             "--overwrite")
        for path in target.own_paths():
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    manifest = json.loads(json.dumps(store.manifest))
    manifest.update(changes, derived_from=str(store.layout.root))
    write_manifest(target, manifest)
    shutil.copytree(store.layout.plan_dir, target.plan_dir,
                    ignore=shutil.ignore_patterns("*.position", ".*"))
    shape = tuple(manifest["feature_shape"])
    for index in store.shards:
        source = store._shard(index)
        keys = source["keys"].asstr()[:].tolist()
        writer = ShardWriter(target, index, shape, manifest["dtype"], max(1, len(keys)))
        try:
            if keys:
                writer.add_rows(keys, transform(source["features"][:]).astype(manifest["dtype"]))
            for key, reason in zip(source["errors/keys"].asstr()[:],
                                   source["errors/reasons"].asstr()[:]):
                writer.add_error(key, reason)
            writer.commit()
        finally:
            writer.discard()
    build_virtual_file(target, sorted(target.committed()), shape, manifest["dtype"])
    return Store(target.root)
