"""Exact top-k by streaming the store: memory is the queries, one batch and the running top-k,
whatever the size of the store."""

from __future__ import annotations

import numpy as np

from imgfeat.search.vectors import batches


def top_k(store, layer: str, queries: np.ndarray, k: int, batch: int = 65_536,
          query_block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows), each (Q, k), best first, of unit `queries` against every row; rows
    past the store's size are -1 with score -inf. Scores are held for `query_block` queries
    by one batch at a time (128 MB at the defaults)."""
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_rows = np.full((len(queries), k), -1, dtype=np.int64)
    for start, vectors in batches(store, layer, batch):
        for first in range(0, len(queries), query_block):
            block = slice(first, first + query_block)
            scores, rows = _batch_top(queries[block] @ vectors.T, k)
            best_scores[block], best_rows[block] = merge(
                best_scores[block], best_rows[block], scores, rows + start, k)
    return best_scores, best_rows


def _batch_top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns of each row of `scores`, unordered, and their scores."""
    if scores.shape[1] <= k:
        return scores, np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    columns = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return np.take_along_axis(scores, columns, 1), columns


def merge(scores_a: np.ndarray, rows_a: np.ndarray, scores_b: np.ndarray, rows_b: np.ndarray,
          k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two candidate sets per query, best first; ties go to the lower row."""
    scores = np.concatenate([scores_a, scores_b], axis=1)
    rows = np.concatenate([rows_a, rows_b], axis=1)
    if scores.shape[1] > k:
        keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, keep, 1)
        rows = np.take_along_axis(rows, keep, 1)
    order = np.lexsort((rows, -scores), axis=1) if scores.size else rows
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
