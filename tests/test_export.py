"""Exports and verification: what other tools read must equal what the store holds."""

import shutil

import h5py
import numpy as np
import pytest
from conftest import FAST

import imgfeat
from imgfeat.cli import main


@pytest.fixture(scope="module")
def store_dir(mixed_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "store"
    assert main(["extract", str(mixed_corpus[0]), "-o", str(out), *FAST, "--shard-size", "5",
                 "--devices", "cpu:1"]) == 0
    return out


@pytest.fixture(scope="module")
def truth(store_dir):
    store = imgfeat.open_store(store_dir)
    return store.keys, np.asarray(store.features()).astype(np.float32)


def test_iter_batches_returns_everything_once_in_order(store_dir, truth):
    store = imgfeat.open_store(store_dir)
    batches = list(store.iter_batches(4))
    assert [len(k) for k, _ in batches] == [4, 4, 4, 4, 3]  # across shard boundaries
    keys = [k for batch, _ in batches for k in batch]
    assert keys == truth[0]
    np.testing.assert_array_equal(np.concatenate([f for _, f in batches]), truth[1])


def test_npy_export_reads_back_with_embedding_reader(store_dir, truth, tmp_path):
    from embedding_reader import EmbeddingReader

    dest = tmp_path / "npy"
    assert main(["export", str(store_dir), "--to", "npy", str(dest), "--rows-per-file", "6",
                 "--quiet"]) == 0
    assert sorted(p.name for p in (dest / "img_emb").iterdir())[:2] == ["img_emb_0.npy",
                                                                      "img_emb_1.npy"]
    reader = EmbeddingReader(embeddings_folder=str(dest / "img_emb"),
                             metadata_folder=str(dest / "metadata"),
                             meta_columns=["image_path"], file_format="parquet_npy")
    assert reader.count == len(truth[0])
    features, keys = [], []
    for batch, meta in reader(batch_size=5, start=0, end=reader.count, show_progress=False):
        features.append(batch)
        keys += meta["image_path"].tolist()
    assert keys == truth[0]
    np.testing.assert_array_equal(np.concatenate(features), truth[1])


def test_parquet_export_reads_back_with_pyarrow_and_duckdb(store_dir, truth, tmp_path):
    import duckdb
    import pyarrow.parquet as pq

    dest = tmp_path / "pq"
    assert main(["export", str(store_dir), "--to", "parquet", str(dest), "--rows-per-file",
                 "7", "--quiet"]) == 0
    table = pq.read_table(dest)
    assert table.column("key").to_pylist() == truth[0]
    embedding = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(embedding, truth[1])
    rows = duckdb.sql(f"SELECT key, embedding FROM '{dest}/*.parquet'").fetchall()
    by_key = {key: np.asarray(vector, np.float32) for key, vector in rows}
    assert set(by_key) == set(truth[0])
    for key, row in zip(*truth):
        np.testing.assert_array_equal(by_key[key], row)


def test_h5_export_is_a_real_self_contained_copy(store_dir, truth, tmp_path, capsys):
    dest = tmp_path / "all.h5"
    assert main(["export", str(store_dir), "--to", "h5", str(dest), "--compression", "gzip"]) == 0
    assert f"exported 19 rows as h5 -> {dest}" in capsys.readouterr().err  # progress shown
    moved = tmp_path / "elsewhere.h5"
    shutil.copy(dest, moved)
    with h5py.File(moved, "r") as f:
        assert not f["features"].is_virtual and f["features"].compression == "gzip"
        np.testing.assert_array_equal(f["features"][:].astype(np.float32), truth[1])
        assert f["keys"].asstr()[:].tolist() == truth[0]
        errors = list(zip(f["errors/keys"].asstr()[:], f["errors/reasons"].asstr()[:]))
    assert errors == imgfeat.open_store(store_dir).errors


def test_export_refuses_to_replace_and_leaves_nothing_half_written(store_dir, tmp_path,
                                                                   monkeypatch):
    dest = tmp_path / "npy"
    dest.mkdir()
    result = main(["export", str(store_dir), "--to", "npy", str(dest), "--quiet"])
    assert result == 2

    def disk_full(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(np.lib.format, "open_memmap", disk_full)
    assert main(["export", str(store_dir), "--to", "npy", str(tmp_path / "fresh"),
                 "--quiet"]) == 3
    assert list(tmp_path.iterdir()) == [dest]  # no partial export, no temporary left


def test_verify_passes_on_a_good_store(store_dir, capsys):
    assert main(["verify", str(store_dir)]) == 0
    assert "ok: 19 rows, 4 errors in 5 shards" in capsys.readouterr().out


@pytest.fixture
def copy_of(store_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(store_dir, target)
    return target


def test_verify_finds_a_corrupted_shard(copy_of, capsys):
    shard = copy_of / "shards" / "shard-000001.h5"
    data = bytearray(shard.read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)  # zero the first half: header gone
    shard.write_bytes(bytes(data))
    assert main(["verify", str(copy_of)]) == 1
    assert "shard 1 (shard-000001.h5) is unreadable" in capsys.readouterr().out


def test_verify_finds_a_missing_shard(copy_of, capsys):
    (copy_of / "shards" / "shard-000002.h5").unlink()
    assert main(["verify", str(copy_of)]) == 1
    assert "shard 2 is missing" in capsys.readouterr().out


def test_verify_finds_keys_duplicated_across_shards(copy_of, capsys):
    with h5py.File(copy_of / "shards" / "shard-000000.h5", "r") as f:
        first_keys = f["keys"].asstr()[:].tolist()
    with h5py.File(copy_of / "shards" / "shard-000003.h5", "r+") as f:
        keys = f["keys"].asstr()[:].tolist()
        keys[0] = first_keys[0]
        del f["keys"]
        f.create_dataset("keys", data=keys, dtype=h5py.string_dtype())
    assert main(["verify", str(copy_of)]) == 1
    out = capsys.readouterr().out
    assert f"shard 3 (shard-000003.h5): duplicate key {first_keys[0]!r} (also in shard 0)" in out
