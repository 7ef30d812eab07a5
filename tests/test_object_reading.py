"""Stores on a real S3-compatible server (moto's standalone server, s3fs) read where they are:
open_store, info, verify, export, index, search and whiten read shards from the bucket on
demand, never a download of the store; whiten writes to a URL; every run's log, done or
refused, reaches the bucket."""

import json

import numpy as np
import pytest
from conftest import FAST
from s3_server import S3, ThrottlingProxy
from tiny_store import tiny_manifest

import imgfeat
from imgfeat.cli import main
from imgfeat.compute.whitening import load
from imgfeat.plan.shards import write_shard_items
from imgfeat.sources import Item
from imgfeat.store.layout import Layout
from imgfeat.store.manifest import identity_digest, write_manifest
from imgfeat.store.writer import ShardWriter

SETTINGS = [*FAST, "--dtype", "float32", "--shard-size", "4", "--devices", "cpu:1"]
URL = "s3://feats/run"


@pytest.fixture(scope="module")
def s3():
    server = S3()
    server.bucket("feats")
    yield server
    server.stop()


@pytest.fixture(scope="module", autouse=True)
def staging(tmp_path_factory):
    """This module's staging and read caches, where the tests can look into them."""
    folder = tmp_path_factory.mktemp("staging")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMGFEAT_STAGING", str(folder))
        yield folder


@pytest.fixture(scope="module")
def runs(s3, many, tmp_path_factory):
    """The same run to a local folder and to the bucket."""
    local = tmp_path_factory.mktemp("local") / "out"
    assert main(["extract", str(many), "-o", str(local), *SETTINGS]) == 0
    assert main(["extract", str(many), "-o", URL, "--storage-options",
                 json.dumps(s3.options()), *SETTINGS]) == 0
    return local


def cli(s3, *args) -> int:
    return main([*args, "--storage-options", json.dumps(s3.options())])


def test_an_s3_store_reads_as_the_local_run_with_no_shard_on_disk(s3, runs, staging):
    local = imgfeat.open_store(runs)
    with imgfeat.open_store(URL, storage_options=s3.options()) as remote:
        assert remote.location == URL and len(remote.shards) == 10
        assert remote.keys == local.keys and remote.errors == local.errors
        np.testing.assert_array_equal(np.asarray(remote.features()),
                                      np.asarray(local.features()))
        key = local.keys[21]
        np.testing.assert_array_equal(remote[key], local[key])
    assert not list(staging.rglob("*.h5"))  # shards were read from the bucket, not fetched
    assert list(staging.glob("read-*/index/rows.sqlite"))  # the row index is kept here


def test_a_store_dropped_unclosed_frees_its_shard_files_at_once(s3, runs):
    """A Store dropped without close() frees its open shard objects by reference counting, in
    the thread that drops it. Left to the cyclic collector, they could be freed on fsspec's
    I/O thread while another thread, inside h5py, waits on that thread for bytes: each waits
    on the other, under h5py's lock, for ever (seen: a reader hung on Azurite)."""
    import gc
    import weakref

    gc.disable()  # the collector must not do the work here
    try:
        store = imgfeat.open_store(URL, storage_options=s3.options())
        for key in store.keys[::5]:
            store[key]
        assert store.errors is not None and store.features() is not None
        files = [weakref.ref(handle) for handle in store._files._open.values()]
        assert len(files) > 1
        del store
        assert [ref() for ref in files] == [None] * len(files)
    finally:
        gc.enable()


def test_a_run_records_its_shard_counts_and_a_first_open_reads_no_header(
        s3, runs, tmp_path, monkeypatch):
    """The run's record (store/shard_counts.py) is in the bucket and in the folder, and a
    reader with no cache counts rows from it: no shard's header is read."""
    assert (runs / "shards/counts-node-0.json").exists()
    assert s3.fs().exists("feats/run/shards/counts-node-0.json")
    local = imgfeat.open_store(runs)
    monkeypatch.setenv("IMGFEAT_STAGING", str(tmp_path / "cold"))
    proxy = ThrottlingProxy(s3.port, every=0)
    try:
        options = s3.options(proxy.endpoint, skip_instance_cache=True)
        with imgfeat.open_store(URL, storage_options=options) as remote:
            assert (len(remote), remote.error_count) == (len(local), local.error_count)
    finally:
        proxy.stop()
    assert not [p for p in proxy.paths if "/shards/shard-" in p], proxy.paths


