"""Keys of rows, read from their shards: a search names a few rows, and a store of ten million
rows should not load ten million keys to name them."""

from __future__ import annotations

import numpy as np

from imgfeat.store.paused_collection import paused


@paused
def keys_of(store, rows) -> list[str]:
    """The keys of `rows` (any order, repeats allowed)."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty(len(rows), dtype=object)
    if not len(rows):
        return []
    owner = np.searchsorted(store._offsets, rows, side="right") - 1
    for position in np.unique(owner):
        mask = owner == position
        local = rows[mask] - store._offsets[position]
        unique, inverse = np.unique(local, return_inverse=True)
        found = store._shard(store.shards[position])["keys"].asstr()[unique.tolist()]
        out[mask] = np.asarray(found, dtype=object)[inverse]
    return out.tolist()
