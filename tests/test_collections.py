"""Collections as they are stored at scale: webdataset tars written by webdataset's TarWriter,
tables written by Hugging Face datasets and pandas. Every sample is one row or one error, and
features equal, bitwise, those of the same images extracted from a folder."""

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FAST
from corpus import photo_paths
from producers import RUN, hf_parquet, write_tars

import imgfeat
from imgfeat.cli import main
from imgfeat.errors import UsageError
from imgfeat.sources import check_sources, iter_items
from imgfeat.sources.stream import SourceOptions, Tally
from imgfeat.sources.tables import TableOptions


def by_stem(features):
    return {key.rsplit(".", 1)[0]: value for key, value in features.items()}


def test_tars_by_brace_pattern_equal_the_folder(photo_reference, tmp_path):
    root, features = photo_reference
    paths = photo_paths()
    write_tars(tmp_path, [paths[:4], paths[4:]])
    out = tmp_path / "out"
    assert main(["extract", str(tmp_path / "shard-{00..01}.tar"), "-o", str(out), *RUN]) == 0
    store = imgfeat.open_store(out)
    assert store.keys == [p.stem for p in paths]  # __key__, in tar order
    assert not store.errors
    expected = by_stem(features)
    for key in store.keys:
        np.testing.assert_array_equal(store[key], expected[key])
    dest = tmp_path / "npy"
    assert main(["export", str(out), "--to", "npy", str(dest), "--quiet"]) == 0
    meta = pd.read_parquet(dest / "metadata" / "metadata_0.parquet")
    assert list(meta["image_path"]) == store.keys
    assert list(meta["caption"]) == [f"a photo of {p.stem}" for p in paths]
    assert json.loads(meta["json"][0]) == {"name": paths[0].name}


def test_hostile_tars_are_error_records_and_the_rest_rows(photo_reference, tmp_path):
    root, features = photo_reference
    paths = photo_paths()[:3]
    [tgz] = write_tars(tmp_path, [paths], gz=True)
    plain = write_tars(tmp_path, [paths])[0]
    second = next(m for m in tarfile.open(plain) if m.name.startswith(paths[1].stem + "."))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(plain.read_bytes()[:second.offset_data + 100])  # the second photo cut
    (tmp_path / "fake.tar").write_bytes(b"this is not a tar" * 100)
    no_image = tmp_path / "noimage.tar"
    with tarfile.open(no_image, "w") as tar:
        for name, body in [("a.txt", b"caption only"), ("b.jpg", paths[0].read_bytes()),
                           ("c.jpg", b"not a jpeg at all")]:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    out = tmp_path / "out"
    sources = [str(p) for p in (tgz, cut, tmp_path / "fake.tar", no_image)]
    assert main(["extract", *sources, "-o", str(out), *RUN]) == 0
    store = imgfeat.open_store(out)
    errors = dict(store.errors)
    expected = by_stem(features)
    assert set(store.keys) == {f"shard-00/{p.stem}" for p in paths} | {"cut/" + paths[0].stem,
                                                                       "noimage/b"}
    expected["b"] = expected[paths[0].stem]
    for key in store.keys:
        np.testing.assert_array_equal(store[key], expected[key.split("/")[1]])
    assert "cut off in this sample" in errors["cut/" + paths[1].stem]
    assert errors["fake/fake.tar"].startswith("not a tar archive")
    assert errors["noimage/a"] == "sample has no image member (members: txt)"
    assert "not an image" in errors["noimage/c"]
    assert len(store.keys) + len(errors) == 3 + 2 + 1 + 3  # every sample once


def test_cut_between_members_is_still_a_cut(tmp_path):
    [tar] = write_tars(tmp_path, [photo_paths()[:2]])
    offsets = [m.offset for m in tarfile.open(tar)]
    whole = tar.read_bytes()
    for end in (offsets[3] + 100, offsets[-1] + 512 + 10):  # in a header; in the last data
        (tmp_path / "c.tar").write_bytes(whole[:end])
        items = list(iter_items([str(tmp_path / "c.tar")]))
        assert items[0].error is None and items[0].meta["caption"]
        assert "cut off" in items[-1].error


def test_brace_pattern_matching_nothing_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="matches nothing"):
        check_sources([str(tmp_path / "x-{0..3}.tar")])


