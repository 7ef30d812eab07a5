"""JPEG decoding on the GPU: batched nvJPEG through torchvision, then resize and crop on the
device (pipeline.device_resize), in chunks of bounded size, on a stream of its own.

The decode threads still read each file and parse its header on the CPU (cheap, and it is where
the pixel limit, the format and the routing are checked: pipeline.decode_route); only the JPEGs
routed here are left encoded. Anything nvJPEG rejects, and a chunk that runs out of memory,
goes back to the CPU path, so `--decode gpu` never costs an image that the CPU could decode.

Streams. torchvision allocates nvJPEG's outputs on the caller's current stream and writes them
on a stream of its own, unordered with the caller's. On the compute stream, memory that the
pass still queued there has freed could be handed out and overwritten under it; so decoding
runs with a dedicated stream current, whose freed memory only its own allocations reuse, and
that stream is drained before each nvJPEG call (its queued resizes may still read blocks the
call is about to receive). The filled batch is then handed to the compute stream with
`wait_stream` and `record_stream`.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
import sys
import threading
import time
import warnings
from collections import defaultdict

import torch

from imgfeat.errors import UsageError
from imgfeat.models.preprocess import Preprocess
from imgfeat.pipeline.cpu_decode import pixels_from_bytes
from imgfeat.pipeline.decode_pool import Encoded
from imgfeat.pipeline.decode_route import DEVICE_MAX_PIXELS, DecodeSplit, device_pixels
from imgfeat.pipeline.device_resize import FLOAT_SLICE_BYTES, DeviceResizer, slice_bytes

# torchvision 0.29 announces that TorchCodec will take over its image decoders; until then
# its decode_jpeg is the batched nvJPEG entry point, and the notice is not the user's concern.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities",
                        category=DeprecationWarning)

# `--decode auto` takes the GPU only once a GPU run has shown that its features match the CPU
# path's (cosine >= 0.999 on real photos) and that it is faster: bench/gpu_acceptance.py says
# whether to switch this. The variable lets that command measure the switched-on mode.
AUTO_INCLUDES_GPU = os.environ.get("IMGFEAT_AUTO_DECODE_GPU") == "1"

CHUNK_PIXELS = 64_000_000  # source pixels decoded at once: ~340 ImageNet photos, 5 of 12 MP
NVJPEG_BYTES_PER_PIXEL = 3  # nvJPEG's own buffers, outside PyTorch's allocator (4:4:4 planes)
_NVJPEG_ALLOCATOR_FAILURE = re.compile(r"Failed to [^:]*: 5\b")  # NVJPEG_STATUS_ALLOCATOR_FAILURE


def resolve_decode(mode: str, device: torch.device) -> str:
    """The decode mode a worker on `device` runs: auto is cpu (see AUTO_INCLUDES_GPU)."""
    if mode == "gpu" and device.type != "cuda":
        raise UsageError(f"--decode gpu decodes on a CUDA device; this worker runs on {device} "
                         "(use --decode cpu or auto)")
    if mode == "auto":
        return "auto" if AUTO_INCLUDES_GPU and device.type == "cuda" else "cpu"
    return mode


def decode_memory(preprocess: Preprocess) -> tuple[int, int]:
    """(bytes, bytes per batch row) of device memory that decoding on the device needs beside
    the model: a chunk's decoded images and nvJPEG's buffers for them, the resize's slice of
    planes (its budget, or one plane of the largest photo taken, whose crop region is at most
    a square of its pixels), and the batch it fills, which waits on the device while the
    pass before it runs."""
    out_h, out_w = preprocess.size
    side = math.isqrt(DEVICE_MAX_PIXELS) + 1
    resize = max(FLOAT_SLICE_BYTES, slice_bytes(1, side, side, out_h, out_w))
    return CHUNK_PIXELS * (3 + NVJPEG_BYTES_PER_PIXEL) + resize, out_h * out_w * 3


def chunk_ranges(pixels: list[int]) -> list[range]:
    """Consecutive runs of images whose pixels add up to at most CHUNK_PIXELS (an image
    larger than that is a run of its own)."""
    budget, ranges, start, total = CHUNK_PIXELS, [], 0, 0
    for index, count in enumerate(pixels):
        if total and total + count > budget:
            ranges.append(range(start, index))
            start, total = index, 0
        total += count
    if start < len(pixels):
        ranges.append(range(start, len(pixels)))
    return ranges


def out_of_memory(exc: BaseException) -> bool:
    """Whether a decoding failure is the device running out of memory: PyTorch's own, the same
    re-raised by torchvision as a RuntimeError, or nvJPEG's allocator failing."""
    text = str(exc)
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower() \
        or bool(_NVJPEG_ALLOCATOR_FAILURE.search(text))


