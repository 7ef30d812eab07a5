"""End to end: the command line over real photos and broken files, and the store it makes."""

import h5py
import numpy as np
import pytest
from conftest import FAST
from corpus import oriented_pair, photo_paths
from PIL import Image

import imgfeat
from imgfeat.cli import main


@pytest.fixture(scope="module")
def mixed_run(mixed_corpus, tmp_path_factory):
    folder, expected = mixed_corpus
    out = tmp_path_factory.mktemp("out") / "store"
    code = main(["extract", str(folder), "-o", str(out), *FAST, "--dtype", "float32",
                 "--shard-size", "8"])
    return code, out, expected


def test_every_file_is_a_row_or_an_error_never_both(mixed_run):
    code, out, expected = mixed_run
    assert code == 0
    store = imgfeat.open_store(out)
    rows = set(store.keys)
    errors = {key for key, _ in store.errors}
    assert len(rows) == len(store.keys) and len(errors) == len(store.errors)  # no duplicates
    assert not rows & errors
    assert rows | errors == set(expected)
    assert rows == {k for k, ok in expected.items() if ok}
    assert store.complete and store.shards == [0, 1, 2]


def test_error_reasons_are_readable(mixed_run):
    reasons = dict(imgfeat.open_store(mixed_run[1]).errors)
    assert reasons["odd/empty.jpg"] == "empty file"
    assert "not an image" in reasons["odd/text.jpg"]
    assert "truncated" in reasons["odd/truncated.jpg"]
    assert "too large" in reasons["odd/bomb.png"]


def test_keys_are_in_plan_order_and_name_their_image(mixed_run):
    store = imgfeat.open_store(mixed_run[1])
    assert store.keys == sorted(store.keys)  # one folder walked in name order
    assert store["photos/china.jpg"].shape == (512,)
    np.testing.assert_array_equal(store["photos/china.jpg"],
                                  store.features()[store.index("photos/china.jpg")])


def test_store_reads_back_the_same_three_ways(mixed_run):
    out = mixed_run[1]
    store = imgfeat.open_store(out)
    features = np.asarray(store.features())
    assert features.shape == (len(store), 512) and features.dtype == np.float32
    with h5py.File(out / "features.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][:], features)
        assert f["keys"].asstr()[:].tolist() == store.keys
        assert list(zip(f["errors/keys"].asstr()[:], f["errors/reasons"].asstr()[:])) \
            == store.errors
    shard_rows, shard_keys = [], []
    for shard in sorted((out / "shards").glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            shard_rows.append(f["features"][:])
            shard_keys += f["keys"].asstr()[:].tolist()
    np.testing.assert_array_equal(np.concatenate(shard_rows), features)
    assert shard_keys == store.keys


def test_features_are_lazy_and_sliceable(mixed_run):
    store = imgfeat.open_store(mixed_run[1])
    features = store.features()
    full = np.asarray(features)
    np.testing.assert_array_equal(features[3:11], full[3:11])
    np.testing.assert_array_equal(features[[9, 2, 2, -1]], full[[9, 2, 2, -1]])
    np.testing.assert_array_equal(features[5, :10], full[5, :10])
    np.testing.assert_array_equal(features[:, 0], full[:, 0])


def test_exif_rotation_is_applied_in_a_run(tmp_path):
    upright, data = oriented_pair()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "rotated.jpg").write_bytes(data)
    upright.save(tmp_path / "in" / "upright.png")
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "in" / "sideways.png")
    assert main(["extract", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *FAST,
                 "--dtype", "float32", "--resize-mode", "squash"]) == 0
    store = imgfeat.open_store(tmp_path / "out")

    def cos(a, b):
        a, b = store[a], store[b]
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    assert cos("rotated.jpg", "upright.png") > 0.99
    assert cos("rotated.jpg", "upright.png") > cos("rotated.jpg", "sideways.png")


def test_python_api_matches_cli(mixed_run, tmp_path):
    folder = mixed_run[1]
    store = imgfeat.extract([str(p) for p in photo_paths()[:3]], tmp_path / "api",
                            model="timm:resnet18", weights="random", image_size=64,
                            batch_size=4, progress="none", dtype="float32")
    reference = imgfeat.open_store(folder)
    for key in store.keys:
        np.testing.assert_allclose(store[key], reference[f"photos/{key}"], atol=1e-5)


def test_rerun_recomputes_nothing(mixed_run, mixed_corpus, capsys):
    out = mixed_run[1]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert main(["extract", str(mixed_corpus[0]), "-o", str(out), *FAST, "--dtype", "float32",
                 "--shard-size", "8"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before


def test_killed_shard_is_redone_on_rerun(tmp_path, photos):
    args = ["extract", str(photos), "-o", str(tmp_path / "o"), *FAST, "--shard-size", "3"]
    assert main(args) == 0
    shard_files = sorted((tmp_path / "o" / "shards").glob("shard-*.h5"))
    kept = {p.name: p.stat().st_mtime_ns for p in shard_files[:-1]}
    first = np.asarray(imgfeat.open_store(tmp_path / "o").features())
    shard_files[-1].unlink()  # as if the run died before its last commit
    (tmp_path / "o" / "shards" / ".shard-000002.h5.tmp-dead").write_bytes(b"half")
    assert imgfeat.open_store(tmp_path / "o").missing_shards == [len(shard_files) - 1]
    assert main(args) == 0
    store = imgfeat.open_store(tmp_path / "o")
    assert store.complete
    assert {p.name: p.stat().st_mtime_ns for p in shard_files[:-1]} == kept
    np.testing.assert_array_equal(np.asarray(store.features()), first)


def test_progress_lines_when_not_a_terminal(tmp_path, photos, capsys):
    args = [a for a in FAST if a != "--quiet"]
    assert main(["extract", str(photos), "-o", str(tmp_path / "o"), *args]) == 0
    err = capsys.readouterr().err
    assert "done:" in err and "img/s" in err and "0 errors" in err


def test_quiet_prints_nothing(tmp_path, photos, capsys):
    assert main(["extract", str(photos), "-o", str(tmp_path / "o"), *FAST]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_info_groups_errors_by_reason(mixed_run, capsys):
    assert main(["info", str(mixed_run[1])]) == 0
    out = capsys.readouterr().out
    assert "timm:resnet18" in out and "pre_logits" in out and "float32" in out
    assert "empty file  (e.g. odd/empty.jpg)" in out
    assert "3 committed of 3" in out


def test_layers_lists_names_and_shapes(capsys):
    assert main(["layers", "timm:resnet18"]) == 0
    out = capsys.readouterr().out
    assert "pre_logits" in out and "layer3" in out and "256x14x14" in out

