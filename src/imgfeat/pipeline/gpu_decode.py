"""JPEG decoding on the GPU: batched nvJPEG through torchvision, resize and crop on the device.

The decode threads still read each file and parse its header on the CPU (cheap, and it is where
the pixel limit and the format are checked); only baseline and progressive JPEGs in RGB or grey
come here. Anything nvJPEG rejects goes back to the CPU path, one image at a time, so `--decode
gpu` never costs an image that the CPU could decode. Results agree with the CPU path within
interpolation rounding (both resize with an antialiasing filter of the same kind).
"""

from __future__ import annotations

import io
import math
import threading
import time
import warnings

import torch
import torch.nn.functional as F
from PIL import Image

from imgfeat.errors import UsageError
from imgfeat.models.preprocess import Preprocess
from imgfeat.pipeline.cpu_decode import pixels_from_bytes

# torchvision 0.29 announces that TorchCodec will take over its image decoders; until then
# its decode_jpeg is the batched nvJPEG entry point, and the notice is not the user's concern.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities",
                        category=DeprecationWarning)

DEVICE_MODES = {"RGB", "L"}  # JPEG colour modes nvJPEG decodes as the CPU path does
_FILTERS = {"bilinear": "bilinear", "bicubic": "bicubic"}  # what interpolate antialiases


def resolve_decode(mode: str, device: torch.device) -> str:
    """The decode mode a worker on `device` runs: auto is cpu where there is no GPU."""
    if mode == "gpu" and device.type != "cuda":
        raise UsageError(f"--decode gpu decodes on a CUDA device; this worker runs on {device} "
                         "(use --decode cpu or auto)")
    return mode if device.type == "cuda" else "cpu"


def device_decodable(data: bytes, preprocess: Preprocess, max_pixels: int | None) -> bool:
    """Whether the device path can take this file: a JPEG, RGB or grey, upright, within the
    pixel limit, for a model that wants a resized centre crop."""
    if preprocess.mode != "crop" or preprocess.interpolation not in _FILTERS:
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            return image.format == "JPEG" and image.mode in DEVICE_MODES \
                and (max_pixels is None or width * height <= max_pixels) \
                and _orientation(image) in (None, 1)
    except Exception:  # the CPU path gives the proper error
        return False


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(0x0112)
    except Exception:
        return None


