"""The local engine: several workers, kills at any moment, poison images, Ctrl-C, several
nodes, incremental runs. `cpu:2` stands in for two GPUs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import FAST
from corpus import base_photo, jpeg_bytes
from runs import assert_same_store, committed, make_many, shard_mtimes, wait_for, writing

import imgfeat
from imgfeat.cli import main

SHARD = ["--shard-size", "4"]


@pytest.fixture(scope="module")
def reference(many, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(["extract", str(many), "-o", str(out), *FAST, *SHARD, "--devices", "cpu:1"]) == 0
    return out


def test_one_and_two_workers_give_the_same_store_bitwise(many, reference, tmp_path):
    out = tmp_path / "two"
    assert main(["extract", str(many), "-o", str(out), *FAST, *SHARD, "--devices", "cpu:2"]) == 0
    assert_same_store(reference, out)
    assert len(imgfeat.open_store(out).keys) == 40


def start(many: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "imgfeat", "extract", str(many), "-o", str(out), *FAST,
               *SHARD, "--image-size", "160", *extra]
    return subprocess.Popen(command, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.fixture(scope="module")
def reference_160(many, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref160") / "out"
    assert main(["extract", str(many), "-o", str(out), *FAST, *SHARD, "--image-size", "160",
                 "--devices", "cpu:1"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kill_point, victim", [
    ("after-commits", "coordinator"),
    ("mid-write", "coordinator"),
    ("mid-write", "everything"),
    ("mid-write", "worker"),
])
def test_sigkill_then_rerun_finishes_exactly_once(many, reference_160, tmp_path, kill_point,
                                                  victim):
    out = tmp_path / "out"
    process = start(many, out, "--devices", "cpu:2")
    if kill_point == "after-commits":
        wait_for(lambda: committed(out) >= 3, process)
    else:
        wait_for(lambda: committed(out) >= 1 and writing(out), process)
    if victim == "coordinator":
        os.kill(process.pid, signal.SIGKILL)
    elif victim == "everything":
        os.killpg(process.pid, signal.SIGKILL)
    else:
        os.kill(_child_pids(process.pid)[0], signal.SIGKILL)
    process.wait(timeout=60)
    kept = shard_mtimes(out)
    assert kept, "nothing was committed before the kill"
    rerun = start(many, out, "--devices", "cpu:2")
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert_same_store(reference_160, out)
    after = shard_mtimes(out)
    assert {name: after[name] for name in kept} == kept  # committed shards not recomputed
    assert not [p for p in (out / "shards").iterdir() if ".tmp-" in p.name]


def _child_pids(pid: int) -> list[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return [int(c) for c in children]
        time.sleep(0.05)
    raise AssertionError("no worker process found")


def test_worker_killed_by_an_image_is_replaced_and_the_image_recorded(many, reference,
                                                                      tmp_path):
    poison = "part1/img007.jpg"
    env = {"IMGFEAT_TEST_CRASH_ON": poison}
    command = [sys.executable, "-m", "imgfeat", "extract", str(many), "-o", str(tmp_path / "o"),
               *FAST, *SHARD, "--devices", "cpu:2"]
    result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    store = imgfeat.open_store(tmp_path / "o")
    assert [key for key, _ in store.errors] == [poison]
    assert "worker process died while decoding this image (exit code 99)" in store.errors[0][1]
    ref = imgfeat.open_store(reference)
    assert store.keys == [k for k in ref.keys if k != poison]
    np.testing.assert_array_equal(np.asarray(store.features()),
                                  np.asarray(ref.features())[[k != poison for k in ref.keys]])


def test_two_nodes_into_one_folder_equal_one_run(many, reference, tmp_path):
    out = tmp_path / "shared"
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "imgfeat", "extract", str(many), "-o", str(out), *FAST, *SHARD,
         "--devices", "cpu:1", "--num-nodes", "2", "--node-rank", str(rank)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (1, 0)]
    for node in nodes:
        assert node.wait(timeout=300) == 0, node.stderr.read()
    assert_same_store(reference, out)
    assert imgfeat.open_store(out).complete
    with h5py.File(out / "features.h5", "r") as f:
        assert f["keys"].asstr()[:].tolist() == imgfeat.open_store(reference).keys


def test_one_node_alone_says_what_is_missing(many, tmp_path, capsys):
    out = tmp_path / "half"
    assert main(["extract", str(many), "-o", str(out), *FAST, *SHARD, "--devices", "cpu:1",
                 "--num-nodes", "2", "--node-rank", "0"]) == 0
    store = imgfeat.open_store(out)
    assert store.shards == [0, 2, 4, 6, 8] and store.missing_shards == [1, 3, 5, 7, 9]
    assert main(["info", str(out)]) == 0
    assert "missing    shards 1, 3, 5, 7, 9" in capsys.readouterr().out


@pytest.mark.parametrize("env, node", [
    ({}, (1, 0)),
    # sbatch on 2 nodes, no srun: one imgfeat, which must do the whole job
    ({"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"},
     (1, 0)),
    # srun --ntasks-per-node=8 on 2 nodes: task 9 of 16
    ({"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
      "SLURM_STEP_NUM_TASKS": "16"}, (16, 9)),
    ({"WORLD_SIZE": "4", "RANK": "2"}, (4, 2)),  # torchrun
])
def test_the_launchers_environment_gives_the_node(monkeypatch, env, node):
    from imgfeat.options import ExtractOptions
    from imgfeat.plan.nodes import Node

    for name in ("SLURM_NNODES", "SLURM_NODEID", "SLURM_NTASKS", "SLURM_PROCID",
                 "SLURM_STEP_NUM_TASKS", "WORLD_SIZE", "RANK", "SLURM_JOB_ID", "SLURM_STEP_ID",
                 "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    found = Node.of(ExtractOptions())
    assert (found.count, found.rank) == node
    manual = Node.of(ExtractOptions(num_nodes=2, node_rank=1))
    assert (manual.count, manual.rank) == (2, 1)
    # the nodes of one run share its id (their leases never refuse each other)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert Node.of(ExtractOptions()).run == "slurm-77.0"


def test_incremental_extracts_only_new_files(tmp_path):
    folder = make_many(tmp_path / "grow", 10)
    out = tmp_path / "out"
    args = ["extract", str(folder), "-o", str(out), *FAST, *SHARD, "--devices", "cpu:1"]
    assert main(args) == 0
    before = shard_mtimes(out)
    for i in range(3):
        (folder / "part0" / f"new{i}.jpg").write_bytes(jpeg_bytes(base_photo((90 + i, 70))))
    assert main(args) == 0  # without --incremental the recorded plan is kept as it was
    assert len(imgfeat.open_store(out)) == 10
    assert main([*args, "--incremental"]) == 0
    store = imgfeat.open_store(out)
    assert shard_mtimes(out).items() >= before.items()  # old shards untouched
    with h5py.File(out / "shards" / "shard-000003.h5", "r") as f:
        assert sorted(f["keys"].asstr()[:]) == [f"part0/new{i}.jpg" for i in range(3)]
    assert len(store) == 13 and len(set(store.keys)) == 13 and store.complete
    assert main([*args, "--incremental"]) == 0  # nothing new: nothing done
    assert len(imgfeat.open_store(out).shards) == 4


def test_out_of_memory_halves_the_batch(tmp_path, photos, monkeypatch):
    import torch

    from imgfeat.compute.build import build_extractor
    from imgfeat.options import ExtractOptions
    from imgfeat.pipeline.shard_pipeline import ShardPipeline
    from imgfeat.sources import iter_items
    from imgfeat.store.layout import Layout

    extractor = build_extractor(ExtractOptions(model="timm:resnet18", weights="random",
                                               image_size=64), "cpu")
    real = extractor.__class__.launch
    sizes = []

    def small_memory(self, batch):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, batch)

    monkeypatch.setattr(extractor.__class__, "launch", small_memory)
    worker = ShardPipeline(extractor, Layout(tmp_path), batch_size=8, threads=2, max_pixels=None)
    items = list(iter_items([str(photos)]))
    result = worker.run_shard(0, items, lambda rows, errors: None)
    worker.close()
    assert result.rows == len(items) and worker.batch_size == 2
    assert sizes[:2] == [8, 4] and max(sizes[2:]) <= 2  # halved once, then kept small


class _SlowListing:
    """A layout whose listing shows committed shards late, as NFS does: one more each look."""

    def __init__(self, views: list[set[int]]):
        self.views, self.looks = views, 0

    def committed(self) -> set[int]:
        view = self.views[min(self.looks, len(self.views) - 1)]
        self.looks += 1
        return view


def test_the_last_node_waits_for_shards_its_listing_does_not_show_yet(monkeypatch):
    from imgfeat import run
    from imgfeat.options import ExtractOptions
    from imgfeat.plan.nodes import Node
    from imgfeat.store.lease import Holder

    node = Node.of(ExtractOptions(num_nodes=2, node_rank=0))
    monkeypatch.setattr(run, "SETTLE_POLL_S", 0)
    monkeypatch.setattr(run, "live_holders", lambda layout: [])
    late = _SlowListing([{0}, {0}, {0, 1}])
    assert run._await_visible(late, 2, node) == {0, 1}  # every other node ended: it waits
    assert late.looks == 3
    monkeypatch.setattr(run, "SETTLE_S", 0)
    assert run._await_visible(_SlowListing([{0}, {0, 1}]), 2, node) == {0}  # not forever
    monkeypatch.setattr(run, "SETTLE_S", 60)
    peer = Holder("elsewhere", 1, node.run, 1, time.time())
    monkeypatch.setattr(run, "live_holders", lambda layout: [peer])
    busy = _SlowListing([{0}, {0, 1}])
    assert run._await_visible(busy, 2, node) == {0}  # the peer, still at work, finishes up
    assert busy.looks == 1
