"""Near-duplicate groups: the k-nearest-neighbour graph of a layer, its edges at or above a
cosine threshold, and the connected components of those edges. Memory: the index (or one batch
of exact search), a parent per row, and the edges found, which are few at duplicate-level
thresholds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imgfeat.errors import UsageError
from imgfeat.search import exact
from imgfeat.search.index import FLAT_ROWS, rebuild_hint
from imgfeat.search.vectors import batches

DEFAULT_THRESHOLD = 0.95
NEIGHBOURS = 10  # a group larger than this is still found whole: its members chain up
# Lists an inverted-file index visits per row in dedup: a near-duplicate sits in its original's
# list or a neighbouring one, so fewer than a search's calibrated nprobe find them (measured
# on planted copies by bench/search.py).
DEDUP_NPROBE = 16


@dataclass
class Groups:
    """Members of every group, by group then similarity to the representative (first)."""

    group: np.ndarray       # group number of each member, 0..
    row: np.ndarray         # the member's row in the store
    similarity: np.ndarray  # cosine to the group's representative (itself: 1)

    @property
    def count(self) -> int:
        return int(self.group.max()) + 1 if len(self.group) else 0

    def representatives(self) -> np.ndarray:
        firsts = np.flatnonzero(np.diff(self.group, prepend=-1))
        return self.row[firsts]


def find_groups(searcher, threshold: float = DEFAULT_THRESHOLD, k: int = NEIGHBOURS,
                batch: int = 8192, say=None) -> Groups:
    """Groups of rows whose chains of neighbours are all at or above `threshold`."""
    if not -1 <= threshold <= 1:
        raise UsageError(f"--threshold is a cosine, between -1 and 1; got {threshold}")
    store, layer = searcher.store, searcher.layer
    if searcher.index is None and len(store) > FLAT_ROWS:
        raise UsageError(f"{store.layout.root} has {len(store):,} rows: build an index first "
                         f"with `{rebuild_hint(store, layer)}`")
    if searcher.index is not None and searcher.index.meta["kind"] == "ivf":
        searcher.index.faiss_index.nprobe = min(searcher.index.meta["nprobe"], DEDUP_NPROBE)
    parent = np.arange(len(store), dtype=np.int64)
    k = min(k + 1, len(store))
    for start, vectors in batches(store, layer, batch):
        if searcher.index is not None:
            scores, rows = searcher.index.search(vectors, k)
        else:
            scores, rows = exact.top_k(store, layer, vectors, k)
        sources = np.arange(start, start + len(vectors))[:, None]
        near = (scores >= threshold) & (rows >= 0) & (rows != sources)
        _union(parent, np.broadcast_to(sources, rows.shape)[near], rows[near])
        if say:
            say(f"compared {start + len(vectors):,} of {len(store):,} rows")
    return _collect(searcher, _roots(parent))


def _find(parent: np.ndarray, node: int) -> int:
    while parent[node] != node:
        parent[node] = parent[parent[node]]  # path halving keeps chains short
        node = parent[node]
    return node


def _union(parent: np.ndarray, left: np.ndarray, right: np.ndarray) -> None:
    for a, b in zip(left.tolist(), right.tolist()):
        ra, rb = _find(parent, a), _find(parent, b)
        if ra != rb:  # the smaller row is the root: the representative comes first in order
            parent[max(ra, rb)] = min(ra, rb)


def _roots(parent: np.ndarray) -> np.ndarray:
    roots = parent.copy()
    while True:
        hop = roots[roots]
        if np.array_equal(hop, roots):
            return roots
        roots = hop


def _collect(searcher, roots: np.ndarray, chunk: int = 65_536) -> Groups:
    """Groups of two or more, numbered by their representative (their first row)."""
    counts = np.bincount(roots, minlength=len(roots))
    members = np.flatnonzero(counts[roots] >= 2)
    member_roots = roots[members]
    order = np.lexsort((members, member_roots))
    members, member_roots = members[order], member_roots[order]
    _, group = np.unique(member_roots, return_inverse=True)
    similarity = np.empty(len(members), dtype=np.float32)
    for start in range(0, len(members), chunk):
        part = slice(start, start + chunk)
        rows, reps = members[part], member_roots[part]
        similarity[part] = np.sum(_vectors(searcher, rows) * _vectors(searcher, reps), axis=1)
    # The representative first, whatever rounding says of an exact copy's similarity.
    by_similarity = np.lexsort((-similarity, members != member_roots, group))
    return Groups(group[by_similarity].astype(np.int64), members[by_similarity],
                  similarity[by_similarity])


def _vectors(searcher, rows: np.ndarray) -> np.ndarray:
    unique, inverse = np.unique(rows, return_inverse=True)
    return searcher.vectors_of_rows(unique)[inverse]
