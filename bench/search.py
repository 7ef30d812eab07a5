"""Search at scale: 1M vectors of dimension 512 (clustered synthetic ones, 1% planted
near-copies) written as a store; then the index build's time and peak memory, recall@10 of
the index against exact search on queries off the store, its queries per second, and dedup's
time. Each phase runs in a process of its own so that its peak memory (ru_maxrss) is its own.

    python bench/search.py [--rows 1000000] [--dim 512] [--work /tmp/imgfeat-bench-search]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHARD_ROWS = 10_000
CLUSTERS = 10_000
SPREAD = 1.0          # noise norm relative to the cluster centre's: cosine 0.5 within
COPY_NOISE = 0.02     # a planted copy's noise: cosine about 0.9998 to its original
COPY_SHARE = 0.01
QUERIES = 10_000
TRUTH_QUERIES = 1_000


def make_store(root: Path, rows: int, dim: int) -> None:
    """A store of `rows` vectors, written shard by shard with the project's shard writer."""
    from imgfeat.store.layout import Layout
    from imgfeat.store.manifest import FORMAT, write_manifest
    from imgfeat.store.writer import ShardWriter

    layout = Layout(root)
    rng = np.random.default_rng(0)
    centres = _centres(dim)
    shards = (rows + SHARD_ROWS - 1) // SHARD_ROWS
    planted = 0
    for index in range(shards):
        count = min(SHARD_ROWS, rows - index * SHARD_ROWS)
        vectors = _points(rng, centres, count)
        copies = rng.random(count) < COPY_SHARE
        originals = rng.integers(0, count, copies.sum())
        # A copy of a row that is itself replaced by a copy has no original left to match.
        planted += int(copies.sum() - copies[originals].sum())
        vectors[copies] = vectors[originals] + rng.normal(0, COPY_NOISE / np.sqrt(dim),
                                                          (copies.sum(), dim))
        keys = [f"{index:04d}/{i:05d}" for i in range(count)]
        writer = ShardWriter(layout, index, {"output": (dim,)}, "float16", count)
        writer.add_rows(keys, {"output": vectors.astype(np.float16)})
        writer.commit()
    write_manifest(layout, {"format": FORMAT, "model": {"spec": "synthetic"},
                            "weights": {"kind": "random"}, "layers": {"output": [dim]},
                            "pool": "avg", "l2": False, "dtype": "float16",
                            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "plan": {"complete": True, "shards": [SHARD_ROWS] * shards}})
    (root / "planted.json").write_text(json.dumps({"copies_with_original": planted}))


def _centres(dim: int) -> np.ndarray:
    centres = np.random.default_rng(1).normal(size=(CLUSTERS, dim)).astype(np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def _points(rng, centres: np.ndarray, count: int) -> np.ndarray:
    dim = centres.shape[1]
    picks = rng.integers(0, len(centres), count)
    return centres[picks] + rng.normal(0, SPREAD / np.sqrt(dim), (count, dim)).astype(np.float32)


def phase_build(root: Path) -> dict:
    from imgfeat.search.index import build
    from imgfeat.store.reader import Store

    began = time.perf_counter()
    with Store(root) as store:
        meta = build(store, say=lambda _: None)
    return {"build_s": time.perf_counter() - began, "meta": meta}


def phase_query(root: Path) -> dict:
    from imgfeat.search import exact
    from imgfeat.search.index import load, recall_at
    from imgfeat.search.vectors import unit
    from imgfeat.store.reader import Store

    dim = None
    with Store(root) as store:
        dim = store.feature_shape[0]
        queries = unit(_points(np.random.default_rng(7), _centres(dim), QUERIES))
        index = load(store)
        began = time.perf_counter()
        _, found = index.search(queries, 10)
        qps = QUERIES / (time.perf_counter() - began)
        single = time.perf_counter()
        for query in queries[:500]:
            index.search(query[None], 10)
        qps_one = 500 / (time.perf_counter() - single)
        began = time.perf_counter()
        _, truth = exact.top_k(store, "output", queries[:TRUTH_QUERIES], 10)
        exact_s = time.perf_counter() - began
    return {"qps_batch": qps, "qps_one_at_a_time": qps_one,
            "recall_at_10": recall_at(found[:TRUTH_QUERIES], truth),
            "exact_qps_streaming": TRUTH_QUERIES / exact_s}


def phase_flat(root: Path) -> dict:
    """Queries per second of a flat index at the flat/IVF boundary (FLAT_ROWS rows)."""
    import faiss

    from imgfeat.search.index import FLAT_ROWS
    from imgfeat.search.vectors import batches, unit
    from imgfeat.store.reader import Store

    with Store(root) as store:
        dim = store.feature_shape[0]
        flat = faiss.IndexFlatIP(dim)
        for start, vectors in batches(store, "output"):
            flat.add(vectors[:max(0, FLAT_ROWS - start)])
            if start + len(vectors) >= FLAT_ROWS:
                break
    queries = unit(_points(np.random.default_rng(8), _centres(dim), 2_000))
    began = time.perf_counter()
    flat.search(queries, 10)
    return {"flat_rows": flat.ntotal, "flat_qps_batch": 2_000 / (time.perf_counter() - began)}


def phase_dedup(root: Path) -> dict:
    from imgfeat.search.api import Searcher
    from imgfeat.search.dedup import find_groups
    from imgfeat.store.reader import Store

    began = time.perf_counter()
    with Store(root) as store:
        groups = find_groups(Searcher(store))
    planted = json.loads((root / "planted.json").read_text())["copies_with_original"]
    # Every planted copy leaves its group's count of rows minus one; chains merge a few.
    return {"dedup_s": time.perf_counter() - began, "groups": groups.count,
            "in_groups": int(len(groups.row)), "planted_copies": planted,
            "copies_found": int(len(groups.row)) - groups.count}


PHASES = {"build": phase_build, "query": phase_query, "flat": phase_flat,
          "dedup": phase_dedup}


def run_phase(name: str, root: Path) -> dict:
    """A phase in a child process: its result, wall seconds and peak resident memory."""
    began = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--phase", name, "--work", str(root)],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"phase {name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - began
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgfeat-bench-search"))
    parser.add_argument("--phase", choices=PHASES)
    parser.add_argument("--only", help="phases to run, e.g. build,query (default: all)")
    args = parser.parse_args()
    if args.phase:
        result = PHASES[args.phase](args.work)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    if not (args.work / "manifest.json").exists():
        began = time.perf_counter()
        make_store(args.work, args.rows, args.dim)
        print(f"store of {args.rows:,} x {args.dim} written in "
              f"{time.perf_counter() - began:.0f} s", flush=True)
    print(f"load before: {os.getloadavg()}", flush=True)
    for name in args.only.split(",") if args.only else PHASES:
        print(name, json.dumps(run_phase(name, args.work)), flush=True)
        print(f"load after {name}: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
