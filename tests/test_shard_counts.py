"""The store's record of shard counts (store/shard_counts.py): a reader opening a store for
the first time counts its shards from the record, not from every shard's header, on object
storage (a real S3-compatible server, counted GETs) and in a folder; a shard replaced since
is read again; a store without the record (as older versions wrote) opens as before."""

import json
import os
import shutil
from unittest import mock

import numpy as np
import pytest
from s3_server import S3, ThrottlingProxy
from tiny_store import DIM, tiny_manifest, tiny_rows

import imgfeat
from imgfeat.plan.shards import write_shard_items
from imgfeat.sources import Item
from imgfeat.store.layout import Layout
from imgfeat.store.manifest import identity_digest, write_manifest
from imgfeat.store.remote import open_layout
from imgfeat.store.shard_counts import CountsRecord
from imgfeat.store.writer import ShardWriter

SHARDS = 12


@pytest.fixture(scope="module")
def s3():
    server = S3()
    server.bucket("counts")
    yield server
    server.stop()


def write_store(root, counts: list[int], record: bool = True, seed: int = 0,
                options: dict | None = None) -> Layout:
    """Shards of `counts` rows (and an error record in every third) written by the shard
    writer to a folder or a URL, and, with `record`, node 0's record of their counts."""
    layout = open_layout(str(root), options)
    manifest = tiny_manifest(counts)
    write_manifest(layout, manifest)
    layout.plan_dir.mkdir(exist_ok=True)
    kept = CountsRecord(layout, 0)
    with mock.patch.object(os, "fsync"):
        for index, rows in enumerate(counts):
            writer = write_shard(layout, index, rows, identity_digest(manifest), seed)
            if record:
                kept.add(index, writer.entry)
    kept.flush()
    return layout


def write_shard(layout: Layout, index: int, rows: int, identity: str, seed: int = 0):
    keys = [f"s{index}/img{r}.jpg" for r in range(rows)]
    bad = [f"s{index}/bad.jpg"] if index % 3 == 0 else []
    write_shard_items(layout, index, [Item(k, "/nowhere/" + k) for k in keys + bad])
    writer = ShardWriter(layout, index, {"pooled": (DIM,)}, "float32", rows, identity=identity)
    writer.add_rows(keys, {"pooled": tiny_rows(index + seed, rows).astype(np.float32)})
    for key in bad:
        writer.add_error(key, "decode error: not an image")
    writer.commit()
    return writer


def opened_shards(monkeypatch) -> list[int]:
    """The shards whose file readers open from now on."""
    opened = []
    original = Layout.open_shard

    def counting(self, index):
        opened.append(index)
        return original(self, index)

    monkeypatch.setattr(Layout, "open_shard", counting)
    return opened


def summary(store) -> tuple:
    return len(store), store.error_count, store.overflow_rows, list(store.keys), store.errors


def test_a_folder_with_the_record_opens_without_reading_a_header(tmp_path, monkeypatch):
    counts = [3 + i % 4 for i in range(SHARDS)]
    write_store(tmp_path / "plain", counts, record=False)
    expected = summary(imgfeat.open_store(tmp_path / "plain"))  # from every header
    write_store(tmp_path / "kept", counts)
    assert (tmp_path / "kept/shards/counts-node-0.json").exists()
    opened = opened_shards(monkeypatch)
    store = imgfeat.open_store(tmp_path / "kept")
    assert (len(store), store.error_count, store.overflow_rows) == expected[:3]
    assert opened == []
    assert summary(store) == expected  # keys and errors are read from the shards, as before


def open_counted(s3, url: str, staging, monkeypatch):
    """(the store's counts, the paths of the objects GET while counting)."""
    monkeypatch.setenv("IMGFEAT_STAGING", str(staging))  # a first open: no cache here
    proxy = ThrottlingProxy(s3.port, every=0)
    try:
        options = s3.options(proxy.endpoint, skip_instance_cache=True)
        with imgfeat.open_store(url, storage_options=options) as store:
            counts = (len(store), store.error_count, store.overflow_rows)
    finally:
        proxy.stop()
    return counts, proxy.paths


def test_an_s3_store_with_the_record_opens_without_reading_a_header(s3, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("IMGFEAT_STAGING", str(tmp_path / "writer"))
    counts = [3 + i % 4 for i in range(SHARDS)]
    write_store("s3://counts/kept", counts, options=s3.options())
    expected = (sum(counts), 4, 0)
    found, paths = open_counted(s3, "s3://counts/kept", tmp_path / "first", monkeypatch)
    assert found == expected
    assert not [p for p in paths if "/shards/shard-" in p], paths
    assert [p for p in paths if "/shards/" in p] == ["/counts/kept/shards/counts-node-0.json"]

    # shard 5 replaced after the record: its stamp differs, so its header is read again
    other = write_store(tmp_path / "other", [9] * SHARDS, record=False, seed=1)
    s3.fs().put(str(other.shard_file(5)), "counts/kept/shards/shard-000005.h5")
    found, paths = open_counted(s3, "s3://counts/kept", tmp_path / "second", monkeypatch)
    assert found == (sum(counts) - counts[5] + 9, 4, 0)
    assert {p for p in paths if "/shards/shard-" in p} == {
        "/counts/kept/shards/shard-000005.h5"}


def test_an_s3_store_without_the_record_still_opens(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGFEAT_STAGING", str(tmp_path / "writer"))
    counts = [2 + i % 3 for i in range(SHARDS)]
    write_store("s3://counts/older", counts, record=False, options=s3.options())
    found, paths = open_counted(s3, "s3://counts/older", tmp_path / "cache", monkeypatch)
    assert found == (sum(counts), 4, 0)
    assert len({p for p in paths if "/shards/shard-" in p}) == SHARDS  # every header


def test_a_damaged_record_is_ignored(tmp_path):
    counts = [3] * 4
    layout = write_store(tmp_path / "out", counts)
    (layout.shards_dir / "counts-node-0.json").write_text("{not json")
    (layout.shards_dir / "counts-node-1.json").write_text(json.dumps({"shards": {"1": [0]}}))
    store = imgfeat.open_store(layout.root)
    assert (len(store), store.error_count) == (12, 2)


def test_nodes_keep_records_of_their_own_and_a_rerun_keeps_earlier_entries(tmp_path,
                                                                         monkeypatch):
    counts = [2, 3, 4, 5]
    layout = write_store(tmp_path / "out", counts, record=False)
    manifest = tiny_manifest(counts)
    shutil.rmtree(layout.shards_dir)
    for rank in (0, 1):
        for index in range(rank, len(counts), 2):  # a node's part, in two runs
            record = CountsRecord(layout, rank)
            record.add(index, write_shard(layout, index, counts[index],
                                          identity_digest(manifest)).entry)
            record.flush()
    names = sorted(p.name for p in layout.shards_dir.glob("counts-*"))
    assert names == ["counts-node-0.json", "counts-node-1.json"]
    assert sorted(json.loads((layout.shards_dir / names[1]).read_text())["shards"]) == \
        ["1", "3"]
    opened = opened_shards(monkeypatch)
    assert len(imgfeat.open_store(layout.root)) == sum(counts) and opened == []
