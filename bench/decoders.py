"""JPEG decoding for the CPU pipeline: Pillow (imgfeat's decoder, with draft mode) against the
decoders that install from the registries, on one core, with the same geometry after each,
and how far their model-sized pixels are from Pillow's; then the geometry itself, Pillow's
crop-region resize against torch's antialiased uint8 kernels (imgfeat's, for bilinear and
bicubic).

    python bench/decoders.py [--count 300]

Lines: decode only (bytes to full or reduced RGB) and decode + geometry (to 224 x 224, as a
224-pixel model gets it). Each rate is the best of several passes (the machine is shared).
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import commit, machine, write_section
from corpus import build
from PIL import Image

from imgfeat.models.preprocess import Preprocess
from imgfeat.pipeline.cpu_decode import decode, pixels_from_bytes

PREPROCESS = Preprocess()


def decoders() -> dict:
    """name -> (bytes -> RGB array at the decoder's size, bytes -> 224 x 224 pixels)."""
    side = PREPROCESS.draft_side
    geometry = PREPROCESS.geometry  # takes arrays and Pillow images alike
    found = {"Pillow (draft mode)": (
        lambda data: np.asarray(decode(data, None, side)),
        lambda data: geometry(decode(data, None, side)))}
    try:
        import simplejpeg

        found["imgfeat: simplejpeg to an array (Pillow's header and DCT scale)"] = (
            lambda data: decode(data, None, side, as_array=True),
            lambda data: pixels_from_bytes(data, PREPROCESS, None))
        for name, fast in (("simplejpeg, any M/8 DCT scale", False),
                           ("simplejpeg, any scale, fast DCT + upsampling", True)):
            def plain(data, fast=fast):
                return simplejpeg.decode_jpeg(data, "RGB", fastdct=fast, fastupsample=fast,
                                              min_height=side, min_width=side)

            found[name] = (plain, lambda data, plain=plain: geometry(plain(data)))
    except ImportError:
        pass
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        turbo = TurboJPEG()

        def turbo_decode(data):
            width, height, _, _ = turbo.decode_header(data)
            fits = [f for f in turbo.scaling_factors if f[0] <= f[1]
                    and width * f[0] >= side * f[1] and height * f[0] >= side * f[1]]
            scale = min(fits, key=lambda f: f[0] / f[1], default=(1, 1))
            return turbo.decode(data, pixel_format=TJPF_RGB, scaling_factor=scale)

        found["PyTurboJPEG (libturbojpeg, DCT scaling)"] = (
            turbo_decode, lambda data: geometry(turbo_decode(data)))
    except (ImportError, RuntimeError, OSError):
        pass
    return found


def best_rate(step, items, passes: int = 5) -> float:
    best = float("inf")
    for _ in range(passes):
        began = time.perf_counter()
        for item in items:
            step(item)
        best = min(best, time.perf_counter() - began)
    return len(items) / best


def large_corpus(folder: Path, count: int) -> list[bytes]:
    """Phone-sized JPEGs (2048 x 1536), where draft decoding pays."""
    photos = sorted(build(folder, count).glob("*.jpg"))
    datas = []
    for path in photos:
        buffer = io.BytesIO()
        Image.open(path).resize((2048, 1536), Image.Resampling.BICUBIC).save(buffer, "JPEG",
                                                                            quality=90)
        datas.append(buffer.getvalue())
    return datas


def measure(datas: list[bytes]) -> list[tuple[str, float, float, int, float]]:
    """(decoder, decode rate, decode + geometry rate, max pixel difference from Pillow's,
    fraction of pixels more than 1 level off)."""
    rows = []
    reference = [PREPROCESS.geometry(decode(d, None, PREPROCESS.draft_side)) for d in datas]
    for name, (decoded, shaped) in decoders().items():
        diffs = [np.abs(shaped(d).astype(int) - r.astype(int)) for d, r in zip(datas, reference)]
        rows.append((name, best_rate(decoded, datas), best_rate(shaped, datas),
                     max(int(d.max()) for d in diffs),
                     float(np.mean([(d > 1).mean() for d in diffs]))))
    return rows


def geometry_lines(datas: list[bytes]) -> list[str]:
    """Pillow's resize against imgfeat's (torch's kernels), per filter, on decoded images."""
    import torch

    torch.set_num_threads(1)
    images = [decode(d, None, PREPROCESS.draft_side) for d in datas]
    lines = []
    for interpolation in ("bilinear", "bicubic"):
        preprocess = Preprocess(interpolation=interpolation)

        def pillow(image, preprocess=preprocess):
            target = preprocess.resized_size(image.height, image.width)
            return preprocess._resize_crop(image, *target)

        fast = [preprocess.geometry(i) for i in images]
        diffs = [np.abs(a.astype(int) - pillow(i).astype(int)) for a, i in zip(fast, images)]
        worst = max(int(d.max()) for d in diffs)
        share = float(np.mean([(d > 1).mean() for d in diffs]))
        lines.append(f"| {interpolation} | {best_rate(pillow, images):.0f} | "
                     f"{best_rate(preprocess.geometry, images):.0f} | {worst} | {share:.6f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--work", type=Path,
                        default=Path(tempfile.gettempdir()) / "imgfeat-bench")
    args = parser.parse_args()
    small = [p.read_bytes() for p in
             sorted(build(args.work / f"corpus-{args.count}", args.count).glob("*.jpg"))]
    large = large_corpus(args.work / "corpus-40", 40)
    lines = ["| JPEGs | decoder | decode, img/s | decode + geometry, img/s | max diff | "
             "share > 1 level |", "|---|---|---|---|---|---|"]
    for label, datas in ((f"{len(small)} of 500x375", small), (f"{len(large)} of 2048x1536",
                                                                 large)):
        for name, decoded, shaped, worst, share in measure(datas):
            lines.append(f"| {label} | {name} | {decoded:.0f} | {shaped:.0f} | {worst} | "
                         f"{share:.4f} |")
    lines += ["", "| filter | Pillow crop-region resize, img/s | imgfeat (torch kernels), img/s | "
              "max diff | share > 1 level |", "|---|---|---|---|---|",
              *geometry_lines(small)]
    table = "\n".join(lines)
    print(table)
    write_section("JPEG decoders (one core)",
                  f"Machine: {machine()}; commit {commit()}; load average "
                  f"{os.getloadavg()[0]:.1f}. `bench/decoders.py`: best of 5 passes on one "
                  "thread; geometry: resize and centre crop to 224 x 224 (imgfeat's, the same "
                  "after every decoder); differences in model-sized pixels from Pillow's "
                  "path.\n\n" + table)


if __name__ == "__main__":
    main()
