"""Does decoding on the GPU give what the CPU path gives? Real photos in the forms collections
hold them (native size, enlarged, grey, progressive, 4:4:4, truncated, a missing end marker,
CMYK, PNG) are extracted twice with imgfeat, `--decode cpu` and `--decode gpu`, and compared:
the same rows and the same errors (truncated files caught), and the features' cosine.
Run by bench/gpu_acceptance.py, step 2."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from corpus import source_photos
from PIL import Image

COSINE_TARGET = 0.999


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **{"quality": 90, **options})
    return buffer.getvalue()


def _forms(photo: Image.Image) -> dict[str, bytes]:
    """name suffix -> file bytes; names with 'truncated' must be errors on both paths."""
    big = photo.resize((photo.width * 3, photo.height * 3), Image.Resampling.BICUBIC)
    native, large = _jpeg(photo), _jpeg(big)
    png = io.BytesIO()
    photo.save(png, "PNG")
    return {
        "native.jpg": native,
        "large.jpg": large,
        "grey.jpg": _jpeg(photo.convert("L")),
        "progressive.jpg": _jpeg(photo, progressive=True),
        "444.jpg": _jpeg(photo, quality=95, subsampling=0),
        "truncated.jpg": large[:len(large) * 3 // 5],
        "no-end-marker.jpg": native[:-2],
        "cmyk.jpg": _jpeg(photo.convert("CMYK")),
        "photo.png": png.getvalue(),
    }


def build_folder(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for number, photo in enumerate(source_photos()):
        for suffix, data in _forms(photo).items():
            (folder / f"p{number:02d}-{suffix}").write_bytes(data)
            count += 1
    return count


def compare(cpu_out: Path, gpu_out: Path, truncated: set[str]) -> dict:
    """The two stores side by side; `truncated`: keys both must record as errors."""
    import imgfeat

    cpu, gpu = imgfeat.open_store(cpu_out), imgfeat.open_store(gpu_out)
    cpu_errors = {key for key, _ in cpu.errors}
    gpu_errors = {key for key, _ in gpu.errors}
    a = np.asarray(cpu.features(), np.float32)
    b = np.asarray(gpu.features(), np.float32)
    same_rows = cpu.keys == gpu.keys
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1) \
        if same_rows and len(a) else np.array([np.nan])
    return {
        "rows": len(gpu.keys), "errors": len(gpu_errors),
        "same rows": same_rows, "same errors": cpu_errors == gpu_errors,
        "truncated caught": truncated <= cpu_errors and truncated <= gpu_errors,
        "cosine min": float(np.min(cosine)), "cosine mean": float(np.mean(cosine)),
    }


def check(work: Path, extract: Callable[[Path, Path, str], None]) -> dict:
    """`extract(folder, out, decode)` runs imgfeat; the comparison, and whether it passes."""
    folder = work / "decode-check"
    files = build_folder(folder)
    for decode in ("cpu", "gpu"):
        extract(folder, work / f"decode-check-{decode}", decode)
    truncated = {path.name for path in folder.iterdir() if "truncated" in path.name}
    result = {"files": files, **compare(work / "decode-check-cpu", work / "decode-check-gpu",
                                        truncated)}
    result["matches"] = result["same rows"] and result["same errors"] \
        and result["truncated caught"] and result["cosine min"] >= COSINE_TARGET
    return result