def on_stream(stream: torch.cuda.Stream | None):
    """`stream` current inside (no stream: a CPU device, nothing to do)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class DeviceDecoder:
    """Decodes JPEG bytes into model-sized uint8 (h, w, 3) rows on `device`, one chunk at a
    time, with `stream` (the decode stream; None on a CPU device) current."""

    def __init__(self, preprocess: Preprocess, device: torch.device,
                 stream: torch.cuda.Stream | None = None):
        self.device, self._stream = device, stream
        self.resize = DeviceResizer(preprocess, device)
        self.said_out_of_memory = False

    def __call__(self, encoded: list[Encoded]) -> list[torch.Tensor | None]:
        """One entry per input, None where the device did not decode it; the rows belong to
        the decode stream (hand them to another with wait_stream and record_stream)."""
        rows: list[torch.Tensor | None] = []
        with on_stream(self._stream):
            for run in chunk_ranges([item.pixels for item in encoded]):
                rows.extend(self._chunk([encoded[index].data for index in run]))
        return rows

    def _chunk(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        self._drain()
        try:
            return self._shape(self._decode(datas))
        except Exception as exc:
            if not out_of_memory(exc):
                raise
        # Out of the handler first: its traceback holds the chunk's decoded images.
        self._out_of_memory(len(datas))
        return [None] * len(datas)

    def _drain(self) -> None:
        """Wait (sleeping, not spinning) for the decode stream's queued work."""
        if self._stream is not None:
            done = torch.cuda.Event(blocking=True)
            done.record(self._stream)
            done.synchronize()

    def _decode(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError as exc:
            if out_of_memory(exc):
                raise
        images: list[torch.Tensor | None] = []  # one bad file fails the whole call: find it
        for tensor in encoded:
            try:
                images.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError as exc:
                if out_of_memory(exc):
                    raise
                images.append(None)
        return images

    def _shape(self, images: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Resize and crop, one call per image size (a collection has few)."""
        by_size: dict[tuple, list[int]] = defaultdict(list)
        for index, image in enumerate(images):
            if image is not None:
                by_size[tuple(image.shape)].append(index)
        rows: list[torch.Tensor | None] = [None] * len(images)
        for indices in by_size.values():
            shaped = self.resize([images[index] for index in indices])
            for index, row in zip(indices, shaped):
                rows[index] = row
        return rows

    def _out_of_memory(self, count: int) -> None:
        gc.collect()  # reference cycles of the traceback would keep the images alive
        if self._stream is not None:
            torch.cuda.empty_cache()
        if not self.said_out_of_memory:
            self.said_out_of_memory = True
            print(f"imgfeat: {self.device} ran out of memory decoding {count} JPEGs; those "
                  "(and any later chunk that does) are decoded on the CPU",
                  file=sys.stderr, flush=True)


class DeviceStage:
    """A worker's device decoding: which images the decode threads leave encoded, and the
    batch rows filled on the device before the forward pass."""

    def __init__(self, mode: str, preprocess: Preprocess, device: torch.device,
                 max_pixels: int | None, cpu_threads: int):
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.decoder = DeviceDecoder(preprocess, device, self._stream)
        self.split = DecodeSplit(mode, cpu_threads)
        self.preprocess, self.device, self.max_pixels = preprocess, device, max_pixels
        self.held: list[tuple[int, Encoded]] = []
        self._cpu = [0.0, 0]  # seconds, images decoded by the threads since the last batch
        self._lock = threading.Lock()

    def begin_shard(self) -> None:
        self.held = []
        self.split.begin_shard()

    def wants(self, key: str, data: bytes) -> int | None:
        """The pixel count of a file the device takes, else None."""
        if not self.split.take(key):
            return None
        return device_pixels(data, self.preprocess, self.max_pixels)

    def cpu_decoded(self, seconds: float) -> None:
        with self._lock:
            self._cpu[0] += seconds
            self._cpu[1] += 1

    def fill(self, batch: torch.Tensor, times) -> tuple[torch.Tensor, dict[int, str]]:
        """`batch` (host rows decoded by the threads) on the device, with the held rows
        decoded there and ready for the compute stream; rows that no decoder can take come
        back as {row: reason}."""
        rows, encoded = zip(*self.held) if self.held else ((), ())
        self.held = []
        began = time.perf_counter()
        with times.stage("gpu-decode"):
            images = self._decode(list(encoded))
        # The worker's own thread time, not the device's: a synchronize here would also wait
        # for the batch in flight. The host side (Huffman decoding, launches) is what holds
        # the worker up; the device work overlaps the pass before.
        self._rebalance(len(encoded), time.perf_counter() - began)
        failed = self._on_cpu(batch, rows, encoded, images, times)
        with on_stream(self._stream):
            on_device = batch.to(self.device, non_blocking=True)
            done = [(row, image) for row, image in zip(rows, images) if image is not None]
            if done:
                index = torch.tensor([row for row, _ in done], device=self.device)
                on_device[index] = torch.stack([image for _, image in done])
        if self._stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self._stream)
            on_device.record_stream(compute)  # its memory is the decode stream's
        return on_device, failed

    def _decode(self, encoded: list[Encoded]) -> list[torch.Tensor | None]:
        """The decoder's rows; a decoder that fails outright (not one file, not memory: those
        it handles) is turned off for the rest of the run, and says so."""
        try:
            return self.decoder(encoded)
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            reason = f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
        self.split.disable()
        print(f"imgfeat: GPU JPEG decoding failed on {self.device} ({reason}); decoding on the "
              "CPU from here on", file=sys.stderr, flush=True)
        return [None] * len(encoded)

    def _on_cpu(self, batch: torch.Tensor, rows, encoded, images, times) -> dict[int, str]:
        """Decode on the CPU, into the host batch, the rows the device did not."""
        slots, failed = batch.numpy(), {}
        for row, item, image in zip(rows, encoded, images):
            if image is None:
                pixels = pixels_from_bytes(item.data, self.preprocess, self.max_pixels, times)
                if isinstance(pixels, str):
                    failed[row] = pixels
                else:
                    slots[row] = pixels
        return failed

    def _rebalance(self, device_images: int, device_seconds: float) -> None:
        with self._lock:
            (seconds, images), self._cpu = self._cpu, [0.0, 0]
        if images:
            self.split.update(seconds / images, device_images, device_seconds)
