"""A real HTTP server for tests: python's http.server on 127.0.0.1 (a free port), serving one
folder, in a thread of the test process."""

from __future__ import annotations

import contextlib
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from s3_server import free_port


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # one line per request on stderr otherwise
        pass


class HTTP:
    """Serves `folder` at `self.url` until `stop`; `self.requests` counts GETs. A path under
    `/dropped/` is a file of `folder` whose body is cut off after 1 MiB by a closed connection."""

    def __init__(self, folder: Path):
        self.requests = 0
        server = self

        class Handler(_Quiet):
            def do_GET(self):
                server.requests += 1
                if self.path.startswith("/dropped/"):
                    return self._drop(folder / self.path[len("/dropped/"):])
                super().do_GET()

            def do_HEAD(self):  # a dropped file's size is the file's: only its body breaks
                self.path = self.path.replace("/dropped/", "/", 1)
                super().do_HEAD()

            def _drop(self, path: Path):
                """Announce the whole file, send its first MiB, close: a server that dies
                mid-body."""
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.close_connection = True
                with contextlib.suppress(ConnectionError):  # a client gone first is fine
                    self.wfile.write(body[:1 << 20])

        self.port = free_port()
        handler = functools.partial(Handler, directory=str(folder))
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
