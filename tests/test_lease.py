"""One run per output folder across hosts (issue 13): the lease names its holder, a gone
holder's lease is taken over, the nodes of one run share it, --overwrite is refused while
another run works; and shards record the identity of their features, so a store replaced under
a run never receives that run's shards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from tiny_store import make_tiny_store, tiny_manifest

import imgfeat
from imgfeat.cli import main
from imgfeat.errors import UsageError
from imgfeat.store import lease as lease_module
from imgfeat.store.layout import Layout
from imgfeat.store.lease import Holder, Lease, read_holder
from imgfeat.store.manifest import write_manifest
from imgfeat.store.writer import ShardWriter, StoreReplaced


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def plant(layout: Layout, rank: int, **fields) -> Holder:
    """A lease as another run left it."""
    holder = Holder(**{"host": socket.gethostname(), "pid": 1, "run": "other-run", "node": rank,
                       "heartbeat": time.time(), **fields})
    layout.locks_dir.mkdir(parents=True, exist_ok=True)
    (layout.locks_dir / f"lease-node-{rank}.json").write_text(json.dumps(asdict(holder)))
    return holder


def test_a_live_lease_refuses_a_second_run_and_names_its_holder(tmp_path):
    layout = Layout(tmp_path)
    plant(layout, 0, host="gpu-node-7", pid=4242)
    with pytest.raises(UsageError) as refused:
        Lease(layout, "mine", 0).acquire()
    message = str(refused.value)
    assert "\n" not in message
    assert "run other-run, node 0, on gpu-node-7 pid 4242" in message
    assert "would duplicate its work" in message


@pytest.mark.parametrize("fields, why", [
    ({"pid": None}, "its process is no longer running"),              # this host, pid dead
    ({"host": "elsewhere", "heartbeat": 0.0}, "its heartbeat stopped"),  # stale heartbeat
])
def test_a_gone_holders_lease_is_taken_over_with_a_notice(tmp_path, capsys, fields, why):
    layout = Layout(tmp_path)
    plant(layout, 0, **{**fields, "pid": fields.get("pid") or dead_pid()})
    lease = Lease(layout, "mine", 0)
    lease.acquire()
    try:
        assert f"taking over {tmp_path}" in capsys.readouterr().err
        assert read_holder(lease.path).run == "mine"
    finally:
        lease.release()
    assert not lease.path.exists()


def test_nodes_of_one_run_share_and_overwrite_is_refused_while_another_run_works(tmp_path):
    layout = Layout(tmp_path)
    plant(layout, 1, run="slurm-9.0", host="gpu-node-2")
    node0 = Lease(layout, "slurm-9.0", 0)
    node0.acquire()  # node 1 of the same run holds its lease: no refusal
    node0.release()
    with pytest.raises(UsageError, match="--overwrite would delete its files"):
        Lease(layout, "another", 0).acquire(overwrite=True)
    assert not (layout.locks_dir / "lease-node-0.json").exists()  # a refused run holds none


def test_the_heartbeat_is_refreshed_while_the_run_works(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "HEARTBEAT_S", 0.01)
    lease = Lease(Layout(tmp_path), "mine", 0)
    lease.acquire()
    try:
        first = read_holder(lease.path).heartbeat
        deadline = time.time() + 10
        while read_holder(lease.path).heartbeat == first and time.time() < deadline:
            time.sleep(0.01)
        assert read_holder(lease.path).heartbeat > first
    finally:
        lease.release()


@pytest.fixture
def missing_list(tmp_path) -> Path:
    """A list of files that do not exist: a run whose items cost nothing (all errors)."""
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"gone/img{i}.jpg\n" for i in range(6)))
    return listing


def extract_args(listing: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", str(listing), "-o", str(out), *FAST, "--shard-size", "2",
            "--devices", "cpu:1", *extra]


def test_extract_refuses_a_busy_folder_then_takes_over_a_dead_runs_lease(missing_list,
                                                                         tmp_path, capsys):
    out = tmp_path / "out"
    assert main(extract_args(missing_list, out)) == 0
    layout = Layout(out)
    for extra in ([], ["--overwrite"]):
        plant(layout, 0, host="gpu-node-7", pid=4242)
        capsys.readouterr()
        assert main(extract_args(missing_list, out, *extra)) == 2
        err = capsys.readouterr().err
        assert "another imgfeat run (run other-run, node 0, on gpu-node-7" in err
        assert len(err.strip().splitlines()) == 1
    assert len(imgfeat.open_store(out).shards) == 3  # --overwrite deleted nothing
    plant(layout, 0, pid=dead_pid())
    assert main(extract_args(missing_list, out, "--overwrite")) == 0
    assert "taking over" in capsys.readouterr().err
    assert imgfeat.open_store(out).complete
    assert not list(layout.locks_dir.glob("lease-node-*.json"))  # released at the end


def test_a_store_replaced_under_a_run_never_receives_its_shards(tmp_path):
    """The --overwrite race: run A extracts shard 0 with model M; meanwhile run B replaces the
    store with model N. A's shard must not be committed into B's store."""
    layout = make_tiny_store(tmp_path / "store", 2)
    ours = ShardWriter(layout, 5, {"pooled": (4,)}, "float32", 1,
                       identity=imgfeat.store.manifest.identity_digest(tiny_manifest([2])))
    ours.add_rows(["a.jpg"], {"pooled": np.ones((1, 4), np.float32)})
    replaced = {**tiny_manifest([2]), "model": {"spec": "tiny:other"}}
    write_manifest(layout, replaced)  # run B's --overwrite wrote its manifest
    try:
        with pytest.raises(StoreReplaced, match="replaced by a run with other features"):
            ours.commit()
    finally:
        ours.discard()
    assert not layout.shard_file(5).exists()


def test_a_shard_of_another_identity_is_refused_by_readers_and_verify(tmp_path, capsys):
    layout = make_tiny_store(tmp_path / "store", 3)
    write_manifest(layout, {**tiny_manifest([3, 2, 2]), "dtype": "float32",
                            "model": {"spec": "tiny:other"}})
    with pytest.raises(UsageError, match=r"shards 0-2 hold features of another run"):
        len(imgfeat.open_store(layout.root))
    assert main(["verify", str(layout.root)]) == 1
    assert "holds features of another run" in capsys.readouterr().out


def test_old_temporaries_of_other_hosts_are_removed_unless_their_host_is_at_work(tmp_path):
    from imgfeat.store.layout import remove_temps_of

    layout = Layout(tmp_path)
    layout.shards_dir.mkdir(parents=True)
    names = {"dead": ".shard-000001.h5.tmp-gpu-node-3-812-0a1b2c3d",
             "fresh": ".shard-000002.h5.tmp-gpu-node-3-812-1a1b2c3d",
             "busy": ".shard-000003.h5.tmp-gpu-node-4-77-2a1b2c3d"}
    for what, name in names.items():
        path = layout.shards_dir / name
        path.write_bytes(b"")
        if what != "fresh":
            os.utime(path, (time.time() - 7200, time.time() - 7200))
    remove_temps_of(layout, remote_after_s=3600, busy_hosts={"gpu-node-4"})
    assert sorted(p.name for p in layout.shards_dir.iterdir()) == sorted(
        [names["fresh"], names["busy"]])


def test_the_last_node_waits_for_shards_it_cannot_see_yet_but_not_for_working_nodes(
        tmp_path, monkeypatch):
    from imgfeat import run
    from imgfeat.plan.nodes import Node

    layout = make_tiny_store(tmp_path / "store", 4)
    aside = tmp_path / "aside.h5"
    layout.shard_file(3).rename(aside)  # node 1's shard, not visible here yet
    sleeps = []

    def sleep(seconds):  # the listing refreshes on the second look
        sleeps.append(seconds)
        if len(sleeps) == 2:
            aside.rename(layout.shard_file(3))

    monkeypatch.setattr(run.time, "sleep", sleep)
    assert run._await_visible(layout, 4, Node(2, 0, "job-5")) == {0, 1, 2, 3}
    assert len(sleeps) == 2
    layout.shard_file(3).rename(aside)
    plant(layout, 1, run="job-5", pid=os.getpid())  # node 1 is still at work: no wait
    sleeps.clear()
    assert run._await_visible(layout, 4, Node(2, 0, "job-5")) == {0, 1, 2} and not sleeps