def wide_store(root, shards: int, rows: int, dim: int) -> int:
    """A store of big shards written by the shard writer (no model); its size in bytes."""
    layout = Layout(root)
    manifest = {**tiny_manifest([rows] * shards), "layers": {"pooled": [dim]}}
    write_manifest(layout, manifest)
    layout.plan_dir.mkdir()
    rng = np.random.default_rng(0)
    for index in range(shards):
        keys = [f"s{index}/{r}.jpg" for r in range(rows)]
        write_shard_items(layout, index, [Item(k, "/nowhere/" + k) for k in keys])
        writer = ShardWriter(layout, index, {"pooled": (dim,)}, "float32", rows,
                             identity=identity_digest(manifest))
        writer.add_rows(keys, {"pooled": rng.normal(size=(rows, dim)).astype(np.float32)})
        writer.commit()
    return sum(layout.shard_file(i).stat().st_size for i in range(shards))


def test_reading_one_row_fetches_a_small_part_of_the_store(s3, tmp_path, monkeypatch):
    size = wide_store(tmp_path / "wide", shards=4, rows=1000, dim=1024)  # 4 x 4 MB
    s3.fs().put(str(tmp_path / "wide"), "feats/wide", recursive=True)
    monkeypatch.setenv("IMGFEAT_STAGING", str(tmp_path / "cold"))  # no cache of it here
    local = imgfeat.open_store(tmp_path / "wide")
    proxy = ThrottlingProxy(s3.port, every=0)  # counts the bytes of objects it passes on
    try:
        options = s3.options(proxy.endpoint, skip_instance_cache=True)
        with imgfeat.open_store("s3://feats/wide", storage_options=options) as remote:
            row = remote.features()[2500]  # every shard's row count, then one chunk
            np.testing.assert_array_equal(row, local.features()[2500])
            first = proxy.sent
            assert remote.keys[3999] == "s3/999.jpg"
    finally:
        proxy.stop()
    assert first < size / 4, (first, size)  # measured: 1.9 MB of 17.0 MB


# Run in its own process: without the pause it hangs for ever, holding h5py's lock.
_COLLECTION_ON_THE_IO_THREAD = """
import asyncio, gc, sys
import h5py, numpy as np, s3fs
import imgfeat

url, local, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
held = []

async def let_go():  # on fsspec's I/O thread: the file becomes young cyclic garbage
    cycle = [held.pop()]
    cycle.append(cycle)
    del cycle
    [[] for _ in range(50)]  # allocations: with a threshold of 1, a collection here

original = s3fs.core.S3File._fetch_range
def fetch(self, start, end):  # inside HDF5's read, holding h5py's lock
    if held:
        asyncio.run_coroutine_threadsafe(let_go(), self.fs.loop)
    return original(self, start, end)
s3fs.core.S3File._fetch_range = fetch  # before the shards are opened: their caches keep it

store = imgfeat.open_store(url, storage_options=options)
assert len(store) == 2000  # rows counted first: the fetches below read features
held.append(h5py.File(local, "r"))
gc.set_threshold(1, 1, 1)
print(np.asarray(store.features()).shape)
assert not held
store.close()  # before the interpreter ends: the patched read is gone by then
"""


def test_a_collection_on_fsspecs_thread_does_not_deadlock_a_read(s3, tmp_path):
    """HDF5 reads a shard holding h5py's lock and waits for fsspec's I/O thread; freeing an
    h5py object needs that lock. A cyclic collection on the I/O thread that frees one must not
    happen then (store/paused_collection.py). Deterministic: the I/O thread itself makes the
    garbage while the reader waits on it, and every allocation may start a collection."""
    import subprocess
    import sys

    import h5py

    wide_store(tmp_path / "wide", shards=2, rows=1000, dim=256)  # 1 MB each
    s3.fs().put(str(tmp_path / "wide"), "feats/gc-wide", recursive=True)
    with h5py.File(tmp_path / "other.h5", "w") as other:
        other["a"] = np.arange(3)
    script = "import json\n" + _COLLECTION_ON_THE_IO_THREAD
    options = json.dumps(s3.options(skip_instance_cache=True))
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, "s3://feats/gc-wide", str(tmp_path / "other.h5"),
             options], capture_output=True, text=True, timeout=60,
            env={**__import__("os").environ, "IMGFEAT_STAGING": str(tmp_path / "cache")})
    except subprocess.TimeoutExpired:
        pytest.fail("the read deadlocked: a collection on fsspec's thread freed an h5py object")
    assert done.returncode == 0 and done.stdout.strip() == "(2000, 256)", done.stderr


