"""Which images the GPU decoder takes: the JPEGs it decodes as the CPU path would, chosen by
a hash of their key against a share fixed for the whole shard, so that which image goes where
never depends on timing and the same run gives the same store twice."""

from __future__ import annotations

import hashlib
import io
import math

from PIL import Image

from imgfeat.models.preprocess import Preprocess

DEVICE_MODES = {"RGB", "L"}  # JPEG colour modes nvJPEG decodes as the CPU path does
DEVICE_FILTERS = {"bilinear", "bicubic"}  # what pipeline.device_resize computes
# Larger photos go to the CPU, whose JPEG draft decodes them at a fraction of the cost; this
# also bounds the device memory one image can take (see gpu_decode.decode_memory).
DEVICE_MAX_PIXELS = 24_000_000
SHARE_STEPS = 16  # auto's share moves in these steps, so small timing noise leaves it alone
_SOS, _EOI = b"\xff\xda", b"\xff\xd9"


def device_pixels(data: bytes, preprocess: Preprocess, max_pixels: int | None) -> int | None:
    """The pixel count of a JPEG the device path can take, else None: baseline (progressive
    ones are decoded on the host, one at a time, with syncs), complete, RGB or grey, upright,
    within the pixel limits, for a model that wants a resized centre crop."""
    if preprocess.mode != "crop" or preprocess.interpolation not in DEVICE_FILTERS \
            or not scan_complete(data):
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            pixels = width * height
            taken = image.format == "JPEG" and image.mode in DEVICE_MODES \
                and not image.info.get("progressive") and not image.info.get("progression") \
                and image.info.get("adobe_transform", 1) != 0 \
                and pixels <= min(DEVICE_MAX_PIXELS, max_pixels or DEVICE_MAX_PIXELS) \
                and _orientation(image) in (None, 1)
            return pixels if taken else None
    except Exception:  # the CPU path gives the proper error
        return None


def scan_complete(data: bytes) -> bool:
    """Whether an end-of-image marker follows the last start of scan. A truncated JPEG lacks
    it; nvJPEG may fill in the missing part where the CPU path rightly reports an error.
    (Inside entropy-coded data a 0xFF byte is always stuffed, so the marker cannot occur
    there by chance; an embedded thumbnail's markers come before the main scan.)"""
    return data.rfind(_EOI) > data.rfind(_SOS) >= 0


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(0x0112)
    except Exception:
        return None


def key_point(key: str) -> float:
    """A point in [0, 1) fixed by the key alone: the same in every process, run and machine
    (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_share(cpu_rate: float, device_rate: float) -> float:
    """The share of JPEGs to send to the device so both decoders finish together."""
    if not (math.isfinite(cpu_rate) and math.isfinite(device_rate)) \
            or cpu_rate + device_rate <= 0:
        return 0.5
    return device_rate / (cpu_rate + device_rate)


class DecodeSplit:
    """Which JPEGs go to the device decoder: all (`gpu`), or (`auto`) a share that follows the
    measured rates of the two decoders. The share in force changes only between shards, and
    an image goes to the device when its key's point falls below it."""

    def __init__(self, mode: str, cpu_threads: int):
        self.mode = mode
        self.share = 1.0 if mode == "gpu" else 0.5
        self._next = self.share
        self._cpu_threads = max(1, cpu_threads)

    def begin_shard(self) -> None:
        """Fix the share for the shard about to start."""
        self.share = self._next

    def take(self, key: str) -> bool:
        return key_point(key) < self.share

    def update(self, cpu_seconds_per_image: float, device_images: int,
               device_seconds: float) -> None:
        """Move the next shard's share (in `auto`) towards the balance of the latest rates."""
        if self.mode != "auto" or device_images == 0 or cpu_seconds_per_image <= 0:
            return
        cpu_rate = self._cpu_threads / cpu_seconds_per_image
        device_rate = device_images / max(device_seconds, 1e-9)
        balanced = 0.5 * self._next + 0.5 * split_share(cpu_rate, device_rate)
        self._next = round(balanced * SHARE_STEPS) / SHARE_STEPS

    def disable(self) -> None:
        """The device decoder is unusable: nothing more goes to it, from now on."""
        self.share = self._next = 0.0
