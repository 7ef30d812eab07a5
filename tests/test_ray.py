"""The Ray engine on a local Ray cluster started once for these tests (8 logical CPUs on
whatever cores the machine has): same store as the local engine, actors killed mid-shard,
and a driver killed mid-run."""

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import FAST
from runs import assert_same_store, committed, shard_mtimes, wait_for, writing

import imgfeat
from imgfeat.cli import main
from imgfeat.errors import UsageError

# Ray authenticates its clients with a token: share one between the test cluster and every
# driver (this process and those it starts), keeping authentication on. Set before Ray is
# imported, which reads it.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
ray = pytest.importorskip("ray")

SHARD = ["--shard-size", "4"]


def ray_command(*args: str) -> list[str]:
    executable = shutil.which("ray")
    return [executable, *args] if executable else [sys.executable, "-m", "ray.scripts.scripts",
                                                   *args]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    temp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run(
        ray_command("start", "--head", "--num-cpus", "8", "--port", "0",
                    "--include-dashboard", "false", "--temp-dir", str(temp),
                    "--disable-usage-stats"),
        capture_output=True, text=True, env=env, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    address = _address(started.stdout + started.stderr, temp)
    yield address
    if ray.is_initialized():
        ray.shutdown()
    subprocess.run(ray_command("stop", "--force"), capture_output=True, timeout=120)


def _address(output: str, temp: Path) -> str:
    for line in re.sub(r"\x1b\[[0-9;]*m", "", output).splitlines():
        if "--address=" in line:
            return line.split("--address=")[1].split()[0].strip("'\"")
    raise AssertionError(f"no address in ray start output:\n{output}")


@pytest.fixture(scope="module")
def local_store(many, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray-local") / "out"
    assert main(["extract", str(many), "-o", str(out), *FAST, *SHARD, "--devices", "cpu:2",
                 "--image-size", "96"]) == 0
    return out


def ray_args(many: Path, out: Path, address: str) -> list[str]:
    return ["extract", str(many), "-o", str(out), *FAST, *SHARD, "--image-size", "96",
            "--engine", "ray", "--ray-address", address, "--devices", "cpu:2"]


def test_ray_engine_gives_the_local_engines_store_bitwise(many, local_store, cluster,
                                                          tmp_path):
    out = tmp_path / "ray"
    assert main(ray_args(many, out, cluster)) == 0
    assert_same_store(local_store, out)
    record = json.loads((out / "shards/counts-node-0.json").read_text())["shards"]
    assert len(record) == len(imgfeat.open_store(out).shards)  # the actors' counts, recorded


def _actor_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if command.startswith(b"ray::ImgfeatWorker"):
                pids.append(int(entry.name))
    return pids


def test_actor_killed_mid_shard_is_replaced_and_output_is_exactly_once(many, local_store,
                                                                        cluster, tmp_path):
    out = tmp_path / "ray"
    result = {}
    run = threading.Thread(target=lambda: result.update(code=main(ray_args(many, out,
                                                                           cluster))))
    run.start()

    class Running:
        def poll(self):
            return None if run.is_alive() else 0

    wait_for(lambda: committed(out) >= 1 and writing(out) and _actor_pids(), Running())
    os.kill(_actor_pids()[0], signal.SIGKILL)
    run.join(timeout=600)
    assert result["code"] == 0
    assert_same_store(local_store, out)
    assert imgfeat.open_store(out).errors == []  # a killed actor blames no image


def test_driver_killed_mid_run_then_rerun_resumes(many, local_store, cluster, tmp_path):
    out = tmp_path / "ray"
    command = [sys.executable, "-m", "imgfeat", *ray_args(many, out, cluster)]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: committed(out) >= 2, driver, timeout=300)
    driver.kill()
    driver.wait(timeout=60)
    kept = shard_mtimes(out)
    assert kept and len(kept) < 10
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_store(local_store, out)
    after = shard_mtimes(out)
    assert {name: after[name] for name in kept} == kept


@pytest.mark.slow
@pytest.mark.parametrize("faults, code", [("plan:2=kill", -9), ("manifest:2=int", 130)])
def test_driver_stopped_at_an_instant_then_rerun(many, local_store, cluster, tmp_path, faults,
                                                 code):
    """Fault points (see tests/test_resume.py) in the driver: during planning, and the moment
    the plan is recorded complete."""
    out = tmp_path / "ray"
    command = [sys.executable, "-m", "imgfeat", *ray_args(many, out, cluster)]
    first = subprocess.run(command, env={**os.environ, "IMGFEAT_TEST_FAULTS": faults},
                           capture_output=True, text=True, timeout=600, start_new_session=True)
    assert first.returncode == code, first.stderr
    assert "done:" not in first.stderr and not imgfeat.open_store(out).complete
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_store(local_store, out)
    assert main(["verify", str(out)]) == 0


def test_without_ray_the_error_says_how_to_install(monkeypatch):
    from imgfeat.engine import ray_engine

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UsageError, match=r"pip install 'imgfeat\[ray\]'"):
        ray_engine.import_ray()


def test_ray_refuses_several_nodes_flags(many, tmp_path):
    with pytest.raises(UsageError, match="--num-nodes is for running without"):
        imgfeat.extract(str(many), tmp_path / "o", engine="ray", num_nodes=2, node_rank=0)



def test_float16_overflow_in_the_first_shard_stops_a_ray_run_in_one_line(many, cluster,
                                                                         tmp_path, capsys):
    out = tmp_path / "overflow"
    args = [*ray_args(many, out, cluster), "--input-scale", "1e6"]  # far beyond 65504
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dtype float32" in err, err
    assert not list((out / "shards").glob("*.h5"))
