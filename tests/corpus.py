"""Test images made at test time from real photos shipped inside installed packages, plus the
awkward files real collections hold. Nothing is downloaded."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def photo_paths() -> list[Path]:
    """Real photographs found in scikit-learn, scikit-image and matplotlib."""
    import matplotlib
    import skimage
    import sklearn

    found = sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"))
    skdata = Path(skimage.__file__).parent / "data"
    found += [skdata / n for n in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg",
                                   "motorcycle_left.png", "hubble_deep_field.jpg")]
    found.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    return [p for p in found if p.exists()]


def copy_photos(folder: Path, limit: int | None = None) -> list[str]:
    """Copy real photos (as RGB JPEG/PNG, as found) into `folder`; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for path in photo_paths()[:limit]:
        shutil.copy(path, folder / path.name)
        names.append(path.name)
    return names


def base_photo(size: tuple[int, int] | None = (320, 240)) -> Image.Image:
    image = Image.open(photo_paths()[0]).convert("RGB")
    return image.resize(size) if size else image


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def oriented_pair() -> tuple[Image.Image, bytes]:
    """(upright image, JPEG of it stored sideways with EXIF orientation 6 to put it right)."""
    upright = base_photo((320, 200))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 rotates it back
    exif = Image.Exif()
    exif[0x0112] = 6
    return upright, jpeg_bytes(stored, exif=exif.tobytes())


def bomb_png() -> bytes:
    """A real decompression bomb: 15000 x 15000 pixels (225 MP) in a few hundred kB."""
    buffer = io.BytesIO()
    Image.new("1", (15000, 15000)).save(buffer, "PNG")
    return buffer.getvalue()


def sixteen_bit_png() -> bytes:
    ramp = np.linspace(0, 65535, 64 * 48, dtype=np.uint16).reshape(48, 64)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "PNG")
    return buffer.getvalue()


def palette_alpha_png() -> bytes:
    image = base_photo((96, 64)).quantize(16)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=0)
    return buffer.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 30), color) for color in ((255, 0, 0), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


# name -> True if it must become a row, False if it must become an error
def make_mixed_corpus(folder: Path) -> dict[str, bool]:
    """Real photos and every awkward case of the end-to-end issue, in nested folders."""
    expected = {name: True for name in copy_photos(folder / "photos")}
    expected = {f"photos/{k}": v for k, v in expected.items()}
    odd = folder / "odd"
    odd.mkdir()
    photo = base_photo()
    good_jpeg = jpeg_bytes(photo)
    files = {
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], False),
        "empty.jpg": (b"", False),
        "text.jpg": (b"this is not an image, only text\n" * 10, False),
        "bomb.png": (bomb_png(), False),
        "cmyk.jpg": (encode(photo.convert("CMYK"), "JPEG", quality=90), True),
        "sixteen.png": (sixteen_bit_png(), True),
        "palette_alpha.png": (palette_alpha_png(), True),
        "animated.gif": (animated_gif(), True),
        "rotated.jpg": (oriented_pair()[1], True),
        "grey.jpg": (encode(photo.convert("L"), "JPEG", quality=90), True),
        "photo.webp": (encode(photo, "WEBP"), True),
        "photo.bmp": (encode(photo, "BMP"), True),
        "photo.tiff": (encode(photo, "TIFF"), True),
        "rgba.png": (encode(photo.convert("RGBA"), "PNG"), True),
    }
    for name, (data, ok) in files.items():
        (odd / name).write_bytes(data)
        expected[f"odd/{name}"] = ok
    (folder / "notes.txt").write_text("not an image extension: never listed\n")
    return expected