class DeviceDecoder:
    """Decodes batches of JPEG bytes into model-sized uint8 (H, W, 3) pixels on `device`."""

    def __init__(self, preprocess: Preprocess, device: torch.device):
        self.preprocess = preprocess
        self.device = device

    def __call__(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        """One entry per input, None where the device could not decode it."""
        if not datas:
            return []
        images = self._decode(datas)
        return [None if image is None else self._geometry(image) for image in images]

    def _decode(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            pass  # one bad file fails the whole batch: find it
        images: list[torch.Tensor | None] = []
        for tensor in encoded:
            try:
                images.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                images.append(None)
        return images

    def _geometry(self, image: torch.Tensor) -> torch.Tensor:
        """Resize the shorter side (as the CPU path rounds), centre crop, back to uint8 HWC."""
        height, width = self.preprocess.resized_size(image.shape[1], image.shape[2])
        crop_h, crop_w = self.preprocess.size
        pixels = F.interpolate(image[None].float(), size=(height, width),
                               mode=_FILTERS[self.preprocess.interpolation],
                               antialias=True, align_corners=False)[0]
        top = max(0, round((height - crop_h) / 2.0))
        left = max(0, round((width - crop_w) / 2.0))
        pixels = pixels[:, top:top + crop_h, left:left + crop_w]
        if pixels.shape[1:] != (crop_h, crop_w):  # smaller than the crop: pad, as torchvision
            pad_h, pad_w = crop_h - pixels.shape[1], crop_w - pixels.shape[2]
            pixels = F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2,
                                    pad_h // 2, pad_h - pad_h // 2))
        return pixels.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


def split_share(cpu_rate: float, device_rate: float) -> float:
    """The share of JPEGs to send to the device so both decoders finish together."""
    if not (math.isfinite(cpu_rate) and math.isfinite(device_rate)) \
            or cpu_rate + device_rate <= 0:
        return 0.5
    return device_rate / (cpu_rate + device_rate)


class DecodeSplit:
    """Which JPEGs go to the device decoder: all (`gpu`), or (`auto`) a share that follows the
    measured rates of the two decoders so that both finish a batch together."""

    def __init__(self, mode: str, cpu_threads: int):
        self.mode = mode
        self.share = 1.0 if mode == "gpu" else 0.5
        self._cpu_threads = max(1, cpu_threads)
        self._taken = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Whether the next image goes to the device; spreads the share evenly."""
        with self._lock:
            before, self._taken = self._taken, self._taken + 1
        return math.floor((before + 1) * self.share) > math.floor(before * self.share)

    def update(self, cpu_seconds_per_image: float, device_images: int,
               device_seconds: float) -> None:
        """Move the share (in `auto`) towards the balance of the latest measurements."""
        if self.mode != "auto" or device_images == 0 or cpu_seconds_per_image <= 0:
            return
        cpu_rate = self._cpu_threads / cpu_seconds_per_image
        device_rate = device_images / max(device_seconds, 1e-9)
        self.share = 0.5 * self.share + 0.5 * split_share(cpu_rate, device_rate)

    def disable(self) -> None:
        self.share = 0.0


class DeviceStage:
    """A worker's device decoding: which images the decode threads leave encoded, and the
    batch rows filled on the device before the forward pass."""

    def __init__(self, mode: str, preprocess: Preprocess, device: torch.device,
                 max_pixels: int | None, cpu_threads: int):
        self.decoder = DeviceDecoder(preprocess, device)
        self.split = DecodeSplit(mode, cpu_threads)
        self.preprocess, self.device, self.max_pixels = preprocess, device, max_pixels
        self.held: list[tuple[int, bytes]] = []
        self._cpu = [0.0, 0]  # seconds, images decoded by the threads since the last batch
        self._lock = threading.Lock()

    def wants(self, data: bytes) -> bool:
        return self.split.take() and device_decodable(data, self.preprocess, self.max_pixels)

    def cpu_decoded(self, seconds: float) -> None:
        with self._lock:
            self._cpu[0] += seconds
            self._cpu[1] += 1

    def fill(self, batch: torch.Tensor, times) -> tuple[torch.Tensor, dict[int, str]]:
        """`batch` on the device with the held rows decoded there; rows that no decoder can
        take come back as {row: reason}. A device decoder that fails outright is turned off
        for the rest of the run and its rows decoded on the CPU."""
        rows, datas = zip(*self.held) if self.held else ((), ())
        self.held = []
        batch = batch.to(self.device, non_blocking=True)
        began = time.perf_counter()
        with times.stage("gpu-decode"):
            try:
                images = self.decoder(list(datas))
            except Exception:  # not one bad file (that is handled inside): the decoder
                self.split.disable()
                images = [None] * len(datas)
        # The worker's own thread time, not the device's: a synchronize here would also wait
        # for the batch in flight. The host side (Huffman decoding, launches) is what holds
        # the worker up; the device work overlaps the pass before.
        self._rebalance(len(datas), time.perf_counter() - began)
        failed = {}
        for row, data, image in zip(rows, datas, images):
            if image is None:
                pixels = pixels_from_bytes(data, self.preprocess, self.max_pixels, times)
                if isinstance(pixels, str):
                    failed[row] = pixels
                    continue
                image = torch.from_numpy(pixels).to(self.device)
            batch[row] = image
        return batch, failed

    def _rebalance(self, device_images: int, device_seconds: float) -> None:
        with self._lock:
            (seconds, images), self._cpu = self._cpu, [0.0, 0]
        if images:
            self.split.update(seconds / images, device_images, device_seconds)
