"""An ImageNet-like JPEG corpus built from the real photos installed packages ship:
about 500x375 pixels, quality 90, around 100 KB each. Deterministic for a given count."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image


def source_photos() -> list[Image.Image]:
    import matplotlib
    import skimage
    import sklearn

    paths = sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"))
    data = Path(skimage.__file__).parent / "data"
    paths += [data / n for n in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg",
                                 "motorcycle_left.png", "hubble_deep_field.jpg")]
    paths.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    return [Image.open(p).convert("RGB") for p in paths if p.exists()]


def build(folder: Path, count: int, seed: int = 0) -> Path:
    """Write `count` JPEGs into `folder` (kept if already complete)."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == count:
        return folder
    rng = random.Random(seed)
    photos = source_photos()
    for i in range(count):
        photo = photos[i % len(photos)]
        landscape = rng.random() < 0.75
        size = (500, 375) if landscape else (375, 500)
        scale = rng.uniform(0.55, 1.0)
        w, h = photo.size
        cw, ch = int(w * scale), int(h * scale)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        image = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image.save(folder / f"img{i:06d}.jpg", quality=90)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    folder = build(args.folder, args.count)
    sizes = [p.stat().st_size for p in folder.glob("*.jpg")]
    print(f"{len(sizes)} JPEGs in {folder}, mean {sum(sizes) / len(sizes) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
