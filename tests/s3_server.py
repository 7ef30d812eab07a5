"""A real S3-compatible server for tests: moto's standalone server on 127.0.0.1 (a free
port), with s3fs as the client, and a proxy in front of it that throttles on request."""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY, SECRET = "testing", "testing"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3:
    """A running server: its endpoint, storage options, and an s3fs client."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request else
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def options(self, endpoint: str | None = None, **extra) -> dict:
        return {"key": KEY, "secret": SECRET, "client_kwargs": {
            "endpoint_url": endpoint or self.endpoint, "region_name": "us-east-1"}, **extra}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.options(), skip_instance_cache=True)

    def bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEY,
                     aws_secret_access_key=SECRET, region_name="us-east-1"
                     ).create_bucket(Bucket=name)

    def stop(self) -> None:
        self.server.stop()


class ThrottlingProxy:
    """Forwards to `target`; answers 503 SlowDown to every `every`-th GET of an object (never
    with `every=0`); `sent` counts the bytes of objects it passed on (GETs of an object),
    `paths` the paths of those GETs. With `head_delay`, each HEAD waits that long (a far
    server's latency) and `heads_peak` is the most HEADs it held at once."""

    def __init__(self, target_port: int, every: int = 3, head_delay: float = 0.0):
        self.heads = 0
        self.heads_peak = 0
        lock = threading.Lock()
        self.count = 0
        self.paths: list[str] = []
        self.throttled = 0
        self.sent = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                if self.command == "HEAD" and head_delay:
                    with lock:
                        proxy.heads += 1
                        proxy.heads_peak = max(proxy.heads_peak, proxy.heads)
                    time.sleep(head_delay)
                    with lock:
                        proxy.heads -= 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.command == "GET" and "?" not in self.path:
                    proxy.count += 1
                    proxy.paths.append(self.path)
                    if every and proxy.count % every == 0:
                        proxy.throttled += 1
                        message = (b"<Error><Code>SlowDown</Code><Message>Please reduce your "
                                   b"request rate.</Message></Error>")
                        self.send_response(503)
                        self.send_header("Content-Length", str(len(message)))
                        self.end_headers()
                        self.wfile.write(message)
                        return
                connection = http.client.HTTPConnection("127.0.0.1", target_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"127.0.0.1:{target_port}"
                connection.request(self.command, self.path, body=body, headers=headers)
                answer = connection.getresponse()
                data = answer.read()
                if self.command == "GET" and "?" not in self.path:
                    proxy.sent += len(data)
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                # A HEAD has no body: its Content-Length is the object's size, passed on.
                size = answer.getheader("Content-Length", "0") if self.command == "HEAD" \
                    else str(len(data))
                self.send_header("Content-Length", size)
                self.end_headers()
                self.wfile.write(data)
                connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
