"""Output on a real S3-compatible server (moto's standalone server, s3fs): a run killed with
SIGKILL at exact instants resumes there, on this machine or another (an empty staging folder),
and equals an uninterrupted run; --incremental and --overwrite behave as for a folder."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import FAST
from s3_server import S3

import imgfeat
from imgfeat.cli import main

SETTINGS = [*(a for a in FAST if a != "--quiet"), "--dtype", "float32", "--shard-size", "4",
            "--devices", "cpu:1"]


@pytest.fixture(scope="module")
def s3():
    server = S3()
    server.bucket("out")
    yield server
    server.stop()


def run(s3, source, out, staging, faults="", *extra):
    env = {**os.environ, "IMGFEAT_TEST_FAULTS": faults, "IMGFEAT_STAGING": str(staging)}
    args = ["extract", str(source), "-o", out, "--storage-options", json.dumps(s3.options()),
            *SETTINGS, *extra]
    return subprocess.run([sys.executable, "-m", "imgfeat", *args], env=env, text=True,
                          capture_output=True, timeout=300, start_new_session=True)


def same(s3, a, b):
    left = imgfeat.open_store(a, storage_options=s3.options())
    right = imgfeat.open_store(b, storage_options=s3.options())
    assert left.keys == right.keys and left.errors == right.errors
    np.testing.assert_array_equal(np.asarray(left.features()), np.asarray(right.features()))


def test_killed_runs_resume_on_s3_and_equal_an_uninterrupted_one(s3, many, tmp_path):
    assert run(s3, many, "s3://out/ref", tmp_path / "st0").returncode == 0
    fs = s3.fs()
    assert fs.exists("out/ref/shards/shard-000009.h5")
    assert not fs.exists("out/ref/features.h5")  # only a local output has it
    out = "s3://out/killed"
    for number, faults in enumerate(["plan:3=kill", "shard:2=kill", "shard-temp:2=kill"]):
        # a machine of its own each time: nothing but the bucket carries the run over
        result = run(s3, many, out, tmp_path / f"st{number + 1}", faults)
        assert result.returncode == -9, result.stderr
    result = run(s3, many, out, tmp_path / "st-last")
    assert result.returncode == 0, result.stderr
    assert "done before" in result.stderr and "-> s3://out/killed" in result.stderr
    assert main(["verify", out, "--storage-options", json.dumps(s3.options())]) == 0
    same(s3, out, "s3://out/ref")


def test_incremental_and_overwrite_on_s3(s3, many, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(many, source)
    moved = sorted(source.rglob("*.jpg"))[-6:]
    for path in moved:
        path.rename(path.with_suffix(".later"))
    out = "s3://out/grow"
    assert run(s3, source, out, tmp_path / "a").returncode == 0
    for path in moved:
        path.with_suffix(".later").rename(path)
    assert run(s3, source, out, tmp_path / "b", "", "--incremental").returncode == 0
    store = imgfeat.open_store(out, storage_options=s3.options())
    assert len(store) == 40 and len(set(store.keys)) == 40
    refused = run(s3, source, out, tmp_path / "b", "", "--image-size", "32")
    assert refused.returncode == 2 and "already holds different features" in refused.stderr
    assert run(s3, source, out, tmp_path / "b", "", "--image-size", "32",
               "--overwrite").returncode == 0
    store = imgfeat.open_store(out, storage_options=s3.options())
    assert len(store) == 40 and store.manifest["preprocess"]["size"] == [32, 32]


def test_two_nodes_share_an_output_on_s3_through_the_bucket_alone(s3, many, tmp_path):
    out = "s3://out/nodes"
    env = {**os.environ, "IMGFEAT_TEST_FAULTS": ""}
    args = [sys.executable, "-m", "imgfeat", "extract", str(many), "-o", out,
            "--storage-options", json.dumps(s3.options()), *SETTINGS, "--num-nodes", "2"]
    nodes = [subprocess.Popen([*args, "--node-rank", str(rank)], text=True,
                              env={**env, "IMGFEAT_STAGING": str(tmp_path / f"node{rank}")},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for rank in (0, 1)]
    results = [(node.wait(timeout=300), node.stderr.read()) for node in nodes]
    assert [code for code, _ in results] == [0, 0], results
    fs = s3.fs()  # each node recorded its shards' counts in a record of its own
    assert fs.exists("out/nodes/shards/counts-node-0.json")
    assert fs.exists("out/nodes/shards/counts-node-1.json")
    assert not fs.exists("out/nodes/locks/lease-node-0.json")  # both leases released
    if not s3.fs().exists("out/ref/manifest.json"):
        assert run(s3, many, "s3://out/ref", tmp_path / "ref").returncode == 0
    same(s3, out, "s3://out/ref")
