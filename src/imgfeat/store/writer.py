"""The shard writer: rows stream into a temporary HDF5 file that becomes visible, complete,
under its final name in one rename (fsync first), so a reader never sees half a shard."""

from __future__ import annotations

import h5py
import numpy as np

from imgfeat.store.layout import Layout, commit, feature_datasets, temp_path

STRING = h5py.string_dtype("utf-8")
CHUNK_BYTES = 1 << 20


class ShardWriter:
    """`shapes`: {layer: feature shape}; rows come as {layer: array} of one batch."""

    def __init__(self, layout: Layout, index: int, shapes: dict[str, tuple[int, ...]],
                 dtype: str, capacity: int):
        self.final = layout.shard_file(index)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.temp = temp_path(self.final)
        self._file = h5py.File(self.temp, "w")
        self._features = {}
        for (layer, shape), name in zip(shapes.items(), feature_datasets(shapes).values()):
            self._features[layer] = self._file.create_dataset(
                name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                chunks=(_rows_per_chunk(shape, dtype, capacity), *shape))
            self._features[layer].attrs["layer"] = layer  # the name, unescaped, for h5py users
        self._file.attrs["shard"] = index
        self.keys: list[str] = []
        self.error_keys: list[str] = []
        self.error_reasons: list[str] = []
        self._meta: dict[str, dict[str, str]] = {}  # key: its text (caption, json, ...)

    def add_rows(self, keys: list[str], features: dict[str, np.ndarray]) -> None:
        start = len(self.keys)
        for layer, dataset in self._features.items():
            dataset.resize(start + len(keys), axis=0)
            dataset[start:] = features[layer]
        self.keys.extend(keys)

    def note_meta(self, key: str, meta: dict[str, str]) -> None:
        """Text that goes with the row of `key` (written at commit, beside the keys)."""
        self._meta[key] = meta

    def add_error(self, key: str, reason: str) -> None:
        self.error_keys.append(key)
        self.error_reasons.append(reason)

    def commit(self) -> None:
        self._file.create_dataset("keys", data=self.keys, dtype=STRING)
        errors = self._file.create_group("errors")
        errors.create_dataset("keys", data=self.error_keys, dtype=STRING)
        errors.create_dataset("reasons", data=self.error_reasons, dtype=STRING)
        self._write_meta()
        self._file.close()
        commit(self.temp, self.final)

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
