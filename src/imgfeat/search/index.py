"""A faiss index of one layer of a store, kept in OUT/index/ beside it.

Built streaming: a sample of rows trains it, then rows are added a batch at a time, so memory
is the index itself. Cosine: inner product on unit vectors. Up to `FLAT_ROWS` rows the index
is exact (flat); above, an inverted file over 8-bit scalar-quantised vectors (a quarter of the
float32 memory), whose number of lists to visit (nprobe) is chosen at build time by measuring
recall@10 against exact search on rows of the store (docs/benchmarks.md has the figures
behind these choices)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgfeat.errors import UsageError
from imgfeat.search import exact
from imgfeat.search.deps import need
from imgfeat.search.fingerprint import fingerprint
from imgfeat.search.vectors import batches, dim, search_layer
from imgfeat.store.layout import commit, layer_dataset_name, temp_path, write_atomic

FLAT_ROWS = 20_000        # flat up to here: exact, and over 1,000 queries/s on 2 busy cores
                          # (186/s at 100,000 rows: docs/benchmarks.md)
TARGET_RECALL = 0.98      # calibration aims above the 0.95 promised, for queries off the store
CEILING_GAP = 0.01        # ... or this close to the recall of a full scan of the 8-bit vectors
CALIBRATION_QUERIES = 200
TRAIN_PER_LIST = 40       # faiss's k-means wants 39 to 256 points per centroid
ADD_BATCH = 16_384        # rows read and added at a time
KINDS = ("auto", "flat", "ivf")


@dataclass
class Index:
    """A loaded index and what it was built with."""

    faiss_index: object
    meta: dict

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (Q, k), best first; -1 rows where fewer than k exist."""
        scores, rows = self.faiss_index.search(np.ascontiguousarray(queries, np.float32), k)
        return scores, rows


def paths(store, layer: str) -> tuple[Path, Path]:
    folder = store.layout.index_dir  # beside the reader's row index (store/row_index.py)
    name = layer_dataset_name(layer)
    return folder / f"{name}.faiss", folder / f"{name}.json"


def rebuild_hint(store, layer: str) -> str:
    layer_flag = f" --layer {layer}" if len(store.layers) > 1 else ""
    return f"imgfeat index {store.layout.root}{layer_flag}"


def load(store, layer: str | None = None, required: bool = True) -> Index | None:
    """The index of `layer`, checked against the store; None where there is none and it is not
    `required`. A stale index is always refused: its rows would name the wrong images."""
    layer = search_layer(store, layer)
    index_path, meta_path = paths(store, layer)
    if not meta_path.exists() or not index_path.exists():
        if not required:
            return None
        raise UsageError(f"no index of layer {layer!r} in {store.layout.root}: build one with "
                         f"`{rebuild_hint(store, layer)}`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"the index in {index_path.parent} is unreadable ({exc}): rebuild it "
                         f"with `{rebuild_hint(store, layer)}`") from None
    if meta.get("fingerprint") != fingerprint(store):
        raise UsageError(f"the index in {index_path.parent} is stale (the store changed since "
                         f"it was built): rebuild it with `{rebuild_hint(store, layer)}`")
    faiss = need("faiss")
    try:
        loaded = faiss.read_index(str(index_path))
    except RuntimeError as exc:  # faiss's word for a damaged file
        raise UsageError(f"the index {index_path} is unreadable "
                         f"({str(exc).strip().splitlines()[-1][:200]}): rebuild it with "
                         f"`{rebuild_hint(store, layer)}`") from None
    if meta["kind"] == "ivf":
        loaded.nprobe = meta["nprobe"]
    return Index(loaded, meta)


