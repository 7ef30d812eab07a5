"""A worker owns one device: for each shard it decodes images in a bounded pool, batches them,
runs the extractor and writes one shard file. It knows nothing of other workers, so an engine
can run one per device."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from imgfeat.decode import load_pixels, ordered_map
from imgfeat.extractor import Extractor
from imgfeat.profile import OFF, StageTimes
from imgfeat.sources import Item
from imgfeat.store.layout import Layout
from imgfeat.store.writer import ShardWriter

Progress = Callable[[int, int], None]  # (rows, errors) just done


@dataclass(frozen=True)
class ShardResult:
    index: int
    rows: int
    errors: int


# Decode threads that share cores with the model run at this niceness: the kernel then gives
# them about a tenth of a core the model is using (enough for a heavy model's decoding, which
# then never stalls its threads) and all of a core it leaves idle.
DECODE_NICENESS = 10


def _lower_priority() -> None:
    if sys.platform.startswith("linux"):  # where a priority belongs to one thread
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICENESS)


class Worker:
    def __init__(self, extractor: Extractor, layout: Layout, *, batch_size: int,
                 threads: int, max_pixels: int | None, profile: bool = False,
                 yield_to_model: bool = False):
        self.extractor = extractor
        self.times = StageTimes() if profile else OFF
        self.layout = layout
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="imgfeat-decode",
                                        initializer=_lower_priority if yield_to_model else None)
        self._ahead = batch_size + 2 * threads  # next batch decodes while this one runs
        self._buffer = torch.empty((batch_size, *extractor.preprocess.size, 3),
                                   dtype=torch.uint8,
                                   pin_memory=extractor.device.type == "cuda")
        self._slots = self._buffer.numpy()  # a numpy view: copying into it needs no tensor

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run_shard(self, index: int, items: list[Item], progress: Progress,
                  current=None) -> ShardResult:
        """Extract one shard and commit its file. With `current` (a shared integer), images
        are decoded one at a time and `current` names the one being decoded, so that if a
        decoder kills the process the engine knows which image did it."""
        writer = ShardWriter(self.layout, index, self.extractor.feature_shapes,
                             self.extractor.dtype.name, capacity=max(1, len(items)))
        try:
            self._fill(writer, items, progress, current)
            with self.times.stage("write"):
                writer.commit()
        finally:
            writer.discard()
        return ShardResult(index, len(writer.keys), len(writer.error_keys))

    def _fill(self, writer: ShardWriter, items: list[Item], progress: Progress,
              current) -> None:
        load = self._loader(current)
        ahead = 1 if current is not None else self._ahead
        keys: list[str] = []
        errors = 0
        decoded = ordered_map(self._pool, load, enumerate(items), ahead)
        while True:
            with self.times.stage("wait"):
                (_, item), pixels = next(decoded, ((None, None), None))
            if item is None:
                break
            if isinstance(pixels, str):
                writer.add_error(item.key, pixels)
                errors += 1
                continue
            self._slots[len(keys)] = pixels
            keys.append(item.key)
            if len(keys) >= self.batch_size:
                self._flush(writer, keys, errors, progress)
                keys, errors = [], 0
        self._flush(writer, keys, errors, progress)

    def _loader(self, current):
        preprocess, max_pixels = self.extractor.preprocess, self.max_pixels

        def load(numbered: tuple[int, Item]):
            position, item = numbered
            if current is None:
                return load_pixels(item, preprocess, max_pixels, self.times)
            current.value = position
            pixels = load_pixels(item, preprocess, max_pixels, self.times)
            current.value = -1
            return pixels

        return load

    def _flush(self, writer: ShardWriter, keys: list[str], errors: int,
               progress: Progress) -> None:
        if keys:
            with self.times.stage("forward"):
                features = self._forward(self._buffer[:len(keys)])
            with self.times.stage("write"):
                writer.add_rows(keys, features)
        progress(len(keys), errors)

    def _forward(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        """On device out-of-memory, halve the batch (for this and later batches)."""
        try:
            return self.extractor(batch)
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.batch_size = min(self.batch_size, len(batch) // 2)
            parts, start = [], 0
            while start < len(batch):  # the size may shrink again inside
                step = self.batch_size
                parts.append(self._forward(batch[start:start + step]))
                start += step
            return {layer: np.concatenate([part[layer] for part in parts])
                    for layer in parts[0]}
