"""A store of many shards works with few file descriptors and memory that does not grow with
its rows (issue 13): every command, and the Python API, under `ulimit -n 256`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tiny_store import make_tiny_store, tiny_rows

from imgfeat.compute.whitening import learn, learn_batches

SHARDS = 5_000
SRC = Path(__file__).resolve().parents[1] / "src"

UNDER_LIMIT = textwrap.dedent("""
    import os, resource, sys
    os.fsync = lambda fd: None  # durability is not under test: the open-file limit is
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    from imgfeat.cli import main
    from imgfeat.store.reader import Store
    out, scratch = sys.argv[1], sys.argv[2]
    with Store(out) as store:
        assert len(store) == 2 * {shards}, len(store)
        assert store.error_count == {errors}, store.error_count
        assert store.index("s4321/img1.jpg") == 2 * 4321 + 1
        assert "s4999/img0.jpg" in store and "s4999/bad.jpg" not in store
        assert store["s17/img1.jpg"].shape == (4,)
        assert sum(1 for _ in store.keys) == len(store)
        assert store.keys[-1] == "s4999/img1.jpg"
        assert sum(len(k) for k, _ in store.iter_batches(999)) == len(store)
        assert len(store.errors) == {errors} and "errors={errors}" in repr(store)
    for argv in (["info", out], ["verify", out], ["finalize", out],
                 ["export", out, "--to", "npy", scratch + "/npy", "--quiet"],
                 ["whiten", out, "--dim", "3", "-o", scratch + "/white"]):
        code = main(argv)
        assert code == 0, (argv, code)
    print("all under the limit")
""")


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many") / "store"
    make_tiny_store(root, SHARDS)
    return root


@pytest.mark.slow
def test_every_command_on_5000_shards_under_ulimit_256(many_shards, tmp_path):
    errors = len(range(0, SHARDS, 7))
    script = UNDER_LIMIT.format(shards=SHARDS, errors=errors)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", script, str(many_shards), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "all under the limit" in done.stdout
    assert f": ok: {2 * SHARDS:,} rows, {errors:,} errors in {SHARDS} shards" in done.stdout


def test_streamed_whitening_equals_whole_matrix_whitening():
    rows = np.concatenate([tiny_rows(i, 37) + 1000.0 for i in range(20)])  # far from 0
    whole = learn(rows, 3)
    streamed = learn_batches(np.array_split(rows, 9), 3)
    np.testing.assert_allclose(streamed.mean, whole.mean, rtol=1e-12)
    # eigenvectors are defined up to sign
    signs = np.sign(np.sum(streamed.projection * whole.projection, axis=1, keepdims=True))
    np.testing.assert_allclose(streamed.projection * signs, whole.projection, rtol=1e-8)
    centred = rows - whole.mean
    values, vectors = np.linalg.eigh(centred.T @ centred / (len(rows) - 1))
    top = np.argsort(values)[::-1][:3]
    np.testing.assert_allclose(np.abs(streamed.projection),
                               np.abs((vectors[:, top] / np.sqrt(values[top])).T), rtol=1e-8)


@pytest.fixture
def small(tmp_path) -> Path:
    return make_tiny_store(tmp_path / "small", 60, rows=5).root


def test_whiten_sample_learns_from_a_subset(small, tmp_path, capsys):
    from imgfeat.cli import main
    from imgfeat.store.reader import Store

    assert main(["whiten", str(small), "--dim", "3", "--sample", "40", "-o",
                 str(tmp_path / "w")]) == 0
    whitened = Store(tmp_path / "w")
    assert len(whitened) == 300 and whitened.feature_shape == (3,)
    assert main(["whiten", str(small), "--dim", "3", "--sample", "1", "-o",
                 str(tmp_path / "w1")]) == 2
    assert "--sample must be at least 2" in capsys.readouterr().err


def test_key_index_follows_a_rewritten_shard(small):
    from imgfeat.store.reader import Store
    from imgfeat.store.writer import ShardWriter

    with Store(small) as store:
        assert store.index("s3/img2.jpg") == 17 and store.error_count == 9
    layout = Store(small).layout
    writer = ShardWriter(layout, 3, {"pooled": (4,)}, "float32", 5)
    writer.add_rows(["new/a.jpg"], {"pooled": np.ones((1, 4), np.float32)})
    writer.commit()  # as a run after --overwrite would (same name, new file)
    with Store(small) as store:
        assert "s3/img2.jpg" not in store and store.index("new/a.jpg") == 15
        assert len(store) == 296 and store.keys[15] == "new/a.jpg"
        np.testing.assert_array_equal(store["new/a.jpg"], np.ones(4))


def test_a_folder_where_the_index_cannot_be_written_gets_a_private_one(small, monkeypatch):
    import sqlite3

    from imgfeat.store import row_index
    from imgfeat.store.reader import Store

    real = sqlite3.connect

    def connect(path, **kwargs):  # as on NFS without a lock daemon, or a read-only folder
        if str(path).startswith(str(small)):
            raise sqlite3.OperationalError("database is locked")
        return real(path, **kwargs)

    monkeypatch.setattr(row_index.sqlite3, "connect", connect)
    with Store(small) as store:
        assert len(store) == 300 and store.index("s59/img4.jpg") == 299
        private = Path(store._index._private.name)
    assert not private.exists() and not (small / "index" / "rows.sqlite").exists()


def test_shards_are_read_where_hdf5_cannot_lock(small, monkeypatch):
    """NFS without a lock daemon: HDF5's default open fails to lock; imgfeat reads anyway."""
    import h5py

    from imgfeat.store import shard_cache
    from imgfeat.store.reader import Store

    real = h5py.File

    def no_locks(path, mode="r", **kwargs):
        if kwargs.get("locking") is not False:
            raise OSError("Unable to synchronously open file (unable to lock file, errno = 37, "
                          "error message = 'No locks available')")
        return real(path, mode, **kwargs)

    monkeypatch.setattr(shard_cache.h5py, "File", no_locks)
    with Store(small) as store:
        assert len(store) == 300 and store.keys[-1] == "s59/img4.jpg"


