"""A real HTTP server for tests: python's http.server on 127.0.0.1 (a free port), serving one
folder, in a thread of the test process."""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from s3_server import free_port


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # one line per request on stderr otherwise
        pass


class HTTP:
    """Serves `folder` at `self.url` until `stop`; `self.requests` counts GETs (with ranges)."""

    def __init__(self, folder: Path):
        self.requests = 0
        server = self

        class Handler(_Quiet):
            def do_GET(self):
                server.requests += 1
                super().do_GET()

        self.port = free_port()
        handler = functools.partial(Handler, directory=str(folder))
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
