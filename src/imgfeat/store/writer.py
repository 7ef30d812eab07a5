"""The shard writer: rows stream into a temporary HDF5 file that becomes visible, complete,
under its final name in one rename (fsync first), so a reader never sees half a shard."""

from __future__ import annotations

import h5py
import numpy as np

from imgfeat.errors import UsageError
from imgfeat.store.layout import Layout, commit, feature_datasets, temp_path
from imgfeat.store.manifest import identity_digest, read_manifest
from imgfeat.store.shard_cache import open_h5
from imgfeat.store.shard_counts import Entry, entry_of


class StoreReplaced(UsageError):
    """The output folder's manifest no longer describes the features being written."""


class Float16Overflow(UsageError):
    """A feature beyond float16's range in the first shard of a store: the run stops (the
    engine's "stop"), since every shard would likely store the same inf values."""


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


STRING = h5py.string_dtype("utf-8")
CHUNK_BYTES = 1 << 20


class ShardWriter:
    """`shapes`: {layer: feature shape}; rows come as {layer: array} of one batch."""

    def __init__(self, layout: Layout, index: int, shapes: dict[str, tuple[int, ...]],
                 dtype: str, capacity: int, identity: str | None = None):
        self.layout, self.identity, self.index = layout, identity, index
        self.entry: Entry | None = None  # the store's record of it, once committed
        self.final = layout.shard_file(index)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.temp = temp_path(self.final)
        self._file = open_h5(self.temp, "w")
        self._features = {}
        for (layer, shape), name in zip(shapes.items(), feature_datasets(shapes).values()):
            self._features[layer] = self._file.create_dataset(
                name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                chunks=(_rows_per_chunk(shape, dtype, capacity), *shape))
            self._features[layer].attrs["layer"] = layer  # the name, unescaped, for h5py users
        self._file.attrs["shard"] = index
        self._dtype = np.dtype(dtype)
        if identity is not None:
            self._file.attrs["identity"] = identity  # see manifest.identity_digest
        self.keys: list[str] = []
        self.overflow_rows = 0  # rows with a value beyond float16, stored as inf
        self.error_keys: list[str] = []
        self.error_reasons: list[str] = []
        self._meta: dict[str, dict[str, str]] = {}  # key: its text (caption, json, ...)

    def add_rows(self, keys: list[str], features: dict[str, np.ndarray]) -> None:
        start = len(self.keys)
        if self._dtype == np.float16:
            self._count_overflow(keys, features)
        for layer, dataset in self._features.items():
            dataset.resize(start + len(keys), axis=0)
            dataset[start:] = features[layer]
        self.keys.extend(keys)

    def _count_overflow(self, keys: list[str], features: dict[str, np.ndarray]) -> None:
        """float16 turns values beyond 65504 into inf without a word: count the rows where
        that happens; in the first shard of a store, stop the run instead."""
        over = np.zeros(len(keys), dtype=bool)
        for rows in features.values():
            flat = np.asarray(rows).reshape(len(keys), -1)
            if flat.dtype == np.float16:  # cast already (compute/extractor.py, finish)
                over |= np.isinf(flat).any(axis=1)
            else:
                over |= (np.abs(flat) > FLOAT16_MAX).any(axis=1) & np.isfinite(flat).all(axis=1)
        if not over.any():
            return
        if not self.layout.committed():
            key = keys[int(np.flatnonzero(over)[0])]
            raise Float16Overflow(f"features of {key!r} exceed float16's range (65504) and would "
                                  "be stored as inf; run again with --dtype float32 --overwrite")
        self.overflow_rows += int(over.sum())

    def note_meta(self, key: str, meta: dict[str, str]) -> None:
        """Text that goes with the row of `key` (written at commit, beside the keys)."""
        self._meta[key] = meta

    def add_error(self, key: str, reason: str) -> None:
        self.error_keys.append(key)
        self.error_reasons.append(reason)

    def commit(self) -> None:
        self._file.attrs["float16_overflow_rows"] = self.overflow_rows
        self._file.create_dataset("keys", data=self.keys, dtype=STRING)
        errors = self._file.create_group("errors")
        errors.create_dataset("keys", data=self.error_keys, dtype=STRING)
        errors.create_dataset("reasons", data=self.error_reasons, dtype=STRING)
        self._write_meta()
        self._file.close()
        self._check_identity()
        commit(self.temp, self.final)
        self.entry = entry_of(self.layout, self.index, len(self.keys), len(self.error_keys),
                              self.overflow_rows, self.identity)

    def _check_identity(self) -> None:
        """Refuse to commit into a store that now holds other features: a run that replaced
        this one's store (--overwrite) must not receive its shards. (With no manifest at all,
        a pipeline used on its own or a store being removed, whose temporary files go with
        it, there is nothing to mix into.)"""
        if self.identity is None:
            return
        manifest = read_manifest(self.layout)
        if manifest is not None and identity_digest(manifest) != self.identity:
            raise StoreReplaced(f"{self.layout.root} was replaced by a run with other features "
                                f"while shard {self.final.name} was extracted; it is discarded")

    def _write_meta(self) -> None:
        """`meta/<name>`: one string per row, in row order ('' where a row has none)."""
        kept = [self._meta.get(key, {}) for key in self.keys]
        names = sorted({name for meta in kept for name in meta})
        if not names:
            return
        group = self._file.create_group("meta")
        for name in names:
            group.create_dataset(name, data=[meta.get(name, "") for meta in kept],
                                 dtype=STRING)

    def discard(self) -> None:
        if self._file.id.valid:
            self._file.close()
        self.temp.unlink(missing_ok=True)


def _rows_per_chunk(shape: tuple[int, ...], dtype: str, capacity: int) -> int:
    row_bytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return max(1, min(capacity, CHUNK_BYTES // row_bytes))
