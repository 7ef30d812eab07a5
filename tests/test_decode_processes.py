"""Decoding on processes (pipeline.decode_processes), what workers with many cores use: the
same rows and errors as decode threads, a decoder that kills its process costs one image, and
no shared memory is left behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from runs import assert_same_store, make_many

import imgfeat
from imgfeat.models.preprocess import Preprocess
from imgfeat.pipeline.decode_pool import load_pixels
from imgfeat.pipeline.decode_processes import (
    DecodeProcesses,
    decoders,
    ring_bytes,
    shared_memory_free,
    use_processes,
)
from imgfeat.sources import Item

SHARD = ["--shard-size", "6"]


def _extract(source: Path, out: Path, processes: str, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "imgfeat", "extract", str(source), "-o", str(out), *FAST,
               *SHARD, "--devices", "cpu:1", "--threads", "2"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "IMGFEAT_DECODE_PROCESSES": processes, **env})


def _shared_memory() -> set[str]:
    """Shared memory segments and multiprocessing's named semaphores (the decode pool's
    queues): a worker that ends must leave none of either in /dev/shm."""
    return {name for name in os.listdir("/dev/shm") if name.startswith(("psm_", "sem.mp-"))}


@pytest.fixture(scope="module")
def threads_run(mixed_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("threads") / "o"
    result = _extract(mixed_corpus[0], out, "0")
    assert result.returncode == 0, result.stderr
    return out


def test_processes_give_the_threads_rows_and_errors(mixed_corpus, threads_run, tmp_path):
    before = _shared_memory()
    result = _extract(mixed_corpus[0], tmp_path / "o", "1")
    assert result.returncode == 0, result.stderr
    assert "leaked" not in result.stderr, result.stderr  # the ring is unlinked by its worker
    assert_same_store(tmp_path / "o", threads_run)  # bitwise, errors and reasons alike
    assert imgfeat.open_store(threads_run).errors  # the corpus's bad files are there
    assert "failed" not in (tmp_path / "o" / "imgfeat.log").read_text()  # no shard retried
    assert _shared_memory() <= before


@pytest.mark.slow
def test_a_decoder_that_kills_its_process_costs_one_image(mixed_corpus, threads_run, tmp_path):
    poison = "odd/photo.webp"
    result = _extract(mixed_corpus[0], tmp_path / "o", "1", IMGFEAT_TEST_CRASH_ON=poison)
    assert result.returncode == 0, result.stderr
    store, ref = imgfeat.open_store(tmp_path / "o"), imgfeat.open_store(threads_run)
    errors = dict(store.errors)
    assert "worker process died while decoding this image" in errors.pop(poison)
    assert errors == dict(ref.errors)
    assert store.keys == [key for key in ref.keys if key != poison]
    np.testing.assert_array_equal(np.asarray(store.features()),
                                  np.asarray(ref.features())[[k != poison for k in ref.keys]])
    # The shard was first lost with the decode process, then retried in the worker.
    assert "retried one image at a time" in (tmp_path / "o" / "imgfeat.log").read_text()


def test_the_ring_is_reused_without_mixing_images(tmp_path):
    """More items than the ring has slots, and a small look-ahead: every image arrives in
    order, equal to decoding it here."""
    paths = sorted(str(path) for path in make_many(tmp_path, 16).rglob("*.jpg")) * 3
    items = [Item(key=f"{n}", path=path) for n, path in enumerate(paths)]
    items[5] = items[5].failed("listed but unreadable")
    preprocess = Preprocess(size=(32, 32))
    decoder = DecodeProcesses(2, preprocess, None, ahead=3)
    try:
        assert len(decoder.ring) < len(items)
        for (item, pixels), expected in zip(decoder.decode((item, None) for item in items),
                                            items, strict=True):
            assert item.key == expected.key
            wanted = load_pixels(expected, preprocess, None)
            if isinstance(wanted, str):
                assert pixels == wanted
            else:
                np.testing.assert_array_equal(pixels, wanted)
    finally:
        decoder.close()


def test_threads_below_four_stay_threads(monkeypatch):
    monkeypatch.delenv("IMGFEAT_DECODE_PROCESSES", raising=False)
    assert not use_processes(2) and use_processes(16)
    monkeypatch.setenv("IMGFEAT_DECODE_PROCESSES", "0")
    assert not use_processes(16)


def _children(pid: int, marker: str = "spawn_main") -> list[int]:
    try:
        pids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(child) for child in pids if marker in _cmdline(int(child))]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:3]
    except OSError:
        return False


def _poll(condition, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.slow
def test_decoders_end_with_a_killed_worker(mixed_corpus, threads_run, tmp_path):
    command = [sys.executable, "-m", "imgfeat", "extract", str(mixed_corpus[0]), "-o",
               str(tmp_path / "o"), *FAST, *SHARD, "--devices", "cpu:1", "--threads", "2"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "IMGFEAT_DECODE_PROCESSES": "1"})
    try:
        worker = _poll(lambda: _children(run.pid))[0]
        decoders = _poll(lambda: _children(worker))  # they start with the first shard
        os.kill(worker, signal.SIGKILL)
        _poll(lambda: not any(_alive(pid) for pid in decoders), timeout=20)
        _, stderr = run.communicate(timeout=300)
    finally:
        run.kill()
    assert run.returncode == 0, stderr
    assert_same_store(tmp_path / "o", threads_run)  # the worker's shard was done again


def test_a_ring_larger_than_shared_memory_means_threads(tmp_path, monkeypatch):
    """A container's /dev/shm is 64 MiB by default: a ring that does not fit would kill the
    decoders with SIGBUS, so the worker decodes on threads and says why."""
    monkeypatch.setenv("IMGFEAT_DECODE_PROCESSES", "1")
    free = shared_memory_free()
    side = int((free or 2**40) ** 0.5)  # one slot alone is about all of it
    with pytest.warns(UserWarning, match=r"decoding on threads, not processes: shared memory"):
        assert decoders(4, Preprocess(size=(side, side)), None, ahead=8) is None
    small = decoders(2, Preprocess(size=(8, 8)), None, ahead=8)
    assert small is not None and ring_bytes(Preprocess(size=(8, 8)), 8) == 3 * 8 * 8 * 8 * 3
    small.close()