def build(store, layer: str | None = None, kind: str = "auto", say=print) -> dict:
    """Build and save the index of `layer`; returns what it records."""
    faiss = need("faiss")
    layer = search_layer(store, layer)
    if kind not in KINDS:
        raise UsageError(f"unknown index kind {kind!r}; choose {', '.join(KINDS)}")
    rows, width = len(store), dim(store, layer)
    kind = ("flat" if rows <= FLAT_ROWS else "ivf") if kind == "auto" else kind
    started = time.perf_counter()
    meta = {"layer": layer, "kind": kind, "rows": rows, "dim": width, "metric": "cosine",
            "fingerprint": fingerprint(store)}
    if kind == "flat":
        index = faiss.IndexFlatIP(width)
    else:
        lists = min(ivf_lists(rows), rows)
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(width), width, lists,
                                              faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
        sample = _sample(store, layer, min(rows, lists * TRAIN_PER_LIST))
        say(f"training {lists} lists on {len(sample):,} of {rows:,} rows")
        index.train(sample)
        del sample  # memory is the index's from here on
        meta["lists"] = lists
    for start, vectors in batches(store, layer, ADD_BATCH):
        index.add(vectors)
        say(f"added {start + len(vectors):,} of {rows:,} rows")
    if kind == "ivf":
        meta["nprobe"], meta["calibrated_recall_at_10"] = _calibrate(store, layer, index)
    meta["build_seconds"] = round(time.perf_counter() - started, 2)
    _save(store, layer, index, meta)
    return meta


def ivf_lists(rows: int) -> int:
    """About 4 sqrt(N) lists, a power of two: faiss's guidance for an inverted file."""
    return int(2 ** round(math.log2(max(16.0, 4 * math.sqrt(rows)))))


def _sample(store, layer: str, count: int, seed: int = 0) -> np.ndarray:
    """`count` rows drawn at random over one pass of the store, into one array (no list of
    parts to join: the sample is the largest thing a build holds besides the index)."""
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(store), dtype=bool)
    chosen[rng.choice(len(store), count, replace=False)] = True
    sample = np.empty((count, dim(store, layer)), dtype=np.float32)
    filled = 0
    for start, vectors in batches(store, layer, ADD_BATCH):
        picked = vectors[chosen[start:start + len(vectors)]]
        sample[filled:filled + len(picked)] = picked
        filled += len(picked)
    return sample


def _calibrate(store, layer: str, index) -> tuple[int, float]:
    """The smallest nprobe (powers of two) whose recall@10 against exact search, on rows of the
    store as queries, is within CEILING_GAP of what visiting every list gives (8-bit vectors
    cap recall below 1: neighbours 10 and 11 are often closer than their rounding) and at most
    TARGET_RECALL."""
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(len(store), min(CALIBRATION_QUERIES, len(store)), replace=False))
    queries = np.ascontiguousarray(
        np.asarray(store.features(layer)[rows], np.float32).reshape(len(rows), -1))
    queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    k = min(10, len(store))
    _, truth = exact.top_k(store, layer, queries, k)

    def recall(nprobe: int) -> float:
        index.nprobe = nprobe
        return recall_at(index.search(queries, k)[1], truth)

    target = min(TARGET_RECALL, recall(index.nlist) - CEILING_GAP)
    nprobe = 1
    while nprobe < index.nlist and (found := recall(nprobe)) < target:
        nprobe *= 2
    nprobe = min(nprobe, index.nlist)
    return nprobe, round(recall(nprobe) if nprobe == index.nlist else found, 4)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true neighbours that were found, over all queries."""
    hits = sum(len(set(f) & set(t)) for f, t in zip(found.tolist(), truth.tolist()))
    return hits / truth.size


def _save(store, layer: str, index, meta: dict) -> None:
    faiss = need("faiss")
    index_path, meta_path = paths(store, layer)
    index_path.parent.mkdir(exist_ok=True)
    temp = temp_path(index_path)
    try:
        faiss.write_index(index, str(temp))
        commit(temp, index_path)
    finally:
        temp.unlink(missing_ok=True)
    write_atomic(meta_path, json.dumps(meta, indent=1).encode())
