"""A store's items for the page: a row's recorded source, read by the pipeline's own reader
(so an item is found wherever extraction found it), and a thumbnail made from it. A request
names a row, never a path: only what the plan recorded is ever opened."""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from imgfeat.errors import ImageError
from imgfeat.pipeline.byte_reader import ByteReader
from imgfeat.pipeline.cpu_decode import decode
from imgfeat.pipeline.decode_pool import Encoded, fetch, load_pixels
from imgfeat.plan.shards import read_shard_items
from imgfeat.search.keys import keys_of
from imgfeat.sources import Item

THUMB_SIDE = 192
THUMB_MAX_PIXELS = 64_000_000  # a thumbnail is not worth decoding more


class Items:
    def __init__(self, store, storage_options: dict | None = None):
        self.store = store
        self._items = lru_cache(maxsize=8)(self._read_plan)
        # Tar members, table cells and objects are read as extraction reads them.
        self._reader = ByteReader(storage_options)

    def item(self, row: int) -> Item:
        """The recorded item of a row; IndexError for a row outside the store."""
        if not 0 <= row < len(self.store):
            raise IndexError(row)
        (key,) = keys_of(self.store, [row])
        position = int(np.searchsorted(self.store._offsets, row, side="right") - 1)
        return self._items(self.store.shards[position])[key]

    def _read_plan(self, shard: int) -> dict[str, Item]:
        return {item.key: item for item in read_shard_items(self.store.layout, shard)}

    def read(self, row: int) -> bytes:
        """The bytes of a row's image, as the decode pool reads them."""
        item = self.item(row)
        loaded = load_pixels(item, None, None, to_device=lambda _key, data: 1,
                             data=fetch(self._reader, item))
        if isinstance(loaded, Encoded):
            return loaded.data
        raise ImageError(loaded)

    def thumbnail(self, row: int, side: int = THUMB_SIDE) -> bytes:
        image = decode(self.read(row), THUMB_MAX_PIXELS, min_side=side)
        image.thumbnail((side, side), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        return buffer.getvalue()
