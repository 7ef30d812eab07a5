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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from imgfeat.models.preprocess import Preprocess

DEVICE_MODES = {"RGB", "L"}  # JPEG colour modes nvJPEG decodes as the CPU path does
_FILTERS = {"bilinear": "bilinear", "bicubic": "bicubic"}  # what interpolate antialiases


@dataclass(frozen=True)
class Encoded:
    """A JPEG the decode threads left for the device; `data` is the file's bytes."""

    data: bytes


def device_decodable(data: bytes, preprocess: Preprocess) -> bool:
    """Whether the device path can take this file: a JPEG, RGB or grey, cropped to size."""
    if preprocess.mode != "crop" or preprocess.interpolation not in _FILTERS \
            or preprocess.bgr:
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format == "JPEG" and image.mode in DEVICE_MODES \
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
