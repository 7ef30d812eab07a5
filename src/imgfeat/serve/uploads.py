"""An image dropped on the page: read up to a size limit, decoded under a pixel limit."""

from __future__ import annotations

from imgfeat.errors import UsageError

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOAD_PIXELS = 50_000_000  # under Pillow's bomb threshold: a drop is one photo
CHUNK = 1 << 20


class TooLarge(UsageError):
    """An upload past MAX_UPLOAD_BYTES."""


async def read_limited(upload, limit: int = MAX_UPLOAD_BYTES) -> bytes:
    """The upload's bytes, refused as soon as they pass `limit`."""
    parts, size = [], 0
    while chunk := await upload.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"{upload.filename or 'the upload'} is over {limit >> 20} MB")
        parts.append(chunk)
    return b"".join(parts)
