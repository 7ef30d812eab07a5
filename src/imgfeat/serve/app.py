"""The page's server: routes over one store, its searcher and its duplicate groups. Every
route takes row numbers or query text, never a path; the page itself is one static file.

No `from __future__ import annotations` here: FastAPI reads the routes' annotations, whose
types are imported inside `create_app` (the `serve` extra stays optional)."""

import sys
import threading
from collections import Counter
from importlib import resources
from typing import Annotated

from imgfeat.errors import ImageError, UsageError
from imgfeat.search.deps import need
from imgfeat.search.keys import keys_of
from imgfeat.search.query import text_capable
from imgfeat.serve.items import Items
from imgfeat.serve.uploads import MAX_UPLOAD_PIXELS, TooLarge, read_limited

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
PAGE_SIZE_MAX = 500
GROUPS_SHOWN = 200
ERRORS_SHOWN = 100


class State:
    """The store and what the page computes from it, behind one lock: h5py handles and the
    model are not for concurrent use."""

    def __init__(self, store, layer: str | None, threshold: float):
        from imgfeat.search.api import Searcher

        self.store, self.threshold = store, threshold
        self.searcher = Searcher(store, layer)
        self.searcher.embedder.max_pixels = MAX_UPLOAD_PIXELS
        self.items = Items(store, getattr(store, "storage_options", None))
        self.lock = threading.Lock()
        self._groups = None

    def hits(self, hits) -> list[dict]:
        return [{"row": h.row, "key": h.key, "score": round(h.score, 4)} for h in hits]

    def groups(self):
        if self._groups is None:
            from imgfeat.search.dedup import find_groups

            self._groups = find_groups(self.searcher, self.threshold)
        return self._groups


def create_app(store, layer: str | None = None, threshold: float = 0.95):
    fastapi = need("fastapi")
    need("multipart")
    from fastapi import File, Form, HTTPException, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    state = State(store, layer, threshold)
    app = fastapi.FastAPI(title="imgfeat", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("imgfeat.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.exception_handler(UsageError)
    async def usage_error(_request, exc: UsageError):
        return JSONResponse({"detail": str(exc)},
                            status_code=413 if isinstance(exc, TooLarge) else 400)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict:
        return {"root": store.location, "rows": len(store), "model": store.model,
                "layer": state.searcher.layer, "errors": len(store.errors),
                "text": text_capable(store, state.searcher.layer), "search": state.searcher.method,
                "threshold": threshold}

    @app.get("/api/items")
    def items(offset: int = 0, limit: int = 60) -> dict:
        offset, limit = max(0, offset), max(1, min(limit, PAGE_SIZE_MAX))
        with state.lock:
            keys = keys_of(store, range(offset, min(offset + limit, len(store))))
        return {"total": len(store), "offset": offset,
                "items": [{"row": offset + i, "key": k} for i, k in enumerate(keys)]}

    @app.get("/api/thumb/{row}")
    def thumb(row: int) -> Response:
        try:
            with state.lock:
                data = state.items.thumbnail(row)
        except IndexError:
            raise HTTPException(404, f"no row {row} in this store") from None
        except (ImageError, OSError) as exc:
            raise HTTPException(404, f"cannot read row {row}: {exc}") from None
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/neighbours/{row}")
    def neighbours(row: int, k: int = 12) -> dict:
        if not 0 <= row < len(store):
            raise HTTPException(404, f"no row {row} in this store")
        with state.lock:
            (key,) = keys_of(store, [row])
            found = state.searcher.neighbours(key, max(1, min(k, 100)))
        return {"row": row, "key": key, "hits": state.hits(found)}

    @app.post("/api/search")
    async def search(file: Annotated[UploadFile | None, File()] = None,
                     text: Annotated[str, Form()] = "",
                     k: Annotated[int, Form()] = 24) -> dict:
        k = max(1, min(k, 100))
        if file is not None and file.filename:
            data = await read_limited(file)
            with state.lock:
                vectors = state.searcher.embedder.images([(file.filename, data)])
                found = state.searcher.top(vectors, k)[0]
            return {"query": file.filename, "hits": state.hits(found)}
        if text.strip():
            with state.lock:
                found = state.searcher.top(state.searcher.embedder.texts([text]), k)[0]
            return {"query": text, "hits": state.hits(found)}
        raise UsageError("drop an image or type a text")

    @app.get("/api/duplicates")
    def duplicates() -> dict:
        with state.lock:
            groups = state.groups()
            shown_rows = groups.group < GROUPS_SHOWN
            keys = keys_of(store, groups.row[shown_rows])
        shown: dict[int, list] = {}
        for group, row, similarity, key in zip(groups.group[shown_rows].tolist(),
                                               groups.row[shown_rows].tolist(),
                                               groups.similarity[shown_rows].tolist(), keys):
            shown.setdefault(group, []).append(
                {"row": row, "key": key, "score": round(similarity, 4)})
        return {"threshold": threshold, "groups": groups.count, "images": len(groups.row),
                "shown": list(shown.values())}

    @app.get("/api/errors")
    def errors() -> dict:
        errors = store.errors
        by_reason: dict[str, list[str]] = {}
        for key, reason in errors:
            by_reason.setdefault(reason.split(":")[0], []).append(key)
        counts = Counter({reason: len(keys) for reason, keys in by_reason.items()})
        detail = dict(errors[:10_000])
        return {"total": len(errors), "reasons": [
            {"reason": reason, "count": count,
             "items": [{"key": k, "detail": detail.get(k, "")}
                       for k in by_reason[reason][:ERRORS_SHOWN]]}
            for reason, count in counts.most_common()]}

    return app


def serve(out: str, host: str = "127.0.0.1", port: int = 8765, layer: str | None = None,
          threshold: float = 0.95, storage_options: dict | None = None) -> None:
    """Serve the store `out` (a folder, or a URL read with `storage_options`)."""
    uvicorn = need("uvicorn")
    from imgfeat import open_store

    if host not in LOCAL_HOSTS:
        print(f"imgfeat: warning: serving on {host}: anyone who can reach this machine on "
              f"port {port} can see the images of {out}", file=sys.stderr)
    with open_store(out, storage_options) as store:
        app = create_app(store, layer, threshold)
        print(f"imgfeat: serving {out} on http://{_url_host(host)}:{port}/ (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
