"""A worker owns one device: for each shard it decodes images in a bounded pool, batches them,
runs the extractor and writes one shard file. It knows nothing of other workers, so an engine
can run one per device."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch

from imgfeat.decode import load_pixels, ordered_map
from imgfeat.extractor import Extractor
from imgfeat.sources import Item
from imgfeat.store.layout import Layout
from imgfeat.store.writer import ShardWriter

Progress = Callable[[int, int], None]  # (rows, errors) just done


@dataclass(frozen=True)
class ShardResult:
    index: int
    rows: int
    errors: int


class Worker:
    def __init__(self, extractor: Extractor, layout: Layout, *, batch_size: int,
                 threads: int, max_pixels: int | None):
        self.extractor = extractor
        self.layout = layout
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="imgfeat-decode")
        self._ahead = batch_size + 2 * threads  # next batch decodes while this one runs
        self._buffer = torch.empty((batch_size, *extractor.preprocess.size, 3),
                                   dtype=torch.uint8,
                                   pin_memory=extractor.device.type == "cuda")
        self._slots = self._buffer.numpy()  # a numpy view: copying into it needs no tensor

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run_shard(self, index: int, items: list[Item], progress: Progress) -> ShardResult:
        writer = ShardWriter(self.layout, index, self.extractor.feature_shape,
                             self.extractor.dtype.name, capacity=max(1, len(items)))
        try:
            self._fill(writer, items, progress)
            writer.commit()
        finally:
            writer.discard()
        return ShardResult(index, len(writer.keys), len(writer.error_keys))

    def _fill(self, writer: ShardWriter, items: list[Item], progress: Progress) -> None:
        load = partial(load_pixels, preprocess=self.extractor.preprocess,
                       max_pixels=self.max_pixels)
        keys: list[str] = []
        errors = 0
        for item, pixels in ordered_map(self._pool, load, items, self._ahead):
            if isinstance(pixels, str):
                writer.add_error(item.key, pixels)
                errors += 1
                continue
            self._slots[len(keys)] = pixels
            keys.append(item.key)
            if len(keys) == self.batch_size:
                self._flush(writer, keys, errors, progress)
                keys, errors = [], 0
        self._flush(writer, keys, errors, progress)

    def _flush(self, writer: ShardWriter, keys: list[str], errors: int,
               progress: Progress) -> None:
        if keys:
            writer.add_rows(keys, self.extractor(self._buffer[:len(keys)]))
        progress(len(keys), errors)
