"""Real local emulators of Google Cloud Storage and Azure Blob Storage for tests: each a
server process on 127.0.0.1 (a free port), with the fsspec client a user would have (gcsfs,
adlfs) pointed at it through storage options alone."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

from s3_server import free_port

# gcsfs >= 2026 asks each bucket's layout over gRPC first; an emulator speaks only the JSON
# API, so every call would wait out a 60 s retry. gcsfs's own switch turns that off; set before
# gcsfs is imported here and inherited by the workers imgfeat spawns.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

# Azurite's fixed development account (public, the same in every Azurite).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")


def azurite_command() -> str | None:
    """Azurite's blob server: `IMGFEAT_AZURITE` (its path), else `azurite-blob` on PATH."""
    return os.environ.get("IMGFEAT_AZURITE") or shutil.which("azurite-blob")


def _wait_for(port: int, process: subprocess.Popen, log, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"server did not listen on port {port} in {seconds} s")


class _Server:
    """A server process; its output goes to a log file, read only when it fails to start."""

    def _start(self, command: list[str], log_path) -> None:
        self.log = open(log_path, "w+")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        _wait_for(self.port, self.process, self.log)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def fs(self):
        import fsspec

        return fsspec.filesystem(self.protocol, **self.options(), skip_instance_cache=True)


class GCS(_Server):
    """gcp-storage-emulator (in memory); gcsfs reaches it by `endpoint_url`, anonymously."""

    protocol = "gs"

    def __init__(self, log_path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._start([sys.executable, "-m", "gcp_storage_emulator", "start", "--host",
                     "127.0.0.1", "--port", str(self.port), "--in-memory", "--quiet"], log_path)

    def options(self) -> dict:
        return {"endpoint_url": self.endpoint, "token": "anon"}

    def bucket(self, name: str) -> None:
        self.fs().mkdir(name)


class Azurite(_Server):
    """Azurite's blob service (in memory); adlfs reaches it by the development account's
    connection string."""

    protocol = "az"

    def __init__(self, command: str, log_path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"
        # --disableTelemetry: it would call out to the internet; --skipApiVersionCheck: a newer
        # azure-storage-blob than this Azurite knows still speaks a version it serves.
        self._start([command, "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                     "--inMemoryPersistence", "--disableTelemetry", "--skipApiVersionCheck",
                     "--silent"], log_path)

    def options(self) -> dict:
        return {"connection_string": (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={self.endpoint};")}

    def bucket(self, name: str) -> None:
        self.fs().mkdir(name)
