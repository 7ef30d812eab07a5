"""The decode pool: reads each item's bytes and decodes and shapes them on threads (Pillow
releases the GIL), in order, with a bounded number in flight so memory does not grow with the
shard; JPEGs that the GPU decoder takes are left encoded for it."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from imgfeat.errors import ImageError
from imgfeat.models.preprocess import Preprocess
from imgfeat.pipeline.byte_reader import ByteReader, runs
from imgfeat.pipeline.cpu_decode import pixels_from_bytes
from imgfeat.report.stage_times import OFF
from imgfeat.sources import Item
from imgfeat.store.storage import is_url

T = TypeVar("T")
R = TypeVar("R")


# Test hook: a worker that decodes a file whose path ends with this dies on the spot, as a
# decoder segfault would. Read once; costs one comparison per image when unset.
_CRASH_ON = os.environ.get("IMGFEAT_TEST_CRASH_ON")


@dataclass(frozen=True)
class Encoded:
    """A JPEG the decode threads leave for the device decoder: the file's bytes and its pixel
    count (the device decodes in chunks of bounded pixels)."""

    data: bytes
    pixels: int


def load_pixels(item: Item, preprocess: Preprocess, max_pixels: int | None,
                times=OFF, to_device: Callable[[str, bytes], int | None] | None = None,
                data: bytes | str | None = None) -> np.ndarray | Encoded | str:
    """The model-sized uint8 pixels of one item, or the reason it has none; with `to_device`
    (key, bytes -> pixel count or None), the file's bytes, left for the device decoder,
    where `to_device` takes them. `data`: the bytes (or why there are none) when they were
    read ahead (`fetch`); a local file's are read here."""
    if item.error is not None:
        return item.error
    if _CRASH_ON and item.path.endswith(_CRASH_ON):
        os._exit(99)
    if isinstance(data, str):
        return data
    if data is None:
        try:
            with times.stage("read"), open(item.path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            return f"cannot read file: {exc.strerror or exc}"
    if to_device is not None and (pixels := to_device(item.key, data)) is not None:
        return Encoded(data, pixels)
    return pixels_from_bytes(data, preprocess, max_pixels, times)


def reads_ahead(item: Item) -> bool:
    """Whether an item's bytes are worth reading ahead on I/O threads: an object's (10-100 ms
    each on object storage), a tar member's, a table cell's. A local file's are read by the
    decode thread itself."""
    return item.error is None and (item.part is not None or is_url(item.path))


def fetch(reader: ByteReader, item: Item) -> bytes | str | None:
    """An item's bytes, or why it has none; None where the decode thread reads them."""
    if not reads_ahead(item):
        return None
    try:
        return reader.read(item)
    except ImageError as exc:
        return str(exc)


def fetched(pool: ThreadPoolExecutor, reader: ByteReader, items: Iterable[Item],
            in_flight: int) -> Iterator[tuple[Item, bytes | str | None]]:
    """(item, its bytes or why none, None where the decode thread reads them) in order, read
    on `pool` with `in_flight` reads at once; members of a tar on object storage are read in
    runs, one ranged GET each (`byte_reader.runs`)."""
    def read(run: list[Item]) -> list[bytes | str | None]:
        if reads_ahead(run[0]):
            return reader.read_run(run)
        return [None] * len(run)

    for run, data in ordered_map(pool, read, runs(items), in_flight):
        yield from zip(run, data)


def ordered_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T],
                ahead: int) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) in input order, with at most `ahead` calls queued or running."""
    pending: deque[tuple[T, Future]] = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= ahead:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        for _, future in pending:
            future.cancel()
