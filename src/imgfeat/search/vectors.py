"""The vectors every search works on: a layer's features as float32 rows, L2-normalised so
that inner product is cosine."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from imgfeat.errors import UsageError

EPS = 1e-12


def unit(features: np.ndarray) -> np.ndarray:
    """(N, ...) features as (N, D) float32 unit rows (a zero row stays zero)."""
    rows = np.ascontiguousarray(features, dtype=np.float32).reshape(len(features), -1)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, EPS)


def search_layer(store, layer: str | None) -> str:
    """The layer to search: named, or the only one; a store without rows is refused."""
    chosen = store._layer(layer)
    if len(store) == 0:
        raise UsageError(f"{store.layout.root} holds no features for layer {chosen!r} "
                         "(no committed rows): extract first")
    return chosen


def dim(store, layer: str) -> int:
    return int(np.prod(store.feature_shapes[layer]))


def batches(store, layer: str, size: int = 65_536) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, unit vectors) of `size` rows at a time, in row order."""
    start = 0
    for keys, features in store.iter_batches(size, layer):
        yield start, unit(features)
        start += len(keys)
