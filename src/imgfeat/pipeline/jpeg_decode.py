"""Colour JPEGs, most of any collection, straight to RGB arrays with simplejpeg.

simplejpeg wraps the same libjpeg-turbo as Pillow and gives the same pixels, but writes them
into an RGB array, where Pillow unpacks into its own 4-byte pixels that then cost a copy out.
With the geometry taking arrays (torch's resize kernels), an image never becomes a Pillow
image: decode + geometry ran 1.4x Pillow's rate on one core here (docs/benchmarks.md). Pillow
still reads the header (format, size, EXIF orientation), picks the DCT scale as its draft
mode does, and decodes everything that is not a colour JPEG.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

try:
    import simplejpeg
except ImportError:  # Pillow decodes every JPEG then
    simplejpeg = None

_ORIENTATION = 0x0112  # the EXIF tag


def takes(header: Image.Image) -> bool:
    """Whether this opened file is a colour JPEG that simplejpeg decodes here."""
    return simplejpeg is not None and header.format == "JPEG" and header.mode == "RGB"


def decode_jpeg(data: bytes, header: Image.Image, min_side: int | None) -> np.ndarray:
    """The upright RGB pixels, reduced by the DCT as Pillow's draft would reduce them; a
    truncated or corrupt file raises ValueError (strict), never half a picture."""
    scale = draft_scale(header.size, min_side)
    width, height = header.size
    pixels = simplejpeg.decode_jpeg(data, "RGB", min_height=-(-height // scale),
                                    min_width=-(-width // scale), strict=True)
    return upright(pixels, header.getexif().get(_ORIENTATION, 1))


def draft_scale(size: tuple[int, int], min_side: int | None) -> int:
    """1, 2, 4 or 8: the largest reduction keeping both sides >= min_side (Pillow's rule)."""
    if not min_side:
        return 1
    fits = min(size) // min_side
    return next(scale for scale in (8, 4, 2, 1) if scale <= max(fits, 1))


def upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (2-8) as Pillow's exif_transpose does."""
    turned = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
              5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
              7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}
    if orientation not in turned:
        return pixels
    return np.ascontiguousarray(turned[orientation](pixels))
