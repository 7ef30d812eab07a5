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
from imgfeat.store.manifest import identity_digest, write_manifest
from imgfeat.store.reader import Store
from imgfeat.store.virtual import build_virtual_file
from imgfeat.store.writer import ShardWriter


def derive_store(store: Store, layer: str, dest: str | Path,
                 transform: Callable[[np.ndarray], np.ndarray], changes: dict,
                 overwrite: bool = False) -> Store:
    """Write `dest` with the features of `layer` in every committed shard passed through
    `transform`; `changes` are the manifest fields that differ ("layers" among them)."""
    target = Layout(Path(dest).resolve())
    if target.root.resolve() == store.layout.root.resolve():
        raise UsageError("the derived store must go to another folder than its source")
    if target.root.exists() and any(target.root.iterdir()):
        if not overwrite:
            raise UsageError(f"{target.root} is not empty; choose another folder or pass "
                             "--overwrite")
        target.remove_own()
    manifest = json.loads(json.dumps(store.manifest))
    manifest.update(changes, derived_from=str(store.layout.root))
    write_manifest(target, manifest)
    shutil.copytree(store.layout.plan_dir, target.plan_dir,
                    ignore=shutil.ignore_patterns("*.position", ".*"))
    shapes = {name: tuple(shape) for name, shape in manifest["layers"].items()}
    for index in store.shards:
        source = store._shard(index)
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
    build_virtual_file(target, sorted(target.committed()), shapes, manifest["dtype"])
    return Store(target.root)
