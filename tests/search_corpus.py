"""A corpus for search and dedup tests: distinct quarters of real photos, near-duplicates
planted beside some of them (re-encoded, resized, cropped), one broken file; and a TorchScript
model whose features mean something without training: the image downsampled to 8 x 8 pixels,
centred (the features are then a correlation of small thumbnails)."""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn.functional as F
from corpus import photo_paths
from PIL import Image
from torch import nn

# A star field's points move between thumbnail cells under any crop: pixel features cannot
# call its copies duplicates, so it stays out of this corpus.
LEFT_OUT = {"hubble_deep_field.jpg"}
PLANTED = 12          # originals that get copies
CROP = 0.02           # share of each side the cropped copy loses


class Thumbnail(nn.Module):
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        small = F.adaptive_avg_pool2d(pixels, 8).flatten(1)
        return small - small.mean(1, keepdim=True)


def thumbnail_model(path: Path) -> Path:
    torch.jit.save(torch.jit.script(Thumbnail().eval()), path)
    return path


def originals() -> list[tuple[str, Image.Image]]:
    found = []
    for path in photo_paths():
        if path.name in LEFT_OUT:
            continue
        image = Image.open(path).convert("RGB")
        w, h = image.size
        boxes = [(0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h),
                 (w // 2, h // 2, w, h)]
        found += [(f"{path.stem}-q{i}", image.crop(box)) for i, box in enumerate(boxes)]
    return found


def copies(image: Image.Image) -> dict[str, Image.Image]:
    w, h = image.size
    dx, dy = int(CROP * w), int(CROP * h)
    return {"reencoded": Image.open(io.BytesIO(_jpeg(image, 40))),
            "resized": image.resize((w // 2, h // 2), Image.Resampling.BILINEAR),
            "cropped": image.crop((dx, dy, w - dx, h - dy))}


def make_search_corpus(folder: Path) -> dict[str, list[str]]:
    """Write the corpus; returns {original's file name: [its copies' file names]} for the
    planted groups (other originals have no copies)."""
    folder.mkdir(parents=True, exist_ok=True)
    groups = {}
    for number, (name, image) in enumerate(originals()):
        original = f"{name}.jpg"
        (folder / original).write_bytes(_jpeg(image, 92))
        if number % 3 == 0 and len(groups) < PLANTED:
            names = []
            for kind, copy in copies(image).items():
                names.append(f"{name}-{kind}.jpg")
                (folder / names[-1]).write_bytes(_jpeg(copy, 92))
            groups[original] = names
    (folder / "broken.jpg").write_bytes(_jpeg(Image.new("RGB", (64, 64)), 90)[:200])
    return groups


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()
