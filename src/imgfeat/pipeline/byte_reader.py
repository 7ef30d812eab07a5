"""The encoded bytes of one item, wherever they are: a local file, an object (fsspec URL), a
member of a tar, or a cell of a Parquet table. One reader per worker, shared by its threads.

A member of a plain (uncompressed) tar is a positioned read: of a local tar, one `pread`; of
a tar on object storage, a ranged GET, and a shard reads consecutive members in runs (`runs`,
`read_run`: one GET for up to `RUN_BYTES`), pipelined on the shard's I/O threads, so a tar
is neither streamed a second time after the plan's walk nor read by one thread at a time. A
compressed tar, or a tar on an http(s) server (which may ignore ranges), is read as one
sequential stream per tar and worker: the items of a shard come in tar order, so the stream
only moves forward, and the last `WINDOW` bytes it passed are kept so that threads asking
slightly out of order need no restart. A Parquet cell is read with its row group's column,
kept while the shard walks through that row group.
"""

from __future__ import annotations

import gzip
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from imgfeat.errors import ImageError
from imgfeat.sources import Item
from imgfeat.store import storage

WINDOW = 64 << 20  # bytes of a tar stream kept behind its position
# Tar members read by one ranged GET. One GET per member pays a request's cost per image (on
# the benchmark's S3 server, 8 ms of CPU: slower than the stream); runs of 4 MiB make a few
# dozen requests per GiB, and the I/O threads hold at most their number of runs.
RUN_BYTES = 4 << 20
_RUN_GAP = 1 << 20  # members further apart start a new run, so a large skipped member is not read
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

    def read_run(self, run: list[Item]) -> list[bytes | str]:
        """The bytes of each item of a run (see `runs`), or why it has none: members of one
        tar on object storage in one ranged GET."""
        if len(run) == 1:
            return [self._bytes_or_why(run[0])]
        start, end = run[0].part[1], run[-1].part[1] + run[-1].part[2]
        try:
            data = storage.read_bytes(run[0].path, self._options, start, end)
        except Exception as exc:
            return [f"cannot read tar member: {storage.reason(exc)}"] * len(run)
        return [_member_or_why(data, item.part[1] - start, item.part[2]) for item in run]

    def _bytes_or_why(self, item: Item) -> bytes | str:
        try:
            return self.read(item)
        except ImageError as exc:
            return str(exc)

    def _tar_member(self, location: str, offset: int, size: int) -> bytes:
        if _ranged(location) or _plain(location) and not storage.is_url(location):  # positioned
            data = storage.read_bytes(location, self._options, offset, offset + size)
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


def runs(items: Iterable[Item]) -> Iterator[list[Item]]:
    """The items in order, in runs that `ByteReader.read_run` reads at once: consecutive
    members of one tar on object storage lying within `RUN_BYTES`; any other item alone."""
    run: list[Item] = []
    for item in items:
        if run and not _extends(run, item):
            yield run
            run = []
        run.append(item)
    if run:
        yield run


def _extends(run: list[Item], item: Item) -> bool:
    first, last = run[0], run[-1]
    if not (_in_ranged_tar(first) and _in_ranged_tar(item) and item.path == first.path):
        return False
    start, end = first.part[1], last.part[1] + last.part[2]
    offset, size = item.part[1], item.part[2]
    return end <= offset <= end + _RUN_GAP and offset + size - start <= RUN_BYTES


def _in_ranged_tar(item: Item) -> bool:
    return item.error is None and item.part is not None and item.part[0] == "tar" \
        and _ranged(item.path)


def _plain(location: str) -> bool:
    return location.lower().endswith(".tar")


def _ranged(location: str) -> bool:
    """Whether a tar's members are read by ranged GETs (a plain tar on object storage)."""
    return _plain(location) and storage.ranges_work(location)


def _member_or_why(data: bytes, at: int, size: int) -> bytes | str:
    member = data[at:at + size]
    if len(member) != size:  # the object ends early: it changed since the plan was recorded
        return f"tar member cut off: {len(member)} of {size} bytes"
    return member


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
        self._raw = storage.open_sequential(self._location, self._options)
        gzipped = not _plain(self._location)
        self._file = gzip.GzipFile(fileobj=self._raw) if gzipped else self._raw
        self._position = self._start = 0
        self._skip_to(offset)

    def _skip_to(self, offset: int) -> None:
        """Forward to `offset` by reading (a streamed http body cannot seek; gzip decompresses
        up to it anyway), the window emptied."""
        while self._position < offset:
            skipped = len(self._file.read(min(offset - self._position, 8 << 20)))
            if not skipped:
                break
            self._position += skipped
        self._start = self._position
        self._window = bytearray()

    def _advance(self, offset: int, end: int) -> None:
        if offset > self._position + WINDOW:
            self._skip_to(offset)  # far ahead: drop rather than keep what lies between
        self._window += storage.read_fully(self._file, end - self._position)
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
