"""The shard pipeline of one device: for each shard it decodes images in a bounded pool,
batches them, runs the extractor and writes one shard file. It knows nothing of other workers,
so an engine can run one per device."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from imgfeat.compute.extractor import Extractor, Pending
from imgfeat.pipeline.byte_reader import ByteReader
from imgfeat.pipeline.decode_pool import Encoded, fetched, load_pixels, ordered_map, reads_ahead
from imgfeat.pipeline.decode_processes import decoders
from imgfeat.pipeline.gpu_decode import DeviceStage
from imgfeat.report.stage_times import OFF, StageTimes
from imgfeat.sources import Item
from imgfeat.store.layout import Layout
from imgfeat.store.manifest import identity_digest
from imgfeat.store.writer import ShardWriter

Progress = Callable[[int, int], None]  # (rows, errors) just done


@dataclass(frozen=True)
class ShardResult:
    index: int
    rows: int
    errors: int
    overflow_rows: int = 0
    entry: list | None = None  # for the store's record of shard counts (store/shard_counts)


READS_IN_FLIGHT = int(os.environ.get("IMGFEAT_READS_IN_FLIGHT", "16"))

# Decode threads that share cores with the model run at this niceness: the kernel then gives
# them about a tenth of a core the model is using (enough for a heavy model's decoding, which
# then never stalls its threads) and all of a core it leaves idle.
DECODE_NICENESS = 10


def _lower_priority() -> None:
    if sys.platform.startswith("linux"):  # where a priority belongs to one thread
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICENESS)


class Done:
    """Features already in hand, in the shape of a launched batch."""

    def __init__(self, features: dict[str, np.ndarray]):
        self._features = features

    def result(self) -> dict[str, np.ndarray]:
        return self._features


class ShardPipeline:
    def __init__(self, extractor: Extractor, layout: Layout, *, batch_size: int,
                 threads: int, max_pixels: int | None, profile: bool = False,
                 yield_to_model: bool = False, decode: str = "cpu",
                 storage_options: dict | None = None, reads_in_flight: int = READS_IN_FLIGHT):
        """`decode`: cpu, or gpu / auto to decode all / a balancing share of the JPEGs on the
        extractor's device (see pipeline.gpu_decode). `reads_in_flight`: remote reads (and
        tar members, table cells) read ahead of decoding at once."""
        self.extractor = extractor
        self.times = StageTimes() if profile else OFF
        self.layout = layout
        self.batch_size = self._full_batch = batch_size
        self.max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="imgfeat-decode",
                                        initializer=_lower_priority if yield_to_model else None)
        self._ahead = batch_size + 2 * threads  # next batch decodes while this one runs
        self._reader = ByteReader(storage_options)
        self._reads_in_flight = reads_in_flight
        self._io_pool: ThreadPoolExecutor | None = None  # made for the first remote shard
        # On a GPU, two pinned buffers: one fills while the other's batch is in flight.
        on_gpu = extractor.device.type == "cuda"
        self._buffers = [torch.empty((batch_size, *extractor.preprocess.size, 3),
                                     dtype=torch.uint8, pin_memory=on_gpu)
                         for _ in range(2 if on_gpu else 1)]
        self._use_buffer(0)
        self._in_flight: tuple[list[str], int, Pending] | None = None
        self._device = None if decode == "cpu" else DeviceStage(
            decode, extractor.preprocess, extractor.device, max_pixels, threads)
        # Only with --decode cpu: routing JPEGs to the device needs the device stage's state
        # in this process, so the gpu and auto modes keep their readers on threads.
        self._processes = decoders(threads, extractor.preprocess, max_pixels, self._ahead,
                                   low_priority=yield_to_model, profile=profile) \
            if decode == "cpu" else None

    def _use_buffer(self, number: int) -> None:
        self._current = number
        self._buffer = self._buffers[number]
        self._slots = self._buffer.numpy()  # a numpy view: copying into it needs no tensor

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._processes is not None:
            self._processes.close()
        if self._io_pool is not None:
            self._io_pool.shutdown(wait=True, cancel_futures=True)

    def run_shard(self, index: int, items: list[Item], progress: Progress,
                  current=None) -> ShardResult:
        """Extract one shard and commit its file. With `current` (a shared integer), images
        are decoded one at a time and `current` names the one being decoded, so that if a
        decoder kills the process the engine knows which image did it."""
        writer = ShardWriter(self.layout, index, self.extractor.feature_shapes,
                             self.extractor.dtype.name, capacity=max(1, len(items)),
                             identity=identity_digest(self.extractor.identity()))
        self.batch_size = self._full_batch  # a batch halved in the last shard may fit again
        if self._device is not None:
            self._device.begin_shard()
        try:
            self._fill(writer, items, progress, current)
            with self.times.stage("write"):
                writer.commit()
        finally:
            self._in_flight = None  # a failed shard's batch must not land in the next one
            writer.discard()
        return ShardResult(index, len(writer.keys), len(writer.error_keys), writer.overflow_rows,
                           writer.entry)

    def _fill(self, writer: ShardWriter, items: list[Item], progress: Progress,
              current) -> None:
        keys: list[str] = []
        errors = 0
        decoded = self._decoded(items, current)
        while True:
            with self.times.stage("wait"):
                item, pixels = next(decoded, (None, None))
            if item is None:
                break
            if isinstance(pixels, str):
                writer.add_error(item.key, pixels)
                errors += 1
                continue
            if isinstance(pixels, Encoded):
                self._device.held.append((len(keys), pixels))
            else:
                self._slots[len(keys)] = pixels
            if item.meta:
                writer.note_meta(item.key, item.meta)
            keys.append(item.key)
            if len(keys) >= self.batch_size:
                self._flush(writer, keys, errors, progress)
                keys, errors = [], 0
        self._flush(writer, keys, errors, progress)
        self._land(writer, progress)

    def _decoded(self, items: list[Item], current):
        """(item, its pixels, Encoded bytes for the device, or why none) in order. A careful
        shard decodes one image at a time on a thread of this process, so that a decoder
        that kills the process names its image."""
        if self._processes is not None and current is None:
            return self._processes.decode(self._fetched(items), self.times)
        ahead = 1 if current is not None else self._ahead
        return ((item, pixels) for (_, (item, _)), pixels in ordered_map(
            self._pool, self._loader(current), enumerate(self._fetched(items)), ahead))

    def _fetched(self, items: list[Item]):
        """(item, bytes or why none, or None for a local file) in order: reads that wait on
        the network run ahead on I/O threads, a bounded number in flight, so that latency
        per object does not serialise the shard."""
        if not any(reads_ahead(item) for item in items):
            return ((item, None) for item in items)
        if self._io_pool is None:
            self._io_pool = ThreadPoolExecutor(self._reads_in_flight,
                                               thread_name_prefix="imgfeat-read")
        return fetched(self._io_pool, self._reader, items, self._reads_in_flight)

    def _loader(self, current):
        """The decode threads' function. With `current`, it names the image being decoded;
        with device decoding, it leaves the JPEGs the device takes encoded and times the rest
        (the device's share follows that time)."""
        preprocess, max_pixels, device = self.extractor.preprocess, self.max_pixels, self._device
        to_device = device.wants if device is not None and current is None else None

        def load(numbered: tuple[int, tuple[Item, bytes | str | None]]):
            position, (item, data) = numbered
            if current is not None:
                current.value = position
            began = time.perf_counter()
            pixels = load_pixels(item, preprocess, max_pixels, self.times, to_device, data)
            if to_device is not None and not isinstance(pixels, (Encoded, str)):
                device.cpu_decoded(time.perf_counter() - began)
            if current is not None:
                current.value = -1
            return pixels

        return load

    def _flush(self, writer: ShardWriter, keys: list[str], errors: int,
               progress: Progress) -> None:
        batch = self._buffer[:len(keys)]
        if self._device is not None and self._device.held:
            batch, failed = self._device.fill(batch, self.times)
            for row, reason in failed.items():
                writer.add_error(keys[row], reason)
            if failed:
                kept = [row for row in range(len(keys)) if row not in failed]
                batch, keys = batch[kept], [keys[row] for row in kept]
                errors += len(failed)
        launched = None
        if keys:
            with self.times.stage("forward"):
                launched = self._launch(batch)
        self._land(writer, progress)  # the batch before, whose pass overlapped this upload
        self._in_flight = (keys, errors, launched)
        self._use_buffer((self._current + 1) % len(self._buffers))

    def _launch(self, batch: torch.Tensor) -> Pending:
        try:
            return self.extractor.launch(batch)
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise
        # Retried out of the handler: its traceback holds the failed pass's activations.
        return Done(self._in_halves(batch))

    def _land(self, writer: ShardWriter, progress: Progress) -> None:
        """Wait for the batch in flight, if any, and write its rows."""
        if self._in_flight is None:
            return
        (keys, errors, launched), self._in_flight = self._in_flight, None
        if launched is not None:
            with self.times.stage("forward"):
                features = launched.result()
            with self.times.stage("write"):
                writer.add_rows(keys, features)
        progress(len(keys), errors)

    def _forward(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        try:
            return self.extractor(batch)
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise
        return self._in_halves(batch)

    def _in_halves(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        """After device out-of-memory: free what the failed pass held, then run `batch` in
        parts of half its size, which stays the batch size for the rest of the shard."""
        gc.collect()  # a traceback's reference cycles would keep activations alive
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
