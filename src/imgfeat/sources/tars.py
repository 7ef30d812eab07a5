"""Webdataset tar shards: one item per sample, read in one sequential stream, never extracted.

Members are grouped into samples as webdataset does: the sample's `__key__` is the member's
path up to the first dot of its base name, the rest is the member's extension (`jpg`,
`txt`, `json`, ...), and consecutive members with the same key form one sample. The item
records where its image member's bytes are in the (uncompressed) tar, so a worker reads them
without walking the tar again (`pipeline/byte_reader.py`); `txt` travels as `caption` and
`json` as `json`. A tar cut off mid-way keeps the samples before the cut: one cut inside a
member records that member's sample as an error; one cut at a header (where nothing says what
followed) records the tar itself as an error; a stream that breaks (a server that drops the
connection) is a cut like any other. A file that is not a tar is one error record.
"""

from __future__ import annotations

import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from imgfeat.sources.item import IMAGE_EXTENSIONS, Item
from imgfeat.store import storage

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Which member is the image when a sample has several: webdataset's usual names first.
_PREFERRED = ("jpg", "jpeg", "png", "webp")
IMAGE_MEMBERS = _PREFERRED + tuple(sorted(e[1:] for e in IMAGE_EXTENSIONS
                                          if e[1:] not in _PREFERRED))
TEXT_MEMBERS = {"txt": "caption", "json": "json"}
_MAX_TEXT = 1 << 20  # captions and json longer than this are not metadata
_END_BLOCKS = 1024   # a complete tar ends with two zero blocks of 512 bytes
_BROKEN = (tarfile.ReadError, EOFError, OSError, zlib.error)
# A read of the stream that fails in any way: a remote body can also break with its client's
# own errors (aiohttp's ClientPayloadError when a server drops the connection mid-body).
_STREAM_FAILED = Exception


def is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def tar_stem(name: str) -> str:
    base = posixpath.basename(name.rstrip("/"))
    for suffix in TAR_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[:-len(suffix)]
    return base


@dataclass
class _Sample:
    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # ext: (offset, size)
    meta: dict[str, str] = field(default_factory=dict)


def read_tar(location: str, storage_options: dict | None = None) -> Iterator[Item]:
    """The samples of one tar, in the tar's order."""
    name = posixpath.basename(location)
    try:
        handle = storage.open_sequential(location, storage_options)
    except Exception as exc:
        yield Item(name, None, f"cannot read tar: {storage.reason(exc)}")
        return
    with handle:
        try:
            tar = tarfile.open(fileobj=handle, mode="r|*")
        except _BROKEN as exc:
            yield Item(name, None, f"not a tar archive ({exc})")
            return
        except _STREAM_FAILED as exc:
            yield Item(name, None, f"cannot read tar: {storage.reason(exc)}")
            return
        yield from _samples(tar, location, name)




def _samples(tar: tarfile.TarFile, location: str, name: str) -> Iterator[Item]:
    sample: _Sample | None = None
    while True:
        try:
            member = tar.next()
        except _STREAM_FAILED as exc:
            yield _cut(sample, name, str(exc) or type(exc).__name__)
            return
        if member is None:
            break
        tar.members.clear()  # stream mode keeps every header otherwise: memory would grow
        parts = _key_and_ext(member)
        if parts is None:
            continue
        key, ext = parts
        if sample is None or key != sample.key:
            if sample is not None:
                yield _item(sample, location)
            sample = _Sample(key)
        try:
            _add_member(sample, ext, member, tar)
        except _STREAM_FAILED as exc:
            yield _cut(sample, name, str(exc) or type(exc).__name__)
            return
    if sample is not None:
        yield _item(sample, location)
    if not _ends_whole(tar):  # cut at a header: the samples read are whole, what followed lost
        yield Item(name, None, "tar cut off: the end-of-archive marker is missing (samples "
                               "after the cut, if any, are lost)")


def _key_and_ext(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """webdataset's split: `dir/base.ext.more` -> ('dir/base', 'ext.more'); None to skip."""
    if not member.isfile():
        return None
    folder, base = posixpath.split(member.name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return posixpath.join(folder, stem), ext.lower()


def _add_member(sample: _Sample, ext: str, member: tarfile.TarInfo, tar: tarfile.TarFile
                ) -> None:
    if ext in TEXT_MEMBERS and member.size <= _MAX_TEXT:
        data = tar.extractfile(member).read()  # the stream is there: no second pass for text
        sample.meta[TEXT_MEMBERS[ext]] = data.decode("utf-8", "replace")
    sample.members[ext] = (member.offset_data, member.size)


def _item(sample: _Sample, location: str) -> Item:
    meta = sample.meta or None
    for ext in IMAGE_MEMBERS:
        if ext in sample.members:
            offset, size = sample.members[ext]
            return Item(sample.key, location, None, ["tar", offset, size], meta)
    found = ", ".join(sorted(sample.members)) or "none"
    return Item(sample.key, None, f"sample has no image member (members: {found})", None, meta)


def _cut(sample: _Sample | None, name: str, why: str) -> Item:
    """The error record of a tar cut off inside a member: the sample it was in, or the tar
    itself."""
    if sample is None:
        return Item(name, None, f"tar cut off before its first sample ({why})")
    return Item(sample.key, None, f"tar {name} cut off in this sample ({why})")


def _ends_whole(tar: tarfile.TarFile) -> bool:
    """Whether the end-of-archive blocks are there. In stream mode tarfile takes a header cut
    short for the end of the archive; counting what is left tells a cut from an end."""
    stream = tar.fileobj
    try:
        while stream.read(1 << 16):
            pass
    except _STREAM_FAILED:
        return False
    return stream.pos >= tar.offset + _END_BLOCKS