def test_a_store_and_features_h5_read_side_by_side(small):
    """HDF5 refuses one file opened twice with different locking flags: a Store's shards and
    features.h5's virtual datasets (h5py's defaults) must agree."""
    import h5py

    from imgfeat.cli import main
    from imgfeat.store.reader import Store

    assert main(["finalize", str(small)]) == 0
    store = Store(small)
    assert len(store) == 300  # shards held open by the reader's cache
    with h5py.File(small / "features.h5", "r") as f:
        assert f["keys"].asstr()[:].tolist() == store.keys
    store.close()


def test_reader_memory_does_not_grow_with_rows(tmp_path):
    """Python memory of opening, counting, looking up, iterating keys and repr, for stores of
    the same shards with 10x the rows: a few bytes per row at most (one shard's keys are read
    at a time), where the old reader kept every key twice, ~300 bytes a row."""
    import tracemalloc

    from imgfeat.store.reader import Store

    def peak(root: Path, rows: int) -> int:
        tracemalloc.start()
        with Store(root) as store:
            assert store.index(f"s29/img{rows - 1}.jpg") == len(store) - 1
            assert "nope" not in store and sum(1 for _ in store.keys) == len(store)
            repr(store)
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return used

    small = peak(make_tiny_store(tmp_path / "small", 30, rows=100).root, 100)
    large = peak(make_tiny_store(tmp_path / "large", 30, rows=1000).root, 1000)
    assert (large - small) / (30 * 900) < 10, (small, large)


def test_info_says_when_features_h5_is_missing(small, capsys):
    from imgfeat.cli import main

    assert main(["info", str(small)]) == 0
    assert f"missing    features.h5: run 'imgfeat finalize {small}'" in capsys.readouterr().out
    assert main(["finalize", str(small)]) == 0 and main(["info", str(small)]) == 0
    assert "features.h5" not in capsys.readouterr().out.split("store")[-1].split("\n", 1)[1]


def test_a_store_is_read_from_several_threads(small):
    """The page's server reads one Store from a pool of threads (SQLite objects and the cache
    of open shards are shared by them)."""
    from concurrent.futures import ThreadPoolExecutor

    from imgfeat.store.reader import Store

    store = Store(small)
    keys = list(store.keys)
    store.index(keys[0])  # the index is made in this thread, used in the others

    def look(key):
        return store.index(key), store[key].tolist(), len(store)

    with ThreadPoolExecutor(4) as pool:
        seen = list(pool.map(look, keys))
    assert [row for row, _, _ in seen] == list(range(len(keys)))
    assert {n for _, _, n in seen} == {len(keys)}
