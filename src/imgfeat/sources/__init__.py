"""Sources enumerate items (a key and where its bytes are), streaming, in a fixed order:
folders (`folders`), list files (`lists`), and all the sources of a run together (`stream`)."""

from imgfeat.sources.item import Item, is_image_name
from imgfeat.sources.stream import check_sources, iter_items

__all__ = ["Item", "check_sources", "is_image_name", "iter_items"]