def test_info_export_index_and_search_read_an_s3_store(s3, runs, tmp_path, capsys):
    capsys.readouterr()
    assert cli(s3, "info", URL) == 0
    out = capsys.readouterr().out
    assert f"store      {URL}" in out and "features.h5" not in out
    assert cli(s3, "export", URL, "--to", "npy", str(tmp_path / "npy"), "--quiet") == 0
    exported = np.load(tmp_path / "npy" / "img_emb" / "img_emb_0.npy")
    np.testing.assert_array_equal(exported, np.asarray(imgfeat.open_store(runs).features()))
    assert cli(s3, "index", URL, "--quiet") == 0
    key = imgfeat.open_store(runs).keys[7]
    capsys.readouterr()
    assert cli(s3, "search", URL, key, "-k", "1", "--format", "json") == 0
    assert json.loads(capsys.readouterr().out)[0]["results"][0]["key"] == key


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_verify_on_s3_catches_a_damaged_shard(s3, runs, damage, capsys):
    fs = s3.fs()
    target = f"feats/damaged-{damage}"
    fs.copy("feats/run", target, recursive=True)
    url = f"s3://{target}"
    assert cli(s3, "verify", url) == 0  # read once: the row index knows the good shard
    shard = f"{target}/shards/shard-000003.h5"
    data = fs.cat_file(shard)
    fs.pipe(shard, data[: len(data) // 2] if damage == "truncated"
            else b"\0" * 4096 + data[4096:])
    capsys.readouterr()
    assert cli(s3, "verify", url) == 1
    out = capsys.readouterr().out
    assert "shard 3 (shard-000003.h5) is unreadable" in out and "1 problem(s)" in out


def test_whiten_writes_to_s3(s3, runs, capsys):
    dest = "s3://feats/whitened"
    assert cli(s3, "whiten", URL, "--dim", "8", "-o", dest, "--l2") == 0
    assert f"whitened store -> {dest}" in capsys.readouterr().out
    whitened = imgfeat.open_store(dest, storage_options=s3.options())
    source = imgfeat.open_store(runs)
    assert whitened.feature_shape == (8,) and whitened.keys == source.keys
    assert whitened.manifest["derived_from"] == URL
    whitening = load(f"{dest}/whitening.npz", s3.options())
    np.testing.assert_allclose(np.asarray(whitened.features()),
                               whitening.apply(np.asarray(source.features()), l2=True),
                               atol=1e-5)
    assert cli(s3, "verify", dest) == 0
    assert cli(s3, "whiten", URL, "--dim", "8", "-o", dest) == 2  # there already
    assert "not empty" in capsys.readouterr().err
    assert cli(s3, "whiten", URL, "--dim", "4", "-o", dest, "--overwrite") == 0
    assert imgfeat.open_store(dest, storage_options=s3.options()).feature_shape == (4,)


def test_the_run_log_reaches_the_bucket_done_or_refused(s3, runs, many):
    fs = s3.fs()
    log = fs.cat_file("feats/run/imgfeat.log").decode()
    assert "start: run" in log and f"-> {URL}" in log and "done:" in log
    assert cli(s3, "extract", str(many), "-o", URL, *SETTINGS, "--image-size", "32") == 2
    log = fs.cat_file("feats/run/imgfeat.log").decode()
    assert "done:" in log and "error:" in log and "already holds different features" in log


@pytest.mark.parametrize("argv, message", [
    (["info", "s3://feats/nothing"], "s3://feats/nothing holds no imgfeat store"),
    (["verify", "s3://no-such-bucket/feats"], "holds no imgfeat store"),
    (["whiten", URL, "--dim", "8", "-o", "s3://no-such-bucket/w"],
     "cannot write output s3://no-such-bucket/w"),
])
def test_mistakes_on_s3_are_one_line(s3, runs, argv, message, capsys):
    capsys.readouterr()
    assert cli(s3, *argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
