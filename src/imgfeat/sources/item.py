"""An item: the key a user will look up, and where its bytes are (or why there are none)."""

from __future__ import annotations

import os
from dataclasses import dataclass

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .webp .gif .bmp .dib .tif .tiff .ppm .pgm .pbm .pnm "
    ".tga .ico .avif .jp2 .j2k .qoi .heic .heif".split()
)


@dataclass(frozen=True)
class Item:
    """One input: `key` names it in the store; `path` (a local path or a URL) is None when
    `error` says why. `part` says where in `path` the bytes are when they are not all of it:
    `["tar", offset, size]` for a tar member, `["parquet", column, row group, row]` for a
    table's cell. `meta` is text that travels with the row (a caption, a sample's json)."""

    key: str
    path: str | None
    error: str | None = None
    part: list | None = None
    meta: dict[str, str] | None = None

    def with_key(self, key: str) -> Item:
        return Item(key, self.path, self.error, self.part, self.meta)

    def failed(self, reason: str) -> Item:
        return Item(self.key, None, reason, None, self.meta)

    def to_json(self) -> list | dict:
        """The plan's line: the short list form of plain files, a mapping otherwise."""
        if self.part is None and self.meta is None:
            return [self.key, self.path] if self.error is None else \
                [self.key, self.path, self.error]
        return {name: value for name, value in (("key", self.key), ("path", self.path),
                ("error", self.error), ("part", self.part), ("meta", self.meta))
                if value is not None or name == "path"}

    @staticmethod
    def from_json(value: list | dict) -> Item:
        return Item(**value) if isinstance(value, dict) else Item(*value)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
