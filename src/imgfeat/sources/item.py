"""An item: the key a user will look up, and where its bytes are (or why there are none)."""

from __future__ import annotations

import os
from dataclasses import dataclass

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .webp .gif .bmp .dib .tif .tiff .ppm .pgm .pbm .pnm "
    ".tga .ico .avif .jp2 .j2k .qoi".split()
)


@dataclass(frozen=True)
class Item:
    """One input: `key` names it in the store; `path` is None when `error` says why."""

    key: str
    path: str | None
    error: str | None = None


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
