"""Schedulers as they start jobs (issue 13): several tasks on one machine each take their share
of its GPUs and cores; an sbatch script with no srun is one imgfeat doing the whole job."""

from __future__ import annotations

import os

import pytest
from conftest import FAST

import imgfeat
from imgfeat.cli import main
from imgfeat.engine.placement import LocalTask

GPUS = [f"cuda:{i}" for i in range(8)]


@pytest.mark.parametrize("env, task", [
    ({}, LocalTask(0, 1)),
    # srun --ntasks-per-node=8 on 2 nodes: task 3 of this node
    ({"SLURM_STEP_ID": "0", "SLURM_LOCALID": "3", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
      "SLURM_NODEID": "1"}, LocalTask(3, 8)),
    ({"SLURM_STEP_ID": "0", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "4,2",
      "SLURM_NODEID": "1"}, LocalTask(1, 2)),
    ({"SLURM_STEP_ID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "4"},
     LocalTask(0, 4)),
    ({"SLURM_LOCALID": "0"}, LocalTask(0, 1)),  # sbatch's own shell (no step): one task
    ({"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}, LocalTask(2, 4)),  # torchrun
])
def test_the_local_task_comes_from_the_launcher(env, task):
    assert LocalTask.of(env) == task


def test_each_task_takes_its_share_of_gpus_and_cores():
    assert LocalTask(3, 8).devices(GPUS, "auto") == ["cuda:3"]
    assert LocalTask(1, 4).devices(GPUS, "cuda") == ["cuda:1", "cuda:5"]
    assert LocalTask(5, 8).devices(GPUS[:2], "auto") == ["cuda:1"]  # fewer GPUs: shared
    assert LocalTask(5, 8).devices(["cuda:0"], "auto") == ["cuda:0"]  # --gpus-per-task
    assert LocalTask(1, 4).devices(GPUS[:2], "cuda:0,1") == GPUS[:2]  # as asked
    assert LocalTask(0, 2).devices(["cpu"], "auto") == ["cpu"]
    every = list(range(os.cpu_count() or 1))
    if len(every) >= 2:
        assert LocalTask(1, 2).cores(every) == every[len(every) // 2:len(every) // 2 * 2]
    assert LocalTask(1, 2).cores(every[:1]) == every[:1]  # bound by the launcher: kept


def test_an_sbatch_script_without_srun_extracts_everything(tmp_path, monkeypatch):
    """SLURM_NTASKS=2 and SLURM_NNODES=2 describe the allocation; the one imgfeat that
    sbatch's shell starts must do the whole job, not half of it and wait."""
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"gone/img{i}.jpg\n" for i in range(6)))
    for name, value in {"SLURM_JOB_ID": "41", "SLURM_NNODES": "2", "SLURM_NODEID": "0",
                        "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(name, value)
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_STEP_ID", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    assert main(["extract", str(listing), "-o", str(out), *FAST, "--shard-size", "2",
                 "--devices", "cpu:1"]) == 0
    store = imgfeat.open_store(out)
    assert store.complete and store.error_count == 6 and (out / "features.h5").exists()
