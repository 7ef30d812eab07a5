"""One run per output URL across machines (store/object_lease.py), on a real S3-compatible
server (moto's standalone server, s3fs): a lease in the bucket names its holder and refuses a
second run from another machine (another staging folder), nodes of one run share it, a gone
holder's lease is taken over by exactly one of two machines racing for it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
from conftest import FAST
from s3_server import S3

from imgfeat.cli import main
from imgfeat.errors import UsageError
from imgfeat.store.lease import Holder, Lease
from imgfeat.store.object_lease import for_remote
from imgfeat.store.remote import open_layout

SETTINGS = [*FAST, "--dtype", "float32", "--shard-size", "2", "--devices", "cpu:1"]


@pytest.fixture(scope="module")
def s3():
    server = S3()
    server.bucket("locked")
    yield server
    server.stop()


def leases(s3, url: str, staging, monkeypatch):
    monkeypatch.setenv("IMGFEAT_STAGING", str(staging))
    layout = open_layout(url, s3.options())
    return layout, for_remote(layout.remote)


def plant(s3, url: str, rank: int, **fields) -> Holder:
    """A lease as another machine's run left it in the bucket."""
    holder = Holder(**{"host": "gpu-node-7", "pid": 4242, "run": "other-run", "node": rank,
                       "heartbeat": time.time(), **fields})
    path = f"{url.removeprefix('s3://')}/locks/lease-node-{rank}.json"
    s3.fs().pipe_file(path, json.dumps(asdict(holder)).encode())
    return holder


def test_a_live_lease_in_the_bucket_refuses_another_machine(s3, tmp_path, monkeypatch):
    url = "s3://locked/busy"
    plant(s3, url, 0)
    layout, objects = leases(s3, url, tmp_path / "here", monkeypatch)
    with pytest.raises(UsageError) as refused:
        Lease(layout, "mine", 0, objects).acquire()
    message = str(refused.value)
    assert "\n" not in message and url in message
    assert "run other-run, node 0, on gpu-node-7 pid 4242" in message


def test_nodes_of_one_run_share_the_bucket_and_overwrite_is_refused(s3, tmp_path, monkeypatch):
    url = "s3://locked/nodes"
    plant(s3, url, 1, run="slurm-9.0")
    layout, objects = leases(s3, url, tmp_path / "here", monkeypatch)
    node0 = Lease(layout, "slurm-9.0", 0, objects)
    node0.acquire()
    assert objects.names() == ["lease-node-0.json", "lease-node-1.json"]
    node0.release()
    assert objects.names() == ["lease-node-1.json"]
    with pytest.raises(UsageError, match="--overwrite would delete its files"):
        Lease(layout, "another", 0, objects).acquire(overwrite=True)
    assert objects.names() == ["lease-node-1.json"]  # a refused run holds none


def test_a_stale_lease_is_taken_over_by_one_of_two_racers(s3, tmp_path, monkeypatch, capsys):
    url = "s3://locked/stale"
    old = plant(s3, url, 0, heartbeat=0.0)
    layout, objects = leases(s3, url, tmp_path / "here", monkeypatch)
    seen, version = objects.read("lease-node-0.json")
    assert seen == old and seen.gone().startswith("its heartbeat stopped")
    mine = Holder(socket.gethostname(), os.getpid(), "a", 0, time.time())
    theirs = Holder("elsewhere", 1, "b", 0, time.time())
    # both machines read the stale lease, then both try to replace it: one write fails
    assert objects.take_over("lease-node-0.json", seen, version, theirs) is not None
    assert objects.take_over("lease-node-0.json", seen, version, mine) is None
    assert objects.read("lease-node-0.json")[0] == theirs
    plant(s3, url, 0, heartbeat=0.0)
    lease = Lease(layout, "mine", 0, objects)
    lease.acquire()
    try:
        assert f"taking over {url} from run other-run" in capsys.readouterr().err
        assert objects.read("lease-node-0.json")[0].run == "mine"
    finally:
        lease.release()
    assert objects.names() == []


def test_the_heartbeat_refreshes_the_bucket_lease_and_notices_a_takeover(s3, tmp_path,
                                                                         monkeypatch, capsys):
    from imgfeat.store import lease as lease_module

    monkeypatch.setattr(lease_module, "HEARTBEAT_S", 0.05)
    layout, objects = leases(s3, "s3://locked/beat", tmp_path / "here", monkeypatch)
    lease = Lease(layout, "mine", 0, objects)
    lease.acquire()
    try:
        first = objects.read("lease-node-0.json")[0].heartbeat
        deadline = time.time() + 10
        while objects.read("lease-node-0.json")[0].heartbeat == first \
                and time.time() < deadline:
            time.sleep(0.05)
        assert objects.read("lease-node-0.json")[0].heartbeat > first
        plant(s3, "s3://locked/beat", 0)  # another machine took it (its clock was off)
        deadline = time.time() + 10
        while lease._beat.is_alive() and time.time() < deadline:
            time.sleep(0.05)
        assert "was taken over (run other-run" in capsys.readouterr().err
    finally:
        lease.release()
    assert objects.read("lease-node-0.json")[0].run == "other-run"  # not ours to remove


def test_a_second_run_on_one_url_from_another_machine_is_refused(s3, many, tmp_path,
                                                                 monkeypatch, capsys):
    """A run on machine A (its own staging folder) is paused while it works; a run on
    machine B (another staging folder, so no local lock can see A) is refused in one line
    naming A; once A is killed, B takes its lease over and finishes."""
    url = "s3://locked/two"
    options = json.dumps(s3.options())
    args = ["extract", str(many), "-o", url, "--storage-options", options, *SETTINGS]
    env = {**os.environ, "IMGFEAT_STAGING": str(tmp_path / "machine-a"),
           "IMGFEAT_TEST_FAULTS": "shard:1=wait-shards:1000"}  # works, then waits
    first = subprocess.Popen([sys.executable, "-m", "imgfeat", *args], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    try:
        fs = s3.fs()
        deadline = time.time() + 120
        while not fs.exists("locked/two/shards/shard-000000.h5") and time.time() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.2)
            fs.invalidate_cache()
        monkeypatch.setenv("IMGFEAT_STAGING", str(tmp_path / "machine-b"))
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"on {socket.gethostname()} pid {first.pid}" in err and url in err
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert main(args) == 0  # A is gone (this host, its pid dead): B takes over
    assert "taking over s3://locked/two" in capsys.readouterr().err
    fs.invalidate_cache()
    assert not fs.exists("locked/two/locks/lease-node-0.json")  # released at the end
