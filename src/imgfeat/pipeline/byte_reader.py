"""The encoded bytes of one item, wherever they are: a local file, an object (fsspec URL), a
member of a tar, or a cell of a Parquet table. One reader per worker, shared by its threads.

A tar member of a local, uncompressed tar is one positioned read. Any other tar (remote, or
compressed) is read as one sequential stream per tar and worker: the items of a shard come
in tar order, so the stream only moves forward, and the last `WINDOW` bytes it passed are kept
so that threads asking slightly out of order need no restart. A Parquet cell is read with its
row group's column, kept while the shard walks through that row group.
"""

from __future__ import annotations

import gzip
import os
import threading
from collections import OrderedDict

import pyarrow as pa
import pyarrow.parquet as pq

from imgfeat.errors import ImageError
from imgfeat.sources import Item
from imgfeat.store import storage

WINDOW = 64 << 20  # bytes of a tar stream kept behind its position
_OPEN_STREAMS = 4  # tars (and row groups) a worker keeps open at once


class ByteReader:
    def __init__(self, storage_options: dict | None = None):
        self._options = storage_options
        self._lock = threading.Lock()
        self._streams: OrderedDict[str, _TarStream] = OrderedDict()
        self._groups: OrderedDict[tuple, _RowGroup] = OrderedDict()

    def read(self, item: Item) -> bytes:
        """The item's encoded bytes; `ImageError` with the reason when they cannot be read."""
        try:
            return self._read(item)
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError(f"cannot read {_what(item)}: {storage.reason(exc)}") from None

    def _read(self, item: Item) -> bytes:
        if item.part is None:
            return storage.read_bytes(item.path, self._options)
        if item.part[0] == "tar":
            _, offset, size = item.part
            return self._tar_member(item.path, offset, size)
        _, column, group, row = item.part
        return self._cell(item.path, column, group, row)

    def _tar_member(self, location: str, offset: int, size: int) -> bytes:
        compressed = not location.lower().endswith(".tar")
        if not compressed and not storage.is_url(location):
            data = storage.read_bytes(location, None, offset, offset + size)
        else:
            data = self._cached(self._streams, location,
                                lambda: _TarStream(location, self._options)).read(offset, size)
        if len(data) != size:
            raise ImageError(f"tar member cut off: {len(data)} of {size} bytes")
        return data

    def _cell(self, location: str, column: str, group: int, row: int) -> bytes:
        cells = self._cached(self._groups, (location, column, group),
                             lambda: _RowGroup(location, column, group, self._options))
        data, path = cells.get(row)
        if data is not None:
            return data
        if path:  # Hugging Face keeps only the path of an image that was a local file
            return storage.read_bytes(_beside(location, path), self._options)
        raise ImageError(f"empty cell: no image bytes in column '{column}'")

    def _cached(self, cache: OrderedDict, key, make):
        with self._lock:
            found = cache.get(key)
            if found is None:
                found = cache[key] = make()
                while len(cache) > _OPEN_STREAMS:
                    cache.popitem(last=False)[1].close()
            cache.move_to_end(key)
            return found


def _beside(table: str, path: str) -> str:
    """A path found in a table: relative ones are relative to the table's folder."""
    if storage.is_url(path) or os.path.isabs(path):
        return path
    if storage.is_url(table):
        return storage.join(storage.parent(table), path)
    return os.path.join(os.path.dirname(table), path)


def _what(item: Item) -> str:
    if item.part is None:
        return "file"
    return "tar member" if item.part[0] == "tar" else "table cell"


class _TarStream:
    """Forward reads of one tar's uncompressed bytes, with a window kept behind."""

    def __init__(self, location: str, storage_options: dict | None):
        self._location, self._options = location, storage_options
        self._lock = threading.Lock()
        self._raw = self._file = None
        self._position = 0
        self._start = 0  # offset of the window's first byte
        self._window = bytearray()

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            if self._file is None or offset < self._start:
                self._reopen(offset)
            end = offset + size
            if end > self._position:
                self._advance(offset, end)
            begin = offset - self._start
            return bytes(self._window[begin:begin + size])

    def _reopen(self, offset: int) -> None:
        self.close()
        if storage.is_url(self._location):
            fs, path = storage.filesystem(self._location, self._options)
            self._raw = storage.retrying(lambda: fs.open(path, "rb", block_size=8 << 20))
        else:
            self._raw = open(self._location, "rb")
        gzipped = not self._location.lower().endswith(".tar")
        self._file = gzip.GzipFile(fileobj=self._raw) if gzipped else self._raw
        self._file.seek(offset)  # a plain tar's seek is free; gzip decompresses up to it
        self._position = self._start = offset
        self._window = bytearray()

    def _advance(self, offset: int, end: int) -> None:
        if offset > self._position + WINDOW and self._location.lower().endswith(".tar"):
            self._file.seek(offset)  # far ahead in a plain tar: skip rather than read
            self._position = self._start = offset
            self._window = bytearray()
        self._window += self._file.read(end - self._position)
        self._position = self._start + len(self._window)
        keep = max(WINDOW, self._position - offset)
        if len(self._window) > keep:
            drop = len(self._window) - keep
            del self._window[:drop]
            self._start += drop

    def close(self) -> None:
        for handle in (self._file, self._raw):
            if handle is not None:
                handle.close()
        self._raw = self._file = None


class _RowGroup:
    """One column of one row group of a Parquet table: the image bytes of its rows."""

    def __init__(self, location: str, column: str, group: int, storage_options: dict | None):
        if storage.is_url(location):
            fs, path = storage.filesystem(location, storage_options)
            handle = storage.retrying(lambda: fs.open(path, "rb"))
        else:
            handle = open(location, "rb")
        with handle:
            cells = pq.ParquetFile(handle).read_row_group(group, columns=[column])
        values = cells.column(0).combine_chunks()
        self._paths = None
        if pa.types.is_struct(values.type):  # Hugging Face's {bytes, path}; flatten keeps
            fields = values.flatten()         # a null struct's fields null
            if (at := values.type.get_field_index("path")) >= 0:
                self._paths = fields[at]
            values = fields[values.type.get_field_index("bytes")]
        self._values = values

    def get(self, row: int) -> tuple[bytes | None, str | None]:
        """(the cell's bytes, or its path where it has no bytes)."""
        path = self._paths[row].as_py() if self._paths is not None else None
        return self._values[row].as_py(), path

    def close(self) -> None:
        self._values = None
