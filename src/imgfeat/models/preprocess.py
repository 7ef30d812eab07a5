"""Preprocessing as data: the geometry a model wants (resize, crop) and its normalisation.

Geometry runs per image in the decode pool and yields uint8 HWC arrays; normalisation runs once
per batch on the device, so only a quarter of the bytes cross to the GPU and the float maths
happens where it is cheap. The geometry mirrors timm's eval transform exactly.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from imgfeat.errors import UsageError
from imgfeat.options import INTERPOLATIONS as INTERPOLATION_NAMES
from imgfeat.options import RESIZE_MODES

# Pillow's pixels come as a read-only array, which torch only reads here.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                        module=r"imgfeat\.")

INTERPOLATIONS = {name: InterpolationMode(name) for name in INTERPOLATION_NAMES}
PIL_FILTERS = {name: getattr(Image.Resampling, name.upper()) for name in INTERPOLATION_NAMES}
_TENSOR_FILTERS = ("bilinear", "bicubic")  # torch's antialiased uint8 kernels follow Pillow's


@dataclass(frozen=True)
class Preprocess:
    """`size` is the (height, width) fed to the model; `crop_pct` how much of the resized
    image the crop keeps; `mode`: crop (keep aspect, centre crop), squash (stretch), pad
    (keep aspect, fit inside, pad with the mean colour)."""

    size: tuple[int, int] = (224, 224)
    crop_pct: float = 0.875
    mode: str = "crop"
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    jpeg_draft: bool = True  # decode large JPEGs at reduced scale (see imaging.decode)
    bgr: bool = False  # the model wants BGR (Caffe); mean and std are then in BGR order

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise UsageError(f"unknown resize mode {self.mode!r}; choose {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(f"unknown interpolation {self.interpolation!r}; "
                             f"choose {', '.join(INTERPOLATIONS)}")
        if not 0 < self.crop_pct <= 1:
            raise UsageError(f"--crop-pct must be in (0, 1], got {self.crop_pct}")
        if min(self.size) < 1 or len(self.mean) != 3 or len(self.std) != 3 or 0 in self.std:
            raise UsageError("image size must be positive and --mean/--std three non-zero values")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, **changes) -> Preprocess:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def draft_side(self) -> int | None:
        """How small a drafted JPEG may get: twice the resize target, so that the final
        antialiased resize still does the last halving. Drafting right down to the target
        differs visibly from a full decode (pixel correlation down to 0.977 on the test
        photos); keeping 2x stays at 0.999 or better."""
        return 2 * max(self.scale_size) if self.jpeg_draft else None

    @property
    def scale_size(self) -> tuple[int, int]:
        return tuple(math.floor(s / self.crop_pct) for s in self.size)

    @property
    def takes_arrays(self) -> bool:
        """Whether `geometry` also takes (H, W, 3) uint8 arrays, not only Pillow images."""
        return self.mode != "pad" and self.interpolation in _TENSOR_FILTERS

    def geometry(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """Resize and crop an RGB image to `size`; uint8 array of shape (H, W, 3). An array
        is taken where `takes_arrays` says so."""
        if isinstance(image, np.ndarray):
            return self._array_geometry(image)
        resample = INTERPOLATIONS[self.interpolation]
        if self.mode == "pad":
            image = _fit_inside(image, self.scale_size, resample)
            image = F.center_crop(image, list(self.size)) if _larger(image, self.size) else image
            return _pad_to(np.asarray(image), self.size, self.mean)
        if self.mode == "squash":
            target = list(self.scale_size)
        else:
            target = list(self.resized_size(image.height, image.width))
        if self.interpolation in _TENSOR_FILTERS:
            return self._tensor_resize_crop(np.asarray(image), *target)
        if self.mode == "crop" and (pixels := self._resize_crop(image, *target)) is not None:
            return pixels
        image = F.resize(image, target, interpolation=resample)
        return np.asarray(F.center_crop(image, list(self.size)))

    def _resize_crop(self, image: Image.Image, height: int, width: int) -> np.ndarray | None:
        """Resize to (height, width), then centre crop, in one resample of only the pixels
        the crop keeps; None where the two steps must stay apart.

        Pillow's `box` maps the crop back onto the source at the full resize's scale, so each
        output pixel gets the filter taps it gets when the whole image is resized and then
        cropped, for about half the work on a 4:3 photo. Sample positions can differ in the
        last bits of a float, which moves a few values by a level or two; with the nearest and
        box filters such a tie picks another source pixel, so they, and upscaling (cheap),
        keep the two-step path."""
        crop_h, crop_w = self.size
        if (self.interpolation in {"nearest", "box"} or height > image.height
                or width > image.width):
            return None
        top, left = round((height - crop_h) / 2.0), round((width - crop_w) / 2.0)
        step_y, step_x = image.height / height, image.width / width
        box = (left * step_x, top * step_y, (left + crop_w) * step_x, (top + crop_h) * step_y)
        return np.asarray(image.resize((crop_w, crop_h), PIL_FILTERS[self.interpolation],
                                       box=box))

    def _array_geometry(self, pixels: np.ndarray) -> np.ndarray:
        if not self.takes_arrays:
            raise ValueError(f"{self.mode}/{self.interpolation} geometry needs a Pillow image")
        height, width = pixels.shape[:2]
        target = self.scale_size if self.mode == "squash" else self.resized_size(height, width)
        return self._tensor_resize_crop(pixels, *target)

    def _tensor_resize_crop(self, pixels: np.ndarray, height: int, width: int) -> np.ndarray:
        """Resize to (height, width), then centre crop, with torch's antialiased uint8
        kernels, which follow Pillow's filters: 2x (bilinear) and 2.6x (bicubic) the speed of
        Pillow's crop-region resize on one core here, the same pixels within one level for
        bilinear and within a few levels on a few pixels in 10^5 for bicubic (rounding
        between the two passes). One image is one task for torch, so the decode threads
        that call this take no cores from the model's thread pool."""
        _one_torch_thread()
        image = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
        resized = torch.nn.functional.interpolate(image, size=(height, width),
                                                  mode=self.interpolation, antialias=True,
                                                  align_corners=False)
        crop_h, crop_w = self.size
        top, left = round((height - crop_h) / 2.0), round((width - crop_w) / 2.0)
        return resized[0, :, top:top + crop_h, left:left + crop_w].permute(1, 2, 0).numpy()

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of crop mode's aspect-keeping resize, rounded as torchvision."""
        scale = self.scale_size
        if scale[0] == scale[1]:
            short, long = sorted((height, width))
            new_short, new_long = scale[0], int(scale[0] * long / short)
            return (new_short, new_long) if height <= width else (new_long, new_short)
        ratio = max(scale[0] / height, scale[1] / width)
        return round(height * ratio), round(width * ratio)

    def normalizer(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) so that `uint8 * scale + shift` is the normalised float input."""
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        return 1.0 / (255.0 * std), -mean / std


_THREAD = threading.local()


def _one_torch_thread() -> None:
    """Keep torch to this thread in a decode thread: otherwise each one opens an OpenMP team
    as large as the model's, and those teams spin on the model's cores."""
    if not getattr(_THREAD, "single", False) and threading.current_thread() is not \
            threading.main_thread():
        torch.set_num_threads(1)
    _THREAD.single = True


def _fit_inside(image: Image.Image, box: tuple[int, int], resample) -> Image.Image:
    ratio = min(box[0] / image.height, box[1] / image.width)
    target = [max(1, round(image.height * ratio)), max(1, round(image.width * ratio))]
    return F.resize(image, target, interpolation=resample)


def _larger(image: Image.Image, size: tuple[int, int]) -> bool:
    return image.height > size[0] or image.width > size[1]


def _pad_to(array: np.ndarray, size: tuple[int, int], mean) -> np.ndarray:
    out = np.empty((size[0], size[1], 3), dtype=np.uint8)
    out[:] = np.round(np.asarray(mean) * 255).astype(np.uint8)
    top, left = (size[0] - array.shape[0]) // 2, (size[1] - array.shape[1]) // 2
    out[top:top + array.shape[0], left:left + array.shape[1]] = array
    return out
