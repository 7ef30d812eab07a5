"""Stores of many tiny shards written straight through the shard writer (no model): for the
tests of what must hold whatever the number of shards."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import numpy as np

from imgfeat.plan.shards import write_shard_items
from imgfeat.sources import Item
from imgfeat.store.layout import Layout
from imgfeat.store.manifest import FORMAT, identity_digest, write_manifest
from imgfeat.store.writer import ShardWriter

DIM = 4


def tiny_manifest(shard_counts: list[int], dtype: str = "float32") -> dict:
    return {"format": FORMAT, "sources": ["/nowhere"], "model": {"spec": "tiny:test"},
            "weights": {"kind": "random"}, "layers": {"pooled": [DIM]}, "pool": "avg",
            "gem_p": None, "scales": [1.0], "whiten": None, "l2": False, "preprocess": {},
            "precision": "fp32", "dtype": dtype, "shard_size": max(shard_counts),
            "plan": {"complete": True, "items": sum(shard_counts), "shards": shard_counts}}


def tiny_rows(shard: int, rows: int) -> np.ndarray:
    """Features that differ per row and span every dimension (whitening can learn them)."""
    seed = np.random.default_rng(shard)
    return seed.normal(size=(rows, DIM)) * np.arange(1, DIM + 1)


def make_tiny_store(root: Path, shards: int, rows: int = 2, error_every: int = 7) -> Layout:
    """`shards` shards of `rows` rows each, and an error record in every `error_every`-th."""
    layout = Layout(root)
    counts = [rows + (i % error_every == 0) for i in range(shards)]
    manifest = tiny_manifest(counts)
    write_manifest(layout, manifest)
    layout.plan_dir.mkdir()
    with mock.patch.object(os, "fsync"):  # durability is not under test here: speed is
        for index in range(shards):
            keys = [f"s{index}/img{r}.jpg" for r in range(rows)]
            bad = [f"s{index}/bad.jpg"] if index % error_every == 0 else []
            write_shard_items(layout, index, [Item(k, "/nowhere/" + k) for k in keys + bad])
            writer = ShardWriter(layout, index, {"pooled": (DIM,)}, "float32", rows,
                                 identity=identity_digest(manifest))
            writer.add_rows(keys, {"pooled": tiny_rows(index, rows).astype(np.float32)})
            for key in bad:
                writer.add_error(key, "decode error: not an image")
            writer.commit()
    return layout
