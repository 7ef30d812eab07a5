"""Where bytes live: local paths, or fsspec URLs (s3://, gs://, az://, http(s)://, hf://, ...).

fsspec does the talking; this module adds what a long run needs on top: the user's
`storage_options` applied everywhere, transient failures (timeouts, 5xx, throttling) retried
with backoff, and the failures a user can fix (no such bucket, no access) told apart from
those of one object.
"""

from __future__ import annotations

import posixpath
import re
import time
from collections.abc import Callable
from typing import TypeVar

import fsspec

T = TypeVar("T")

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
RETRIES = 5
BACKOFF_S = 0.2  # doubled after each failed try: 0.2, 0.4, 0.8, 1.6 s
# Errors worth another try: the object may be fine and the service busy or the network flaky.
_TRANSIENT_WORDS = ("timeout", "timed out", "throttl", "slowdown", "slow down", "reduce your",
                    "service unavailable", "internal error", "internalerror", "too many requests",
                    "connection reset", "connection aborted", "broken pipe", "503", "500",
                    "502", "504", "429", "requesttimeout", "server disconnected")


def is_url(source: str) -> bool:
    """Whether `source` names something fsspec reaches (a local path is not a URL)."""
    return bool(_URL.match(source)) and not source.startswith("file://")


def filesystem(url: str, storage_options: dict | None = None):
    """(file system, path within it) of a URL; fsspec caches the file system per options."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def join(base: str, name: str) -> str:
    """`name` relative to the folder URL `base` (or `name` itself when it is absolute)."""
    if is_url(name) or name.startswith("/"):
        return name
    scheme, rest = base.split("://", 1)
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, name))}"


def parent(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"


def denied(exc: BaseException) -> bool:
    """Whether the service refused the credentials: a PermissionError (s3fs, local files), or an
    HTTP 401/403 that the client raises as its own type (adlfs passes on azure-core's
    HttpResponseError, whose `status_code` says it)."""
    return isinstance(exc, PermissionError) or getattr(exc, "status_code", None) in (401, 403)


def is_transient(exc: BaseException) -> bool:
    if denied(exc) or isinstance(exc, (FileNotFoundError, IsADirectoryError,
                                       NotADirectoryError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in _TRANSIENT_WORDS)


def retrying(call: Callable[[], T], retries: int = RETRIES) -> T:
    """`call()`, tried again with backoff while it fails in a way that may pass."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as exc:
            if attempt == retries or not is_transient(exc):
                raise
            time.sleep(BACKOFF_S * 2 ** attempt)
    raise AssertionError("unreachable")


def warm_up(urls: list[str], storage_options: dict | None = None) -> None:
    """Make the client of each remote URL's file system ready (the library imported, its
    session made: half a second for s3fs) with one cheap request, so that the first real
    read does not wait for it. Best effort: a failure here is met again, and reported, by
    the read that needs the file system."""
    for url in urls:
        try:
            fs, path = filesystem(url, storage_options)
            fs.info(path)
        except Exception:  # noqa: BLE001 - see above
            pass


def listing(fs, path: str, detail: bool = True) -> list:
    """`fs.ls(path)` as the service says it now (retried), never a listing cached before:
    another process, a worker or another node, may have written there since. s3fs and gcsfs
    take `refresh=True`; adlfs ignores it and keeps its listings until `invalidate_cache`."""
    def fresh():
        fs.invalidate_cache(path)
        return fs.ls(path, detail=detail, refresh=True)
    return retrying(fresh)


def read_bytes(location: str, storage_options: dict | None = None,
               start: int | None = None, end: int | None = None) -> bytes:
    """All bytes of a local file or object, or those in [start, end)."""
    if not is_url(location):
        with open(location, "rb") as handle:
            if start is None:
                return handle.read()
            handle.seek(start)
            return handle.read(end - start)
    fs, path = filesystem(location, storage_options)
    return retrying(lambda: fs.cat_file(path, start=start, end=end))


def ranges_work(location: str) -> bool:
    """Whether ranged reads of a remote object can be trusted. Object stores honour them; an
    http(s) server may ignore the Range header (python's http.server does) and send the whole
    object, which fsspec passes on as if it were the range."""
    return is_url(location) and not location.lower().startswith(("http://", "https://"))


def open_sequential(location: str, storage_options: dict | None = None):
    """A file read front to back: local, an object read in 8 MiB blocks, or an http(s) body
    streamed by one GET (no ranges, so servers that ignore them work). Its `read(n)` may
    return fewer than n bytes before the end: see `read_fully`."""
    if not is_url(location):
        return open(location, "rb")
    fs, path = filesystem(location, storage_options)
    block = 8 << 20 if ranges_work(location) else 0
    return retrying(lambda: fs.open(path, "rb", block_size=block))


def read_fully(handle, size: int) -> bytes:
    """`size` bytes from `handle`, fewer only at its end (a streamed body's reads are short)."""
    parts, left = [], size
    while left > 0:
        part = handle.read(left)
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def is_missing(exc: BaseException) -> bool:
    """Whether a failure says that the file or object does not exist. fsspec's http client
    raises FileNotFoundError for any failed size probe, a server that is down included; a
    cause that is a connection failure (an OSError) tells that case apart."""
    cause = exc.__cause__
    return isinstance(exc, FileNotFoundError) and not (
        isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError))


def reason(exc: BaseException) -> str:
    """A short, one-line reason for a failed read, for an error record or a usage error."""
    if isinstance(exc, FileNotFoundError):
        return "not found" if is_missing(exc) else reason(exc.__cause__)
    if denied(exc):
        return "access denied (check the credentials and storage options)"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
