"""One layer of a store made searchable: its index where one is built and fresh, else exact
search by streaming; queries as rows, vectors, images or texts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imgfeat.errors import UsageError
from imgfeat.search import exact
from imgfeat.search import index as index_mod
from imgfeat.search.keys import keys_of
from imgfeat.search.query import Embedder, Query, resolve
from imgfeat.search.vectors import search_layer, unit


@dataclass(frozen=True)
class Hit:
    row: int
    key: str
    score: float


class Searcher:
    """`use_index`: "auto" (the index if built, else exact), "index" (required) or "exact"."""

    def __init__(self, store, layer: str | None = None, use_index: str = "auto"):
        self.store = store
        self.layer = search_layer(store, layer)
        self.index = None if use_index == "exact" else index_mod.load(
            store, self.layer, required=use_index == "index")
        self.embedder = Embedder(store, self.layer)

    @property
    def method(self) -> str:
        return f"index ({self.index.meta['kind']})" if self.index else "exact"

    def vectors_of_rows(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        return unit(self.store.features(self.layer)[rows])

    def top(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """The k nearest rows of each unit query vector, best first."""
        if k < 1:
            raise UsageError(f"-k must be at least 1, got {k}")
        k = min(k, len(self.store))
        if self.index is not None and self.index.meta["kind"] != "flat":
            scores, rows = self._reranked(queries, k)
        elif self.index is not None:
            scores, rows = self.index.search(queries, k)
        else:
            scores, rows = exact.top_k(self.store, self.layer, queries, k)
        keys = iter(keys_of(self.store, rows[rows >= 0]))
        return [[Hit(int(r), next(keys), float(s)) for s, r in zip(qs, qr) if r >= 0]
                for qs, qr in zip(scores, rows)]

    def _reranked(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """A compressed index's candidates (twice k) scored again on the stored vectors: its
        8-bit scores can swap an image and its exact copy, whose cosines differ by 1e-4."""
        wide = min(len(self.store), 2 * k + 8)
        _, rows = self.index.search(queries, wide)
        found = np.unique(rows[rows >= 0])
        vectors = self.vectors_of_rows(found)
        scores = np.full(rows.shape, -np.inf, dtype=np.float32)
        for q, query_rows in enumerate(rows):
            valid = query_rows >= 0
            scores[q, valid] = vectors[np.searchsorted(found, query_rows[valid])] @ queries[q]
        return exact.merge(scores[:, :0], rows[:, :0], scores, rows, k)

    def embed(self, queries: list[Query]) -> np.ndarray:
        """Unit vectors of resolved queries: rows read from the store, images embedded."""
        out = np.zeros((len(queries), self._dim()), dtype=np.float32)
        stored = [i for i, q in enumerate(queries) if q.row is not None]
        if stored:
            out[stored] = self.vectors_of_rows([queries[i].row for i in stored])
        images = [i for i, q in enumerate(queries) if q.row is None]
        if images:
            out[images] = self.embedder.images([(queries[i].label, queries[i].data)
                                                for i in images])
        return out

    def search(self, texts: list[str], k: int = 10, text: list[str] | None = None
               ) -> list[tuple[str, list[Hit]]]:
        """(query label, hits) for each query argument (keys, image files, folders, URLs) and
        each text query."""
        labelled: list[tuple[str, np.ndarray]] = []
        queries = resolve(self.store, texts)
        if queries:
            labelled += zip([q.label for q in queries], self.embed(queries))
        if text:
            labelled += zip([f"text: {t}" for t in text], self.embedder.texts(text))
        if not labelled:
            raise UsageError("give at least one query: an image, a folder, a URL, a key of "
                             "the store, or --text")
        hits = self.top(np.stack([vector for _, vector in labelled]), k)
        return [(label, found) for (label, _), found in zip(labelled, hits)]

    def neighbours(self, key: str, k: int = 10) -> list[Hit]:
        """The k nearest other rows of a key of the store."""
        if key not in self.store:
            raise UsageError(f"no key {key!r} in {self.store.layout.root}")
        row = self.store.index(key)
        found = self.top(self.vectors_of_rows([row]), k + 1)[0]
        return [hit for hit in found if hit.row != row][:k]

    def _dim(self) -> int:
        return int(np.prod(self.store.feature_shapes[self.layer]))


def searcher_of(store, layer: str | None) -> Searcher:
    """One Searcher per store and layer, so that the model is loaded once."""
    cache = store.__dict__.setdefault("_searchers", {})
    chosen = search_layer(store, layer)
    if chosen not in cache:
        cache[chosen] = Searcher(store, chosen)
    return cache[chosen]


def store_search(store, queries, k: int = 10, layer: str | None = None,
                 text: list[str] | None = None) -> list[list[tuple[str, float]]]:
    """`Store.search`: queries are vectors (an array of rows) or strings (keys, image files,
    folders, URLs); `text` adds text queries. One list of (key, score) per query."""
    searcher = searcher_of(store, layer)
    if isinstance(queries, np.ndarray):
        vectors = unit(queries.reshape(len(queries), -1) if queries.ndim > 1
                       else queries[None])
        found = searcher.top(vectors, k)
    else:
        labels = [queries] if isinstance(queries, str) else list(queries or [])
        found = [hits for _, hits in searcher.search(labels, k, text)]
    return [[(hit.key, hit.score) for hit in hits] for hits in found]


def store_neighbours(store, key: str, k: int = 10, layer: str | None = None
                     ) -> list[tuple[str, float]]:
    return [(hit.key, hit.score) for hit in searcher_of(store, layer).neighbours(key, k)]
