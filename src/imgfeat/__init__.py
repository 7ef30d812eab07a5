"""imgfeat: deep features from very large image collections.

    import imgfeat
    store = imgfeat.extract(["photos/"], "out/", model="timm:resnet50")
    store = imgfeat.open_store("out/")
    len(store); store.keys; store.features(); store.errors; store["cat.jpg"]
"""

from __future__ import annotations

import os

from imgfeat.errors import ImageError, ImgfeatError, UsageError

__version__ = "0.1.0"
__all__ = ["ImageError", "ImgfeatError", "Store", "UsageError", "extract", "open_store"]


def extract(sources, out, **options):
    """Extract features of every image in `sources` into the folder `out`; see
    `imgfeat.run.ExtractOptions` for the options. Returns the opened `Store`."""
    from imgfeat.run import extract as _extract

    return _extract(sources, out, **options)


def open_store(path: str | os.PathLike, storage_options: dict | None = None):
    """Open an output folder (or an fsspec URL, s3://..., with its `storage_options`) as one
    table of keys, features and errors."""
    from imgfeat.store.reader import Store
    from imgfeat.store.remote import open_for_reading

    store = Store(open_for_reading(path, storage_options))  # shards read where they are
    store.storage_options = storage_options  # how the page reads the store's sources
    return store


def __getattr__(name: str):
    if name == "Store":
        from imgfeat.store.reader import Store

        return Store
    raise AttributeError(name)
