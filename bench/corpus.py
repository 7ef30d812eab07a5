"""An ImageNet-like JPEG corpus built from the real photos installed packages ship:
about 500x375 pixels, quality 90, around 100 KB each. Deterministic for a given count."""

from __future__ import annotations

import argparse
import os
import random
from concurrent.futures import ProcessPoolExecutor
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


def build(folder: Path, count: int, seed: int = 0, jobs: int | None = None) -> Path:
    """Write `count` JPEGs into `folder` (kept if already complete), on `jobs` processes
    (default: every core); the files are the same whatever the number of processes."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == count:
        return folder
    rng = random.Random(seed)
    sizes = [photo.size for photo in source_photos()]
    plans = [_plan(rng, i, sizes[i % len(sizes)]) for i in range(count)]
    if jobs is None:
        jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if jobs <= 1 or count < 200:
        _render_all(folder, plans)
        return folder
    with ProcessPoolExecutor(jobs) as pool:
        for done in [pool.submit(_render_all, folder, plans[i::jobs]) for i in range(jobs)]:
            done.result()
    return folder


def _plan(rng: random.Random, index: int, size: tuple[int, int]) -> tuple:
    """One image's random choices, drawn in file order so that the corpus is fixed by `seed`."""
    landscape = rng.random() < 0.75
    scale = rng.uniform(0.55, 1.0)
    w, h = size
    cw, ch = int(w * scale), int(h * scale)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    flip = rng.random() < 0.5
    return index, landscape, (x, y, x + cw, y + ch), flip


def _render_all(folder: Path, plans: list[tuple]) -> None:
    photos = source_photos()
    for index, landscape, box, flip in plans:
        size = (500, 375) if landscape else (375, 500)
        image = photos[index % len(photos)].crop(box).resize(size, Image.Resampling.BICUBIC)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image.save(folder / f"img{index:06d}.jpg", quality=90)


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