def test_tables_by_datasets_and_pandas_equal_the_folder(photo_reference, tmp_path):
    root, features = photo_reference
    paths = photo_paths()
    hf_parquet(tmp_path / "hf.parquet", paths, null_at=2)
    hf_parquet(tmp_path / "hfpaths.parquet", paths[:3], embed=False)
    pd.DataFrame({"filepath": [f"photos/{p.name}" for p in paths],
                  "label": [p.stem.upper() for p in paths]}).to_csv(root / "t.csv", index=False)
    out = tmp_path / "hf_out"
    assert main(["extract", str(tmp_path / "hf.parquet"), str(tmp_path / "hfpaths.parquet"),
                 "-o", str(out), "--key-column", "name", "--meta-columns", "caption",
                 *RUN]) == 0
    store = imgfeat.open_store(out)
    assert dict(store.errors) == {f"hf/{paths[2].name}":
                                  "empty cell: no image bytes in column 'image'"}
    assert len(store.keys) == len(paths) - 1 + 3
    for key in store.keys:
        np.testing.assert_array_equal(store[key], features[key.split("/")[1]])
    assert store.metadata("caption")[0] == paths[0].stem
    csv_out = tmp_path / "csv_out"
    assert main(["extract", str(root / "t.csv"), "-o", str(csv_out), "--meta-columns", "label",
                 *RUN]) == 0
    store = imgfeat.open_store(csv_out)
    assert store.keys == [f"photos/{p.name}" for p in paths]
    for key in store.keys:
        np.testing.assert_array_equal(store[key], features[key.split("/")[1]])
    assert store.metadata("label") == [p.stem.upper() for p in paths]


def test_table_items_are_fixed_and_cells_checked(tmp_path):
    pd.DataFrame({"image": ["a.jpg", None, "sub/b.jpg"], "k": ["x", "y", None]}).to_parquet(
        tmp_path / "t.parquet")
    items = list(iter_items([str(tmp_path / "t.parquet")]))
    assert [(i.key, i.error) for i in items] == [
        ("a.jpg", None), ("t/1", "empty cell in column 'image'"), ("sub/b.jpg", None)]
    assert items[2].path == str(tmp_path / "sub" / "b.jpg")
    keyed = SourceOptions(table=TableOptions(key_column="k"))
    assert [i.key for i in iter_items([str(tmp_path / "t.parquet")], keyed)] == ["x", "y", "t/2"]


def test_table_without_image_column_is_one_line(tmp_path):
    pd.DataFrame({"url_x": ["a"], "caption": ["c"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(UsageError, match=r"no image column .*columns: url_x, caption"):
        check_sources([str(tmp_path / "t.csv")])
    code = main(["extract", str(tmp_path / "t.csv"), "-o", str(tmp_path / "o"), *FAST])
    assert code == 2


def test_jsonl_and_row_groups(tmp_path):
    rows = [{"path": f"{i}.jpg"} for i in range(5)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [i.key for i in iter_items([str(tmp_path / "t.jsonl")])] == [r["path"] for r in rows]
    pq.write_table(pa.table({"image": [b"x"] * 5}), tmp_path / "b.parquet", row_group_size=2)
    items = list(iter_items([str(tmp_path / "b.parquet")]))
    assert [i.part for i in items] == [["parquet", "image", g, r]
                                       for g, r in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]]
    assert [i.key for i in items] == [f"b/{n}" for n in range(5)]


def test_other_files_are_counted(tmp_path):
    for name in ("a.jpg", "notes.txt", "sub/b.png", "sub/data.bin"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    tally = Tally()
    assert len(list(iter_items([str(tmp_path)], tally=tally))) == 2
    assert tally.skipped == 2


def heic_bytes():
    import pillow_heif
    from corpus import base_photo

    pillow_heif.register_heif_opener()
    buffer = io.BytesIO()
    base_photo((96, 64)).save(buffer, format="HEIF", quality=95)
    return buffer.getvalue()


def test_heic_is_read_through_pillow_heif(tmp_path):
    from imgfeat.pipeline import cpu_decode

    image = cpu_decode.decode(heic_bytes())
    assert image.size == (96, 64) and image.mode == "RGB"


def test_heic_without_pillow_heif_is_a_clear_error(monkeypatch):
    from PIL import Image

    from imgfeat.errors import ImageError
    from imgfeat.pipeline import cpu_decode

    def unreadable(*args, **kwargs):
        raise Image.UnidentifiedImageError("no plugin")

    data = heic_bytes()
    monkeypatch.setattr(cpu_decode, "_HEIF", False)
    monkeypatch.setattr(cpu_decode.Image, "open", unreadable)
    with pytest.raises(ImageError, match=r"HEIC/HEIF image: reading it needs pillow-heif"):
        cpu_decode.decode(data)


def test_transient_failures_are_retried_and_others_are_not(monkeypatch):
    from imgfeat.store import storage

    monkeypatch.setattr(storage, "BACKOFF_S", 0.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("503 SlowDown: Please reduce your request rate")
        return b"ok"

    assert storage.retrying(flaky) == b"ok" and len(calls) == 3

    def missing():
        calls.append(1)
        raise FileNotFoundError("no such key")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.retrying(missing)
    assert len(calls) == 1
