"""Tables of images: Parquet, CSV and JSON Lines, read in record batches with pyarrow.

The image column holds paths (relative ones resolve against the table's folder; URLs are
kept) or image bytes: binary, or the `{bytes, path}` struct Hugging Face `datasets` writes for
its Image feature. Planning never reads the bytes: an item of a bytes column records its cell
(`["parquet", column, row group, row]`) and the worker reads that row group's column
(`pipeline/byte_reader.py`). A null cell is an error record.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from imgfeat.errors import UsageError
from imgfeat.sources.item import Item
from imgfeat.store import storage

TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl")
DEFAULT_IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filepath", "filename")


@dataclass(frozen=True)
class TableOptions:
    image_column: str | None = None
    key_column: str | None = None
    meta_columns: tuple[str, ...] = ()


def is_table(name: str) -> bool:
    return name.lower().endswith(TABLE_SUFFIXES)


@dataclass(frozen=True)
class _Columns:
    image: str
    holds_bytes: bool  # binary, or Hugging Face's {bytes, path} struct
    key: str | None
    meta: tuple[str, ...]


def check_table(location: str, options: TableOptions, storage_options: dict | None) -> None:
    """Fail before any work on a table that cannot be read or has no usable image column."""
    _columns(location, _schema(location, storage_options), options)


def read_table(location: str, options: TableOptions, storage_options: dict | None = None
               ) -> Iterator[Item]:
    """One item per row, in the table's order."""
    columns = _columns(location, _schema(location, storage_options), options)
    wanted = [c for c in (columns.key, *columns.meta) if c]
    if not columns.holds_bytes:
        wanted.insert(0, columns.image)
    base = _folder(location)
    stem = _stem(location)
    row = 0
    for group, rows, batch in _batches(location, storage_options,
                                       list(dict.fromkeys(wanted))):
        values = {} if batch is None else \
            {name: batch.column(name).to_pylist() for name in batch.column_names}
        for offset in range(rows):
            yield _row_item(values, offset, row, group, columns, location, base, stem)
            row += 1


def _row_item(values: dict, offset: int, row: int, group: int | None, columns: _Columns,
              location: str, base: str, stem: str) -> Item:
    meta = {name: _text(values[name][offset]) for name in columns.meta
            if values[name][offset] is not None} or None
    key = f"{stem}/{row}"
    if columns.key is not None:
        cell = values[columns.key][offset]
        if cell is None or cell == "":
            return Item(key, None, f"empty key cell in column '{columns.key}'", None, meta)
        key = _text(cell)
    if columns.holds_bytes:
        part = ["parquet", columns.image, group, offset]
        return Item(key, location, None, part, meta)
    path = values[columns.image][offset]
    if path is None or path == "":
        return Item(key, None, f"empty cell in column '{columns.image}'", None, meta)
    path = str(path)
    if columns.key is None:
        key = posixpath.normpath(path) if not storage.is_url(path) else path
    return Item(key, _resolve(base, path), None, None, meta)


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _schema(location: str, storage_options: dict | None) -> pa.Schema:
    try:
        if location.lower().endswith(".parquet"):
            with _open(location, storage_options) as handle:
                return pq.read_schema(handle)
        for _, _, batch in _batches(location, storage_options, None):
            return batch.schema
        raise UsageError(f"table {location} has no rows")
    except (pa.ArrowInvalid, OSError) as exc:
        raise UsageError(f"cannot read table {location}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from None


def _columns(location: str, schema: pa.Schema, options: TableOptions) -> _Columns:
    names = schema.names
    listed = ", ".join(names)
    image = options.image_column or next((c for c in DEFAULT_IMAGE_COLUMNS if c in names), None)
    if image is None:
        raise UsageError(f"table {location} has no image column (looked for "
                         f"{', '.join(DEFAULT_IMAGE_COLUMNS)}; columns: {listed}); "
                         "name one with --image-column")
    for what, name in [("image", image), ("key", options.key_column),
                       *(("meta", m) for m in options.meta_columns)]:
        if name is not None and name not in names:
            raise UsageError(f"table {location} has no {what} column '{name}' "
                             f"(columns: {listed})")
    kind = schema.field(image).type
    holds_bytes = _is_bytes(kind)
    if not holds_bytes and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UsageError(f"column '{image}' of table {location} holds {kind}: neither paths, "
                         "image bytes nor {bytes, path} structs; name another with "
                         "--image-column")
    if holds_bytes and not location.lower().endswith(".parquet"):
        raise UsageError(f"image bytes are read from Parquet tables only, not {location}")
    return _Columns(image, holds_bytes, options.key_column, tuple(options.meta_columns))


def _is_bytes(kind: pa.DataType) -> bool:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0


def _batches(location: str, storage_options: dict | None, columns: list[str] | None
             ) -> Iterator[tuple[int | None, int, pa.Table | pa.RecordBatch | None]]:
    """(row group or None, rows, columns read): a Parquet table by row group (the rows
    counted from its metadata, so a bytes column needs no read), others by block."""
    lower = location.lower()
    with _open(location, storage_options) as handle:
        if lower.endswith(".parquet"):
            table = pq.ParquetFile(handle)
            for group in range(table.num_row_groups):
                rows = table.metadata.row_group(group).num_rows
                yield group, rows, table.read_row_group(group, columns=columns) \
                    if columns else None
            return
        if lower.endswith(".csv"):
            reader = pacsv.open_csv(handle, convert_options=pacsv.ConvertOptions(
                include_columns=columns, strings_can_be_null=True))
        else:
            reader = pajson.open_json(handle)
        for batch in reader:
            yield None, batch.num_rows, batch if columns is None else batch.select(columns)


def _open(location: str, storage_options: dict | None):
    if storage.is_url(location):
        fs, path = storage.filesystem(location, storage_options)
        return storage.retrying(lambda: fs.open(path, "rb"))
    return open(location, "rb")


def _folder(location: str) -> str:
    if storage.is_url(location):
        return storage.parent(location)
    return os.path.dirname(os.path.abspath(location))


def _resolve(base: str, path: str) -> str:
    if storage.is_url(path) or os.path.isabs(path):
        return path
    if storage.is_url(base):
        return storage.join(base, path)
    return os.path.join(base, path)


def _stem(location: str) -> str:
    base = posixpath.basename(location)
    return base.rsplit(".", 1)[0]
