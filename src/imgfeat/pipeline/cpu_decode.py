"""CPU decoding: bytes in, an 8-bit RGB Pillow image out, or one `ImageError` with a readable
reason; and from there the model-sized pixels (`pixels_from_bytes`).

Decoding never guesses: a truncated file is an error, not a half-grey picture, and pixel
formats with no defined 8-bit range (32-bit integer or float) are refused rather than clipped.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

from imgfeat.errors import ImageError
from imgfeat.models.preprocess import Preprocess
from imgfeat.options import DEFAULT_MAX_PIXELS
from imgfeat.pipeline import jpeg_decode
from imgfeat.report.stage_times import OFF

# Our own limit replaces Pillow's; a global warning filter would hide it from users' code.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

def _register_heif() -> bool:
    """HEIC/HEIF (phone photos) through pillow-heif, the `heif` extra, where installed."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


_HEIF = _register_heif()
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as a viewer would
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def decode(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS,
           min_side: int | None = None, as_array: bool = False) -> Image.Image | np.ndarray:
    """Decode an encoded image to RGB: first frame, EXIF orientation applied.

    With `min_side`, a JPEG at least twice that size on both sides is decoded at 1/2, 1/4
    or 1/8 scale (Pillow's draft: the DCT does the downscaling), never below `min_side`.
    With `as_array`, a colour JPEG may come as an (H, W, 3) array (see jpeg_decode).
    """
    if not data:
        raise ImageError("empty file")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        if not _HEIF and data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
            raise ImageError("HEIC/HEIF image: reading it needs pillow-heif "
                             "(pip install 'imgfeat[heif]')") from None
        raise ImageError("not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"unreadable image header: {exc}") from None
    _check_size(image, max_pixels)
    if as_array and jpeg_decode.takes(image):
        try:
            return jpeg_decode.decode_jpeg(data, image, min_side)
        except ValueError as exc:
            raise ImageError(f"corrupt or truncated image (JPEG): {exc}") from None
    if min_side and image.format == "JPEG":
        image.draft(None, (min_side, min_side))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": harmless, not ours to print
            image.seek(0)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # a copy per image otherwise
            return to_rgb(image)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageError(f"corrupt or truncated image ({image.format}): {exc}") from None


def _check_size(image: Image.Image, max_pixels: int | None) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"image too large: {width}x{height} = {width * height} pixels, "
            f"over the limit of {max_pixels} (raise it with --max-pixels)"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Turn any Pillow mode into 8-bit RGB without clipping or guessing."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        mode = "RGBA" if "transparency" in image.info else "RGB"
        image = image.convert(mode)
        if mode == "RGB":
            return image
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and image.format == "PNG"):
        # PNG decodes 16-bit grey to mode I; 65535 maps to 255.
        wide = np.asarray(image, dtype=np.uint32)
        grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in {"I", "F"}:
        raise ImageError(
            f"{'32-bit integer' if mode == 'I' else 'floating-point'} pixels "
            "have no defined 8-bit range"
        )
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def pixels_from_bytes(data: bytes, preprocess: Preprocess, max_pixels: int | None,
                      times=OFF) -> np.ndarray | str:
    """Decode and shape one encoded image on the CPU, or say why it cannot be."""
    try:
        with times.stage("decode"):
            image = decode(data, max_pixels, preprocess.draft_side,
                           as_array=preprocess.takes_arrays)
        with times.stage("preprocess"):
            return preprocess.geometry(image)
    except ImageError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read file: {exc.strerror or exc}"
    except Exception as exc:  # a decoder bug must cost one image, never the run
        return f"decoder failed: {type(exc).__name__}: {exc}"
