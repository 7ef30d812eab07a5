"""A page server for tests: uvicorn on 127.0.0.1 at a free port, in a thread, stopped after."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(app):
    """The port of a running server of `app`; the server stops on leaving."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the test server did not start"
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def request(port: int, path: str, method: str = "GET", body=None, headers=None):
    """(status, body bytes) of one request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, response.read()


def form(fields: dict[str, str] | None = None, file: tuple[str, bytes] | None = None
         ) -> tuple[bytes, dict]:
    """A multipart/form-data body and its headers."""
    boundary = "imgfeat-test-boundary"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
             f"{value}\r\n".encode() for name, value in (fields or {}).items()]
    if file:
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                     f"filename=\"{file[0]}\"\r\nContent-Type: application/octet-stream"
                     "\r\n\r\n".encode() + file[1] + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
