"""Exports of a store for the tools users feed features into. Each one streams (memory bounded
by one batch), shows progress, and appears under its final name only when complete.

- npy: the layout clip-retrieval writes and embedding-reader / autofaiss read:
  `img_emb/img_emb_{i}.npy` with `metadata/metadata_{i}.parquet` (column `image_path`),
  aligned row for row, `i` zero-padded so that names sort in row order.
- parquet: files with a `key` column and a fixed-size-list `embedding` column.
- h5: one self-contained HDF5 file (a real copy), chunked, optionally compressed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np

from imgfeat.errors import UsageError
from imgfeat.report.progress import Reporter
from imgfeat.store.layout import commit, fsync_folder, temp_path
from imgfeat.store.reader import Store
from imgfeat.store.shard_cache import open_h5
from imgfeat.store.writer import STRING

FORMATS = ("npy", "parquet", "h5")
COMPRESSIONS = ("none", "gzip", "lzf")
DEFAULT_ROWS_PER_FILE = 1_000_000
READ_BATCH = 65_536


def export(store: Store, to: str, dest: str | Path, *, rows_per_file: int = DEFAULT_ROWS_PER_FILE,
           dtype: str | None = None, compression: str = "none", overwrite: bool = False,
           progress: str = "auto", layer: str | None = None) -> Path:
    """Write one layer of `store` (the only one unless named) as `to` (npy, parquet or h5)
    at `dest`; returns the final path."""
    layer = store._layer(layer)
    if to not in FORMATS:
        raise UsageError(f"unknown export format {to!r}; choose {', '.join(FORMATS)}")
    if compression not in COMPRESSIONS:
        raise UsageError(f"unknown compression {compression!r}; choose "
                         f"{', '.join(COMPRESSIONS)}")
    if rows_per_file < 1:
        raise UsageError("--rows-per-file must be at least 1")
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise UsageError(f"{dest} exists; choose another destination or pass --overwrite")
    if len(store) == 0:
        raise UsageError(f"{store.layout.root} holds no features to export")
    reporter = Reporter(progress, label="export", unit="rows")
    reporter.start(total=len(store))
    try:
        writer = {"npy": _npy, "parquet": _parquet, "h5": _h5}[to]
        writer(store, dest, layer=layer, rows_per_file=rows_per_file, dtype=dtype,
               compression=compression, advance=lambda n: reporter.advance(n, 0),
               overwrite=overwrite)
    finally:
        reporter.stop()
    reporter.summary(f"exported {len(store):,} rows as {to} -> {dest}")
    return dest


class _Rows:
    """The store's rows as flat 2-D batches, taken a file's worth at a time."""

    def __init__(self, store: Store, layer: str, dtype: str | None):
        self._batches = (
            (keys, feats.reshape(len(feats), -1).astype(dtype or feats.dtype, copy=False))
            for keys, feats in store.iter_batches(READ_BATCH, layer))
        self._carry: tuple[list[str], np.ndarray] | None = None

    def take(self, count: int) -> Iterator[tuple[list[str], np.ndarray]]:
        """Batches holding the next `count` rows (fewer at the end of the store)."""
        while count > 0:
            keys, feats = self._carry or next(self._batches, ([], None))
            self._carry = None
            if feats is None:
                return
            if len(keys) > count:
                self._carry = (keys[count:], feats[count:])
                keys, feats = keys[:count], feats[:count]
            count -= len(keys)
            yield keys, feats


def _file_sizes(total: int, rows_per_file: int) -> list[int]:
    return [min(rows_per_file, total - start) for start in range(0, total, rows_per_file)]


def _in_temp_folder(dest: Path, overwrite: bool, fill: Callable[[Path], None]) -> None:
    """Build a folder under a temporary name, then swap it in with one rename."""
    temp = temp_path(dest)
    temp.mkdir(parents=True)
    try:
        fill(temp)
        fsync_folder(temp)
        if dest.exists() and overwrite:
            _remove(dest)
        temp.rename(dest)
        fsync_folder(dest.parent)
    finally:
        if temp.exists():
            shutil.rmtree(temp)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def _npy(store: Store, dest: Path, *, layer, rows_per_file, dtype, advance, overwrite,
         **_) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sizes = _file_sizes(len(store), rows_per_file)
    digits = len(str(len(sizes) - 1))
    dtype = np.dtype(dtype or "float32")
    width = int(np.prod(store.feature_shapes[layer]))
    names = store.meta_names  # captions and the like, beside image_path as clip-retrieval has
    schema = pa.schema([("image_path", pa.string())] + [(n, pa.string()) for n in names])

    def fill(folder: Path) -> None:
        meta = {name: store.iter_metadata(name) for name in names}  # streamed with the rows
        (folder / "img_emb").mkdir()
        (folder / "metadata").mkdir()
        rows = _Rows(store, layer, dtype.name)
        for number, size in enumerate(sizes):
            name = str(number).zfill(digits)
            array = np.lib.format.open_memmap(folder / "img_emb" / f"img_emb_{name}.npy",
                                              mode="w+", dtype=dtype, shape=(size, width))
            start = 0
            with pq.ParquetWriter(folder / "metadata" / f"metadata_{name}.parquet",
                                  schema) as metadata:
                for keys, feats in rows.take(size):
                    array[start:start + len(keys)] = feats
                    columns = {"image_path": keys, **{n: list(islice(meta[n], len(keys)))
                                                      for n in names}}
                    metadata.write_table(pa.table(columns, schema=schema))
                    start += len(keys)
                    advance(len(keys))
            array.flush()
            del array

    _in_temp_folder(dest, overwrite, fill)


def _parquet(store: Store, dest: Path, *, layer, rows_per_file, dtype, advance, overwrite,
             **_) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    shape = store.feature_shapes[layer]
    width = int(np.prod(shape))
    out_dtype = np.dtype(dtype or "float32")
    value_type = pa.from_numpy_dtype(out_dtype)
    schema = pa.schema([("key", pa.string()), ("embedding", pa.list_(value_type, width))],
                       metadata={b"imgfeat.feature_shape": str(list(shape)).encode(),
                                 b"imgfeat.layer": layer.encode(),
                                 b"imgfeat.model": store.model.encode()})

    def fill(folder: Path) -> None:
        rows = _Rows(store, layer, out_dtype.name)
        for number, size in enumerate(_file_sizes(len(store), rows_per_file)):
            with pq.ParquetWriter(folder / f"part-{number:05d}.parquet", schema) as writer:
                for keys, feats in rows.take(size):
                    values = pa.array(feats.reshape(-1), type=value_type)
                    embedding = pa.FixedSizeListArray.from_arrays(values, width)
                    writer.write_table(pa.Table.from_arrays([pa.array(keys), embedding],
                                                            schema=schema))
                    advance(len(keys))

    _in_temp_folder(dest, overwrite, fill)


def _h5(store: Store, dest: Path, *, layer, dtype, compression, advance, overwrite,
        **_) -> None:
    dtype = np.dtype(dtype or store.dtype)
    options = {} if compression == "none" else {"compression": compression}
    shape = store.feature_shapes[layer]
    row_bytes = max(1, int(np.prod(shape)) * dtype.itemsize)
    chunk_rows = max(1, min(len(store), (1 << 20) // row_bytes))
    temp = temp_path(dest)
    try:
        with open_h5(temp, "w") as out:
            features = out.create_dataset("features", shape=(len(store), *shape), dtype=dtype,
                                          chunks=(chunk_rows, *shape), **options)
            keys = out.create_dataset("keys", shape=(len(store),), dtype=STRING,
                                      chunks=(min(len(store), 65_536),), **options)
            start = 0
            for batch_keys, feats in store.iter_batches(READ_BATCH, layer):
                features[start:start + len(feats)] = feats
                keys[start:start + len(feats)] = batch_keys
                start += len(feats)
                advance(len(feats))
            errors = out.create_group("errors")
            errors.create_dataset("keys", data=[k for k, _ in store.errors], dtype=STRING)
            errors.create_dataset("reasons", data=[r for _, r in store.errors], dtype=STRING)
            out.attrs["model"] = store.model
            out.attrs["layer"] = layer
        if dest.exists() and overwrite:
            _remove(dest)
        commit(temp, dest)
    finally:
        temp.unlink(missing_ok=True)
