"""Sources on a real HTTP server (python's http.server on 127.0.0.1, fsspec's http client):
list files and tables of http URLs, a tar served over http, a 404 as an error record, and a
server that is down."""

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
from corpus import photo_paths
from http_server import HTTP
from producers import RUN, write_tars
from s3_server import free_port

import imgfeat
from imgfeat.cli import main
from imgfeat.errors import UsageError
from imgfeat.sources import check_sources, iter_items


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    """The photos loose, a tar of them (over 8 MiB, so a reader that needs ranges fails), a
    list file and a table of their URLs, served over http."""
    root = tmp_path_factory.mktemp("served")
    paths = photo_paths()
    for path in paths:
        (root / path.name).write_bytes(path.read_bytes())
    [tar] = write_tars(root, [paths])
    _pad(tar, 9 << 20)
    server = HTTP(root)
    urls = [f"{server.url}/{p.name}" for p in paths]
    (root / "photos.txt").write_text("".join(f"{p.name}\n" for p in paths))
    pd.DataFrame({"image": urls + [f"{server.url}/gone.jpg"]}).to_csv(root / "t.csv",
                                                                       index=False)
    yield server
    server.stop()


def _pad(tar, size: int) -> None:
    """Append a large non-image member, so the tar outgrows one 8 MiB block."""
    with tarfile.open(tar, "a") as archive:
        info = tarfile.TarInfo("zz-padding.bin")
        info.size = size
        archive.addfile(info, io.BytesIO(bytes(size)))


def by_name(features):
    return {name.rsplit(".", 1)[0]: value for name, value in features.items()}


def test_list_of_http_urls_equals_the_folder_and_a_404_is_an_error(http, photo_reference,
                                                                   tmp_path):
    _, features = photo_reference
    listed = tmp_path / "urls.txt"
    urls = [f"{http.url}/{p.name}" for p in photo_paths()]
    listed.write_text("\n".join([*urls, f"{http.url}/gone.jpg"]) + "\n")
    out = tmp_path / "out"
    assert main(["extract", str(listed), "-o", str(out), *RUN]) == 0
    store = imgfeat.open_store(out)
    assert store.keys == urls
    for key in store.keys:
        np.testing.assert_array_equal(store[key], features[key.rsplit("/", 1)[1]])
    assert store.errors == [(f"{http.url}/gone.jpg", "cannot read file: not found")]


def test_list_file_and_table_served_over_http(http, photo_reference, tmp_path):
    _, features = photo_reference
    out = tmp_path / "out"
    assert main(["extract", f"{http.url}/photos.txt", f"{http.url}/t.csv", "-o", str(out),
                 *RUN]) == 0
    store = imgfeat.open_store(out)
    assert len(store) == 2 * len(photo_paths())
    for key in store.keys:
        np.testing.assert_array_equal(store[key], features[key.rsplit("/", 1)[1]])
    [(key, why)] = store.errors
    assert key.endswith("/gone.jpg") and why == "cannot read file: not found"


def test_tar_served_over_http_equals_the_folder(http, photo_reference, tmp_path):
    _, features = photo_reference
    out = tmp_path / "out"
    assert main(["extract", f"{http.url}/shard-00.tar", "-o", str(out), *RUN]) == 0
    store = imgfeat.open_store(out)
    assert store.keys == [p.stem for p in photo_paths()]
    expected = by_name(features)
    for key in store.keys:
        np.testing.assert_array_equal(store[key], expected[key])
    assert store.errors == [("zz-padding", "sample has no image member (members: bin)")]
    assert store.metadata("caption")[0] == f"a photo of {store.keys[0]}"


def test_a_server_that_is_down(tmp_path):
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UsageError, match=f"cannot read source {down}/x.tar: .*"):
        check_sources([f"{down}/x.tar"])
    listed = tmp_path / "urls.txt"
    listed.write_text(f"{down}/a.jpg\n{down}/b.jpg\n")
    out = tmp_path / "out"
    assert main(["extract", str(listed), "-o", str(out), *RUN]) == 0
    store = imgfeat.open_store(out)
    assert [key for key, _ in store.errors] == [f"{down}/a.jpg", f"{down}/b.jpg"]
    for _, why in store.errors:
        assert why.startswith("cannot read file: ") and "127.0.0.1" in why, why
        assert "\n" not in why
    assert json.loads((out / "manifest.json").read_text())


def test_a_connection_dropped_mid_tar_keeps_the_samples_before(http):
    items = list(iter_items([f"{http.url}/dropped/shard-00.tar"]))
    good = [item for item in items if item.error is None]
    assert 0 < len(good) < len(photo_paths())
    assert [item.key for item in good] == [p.stem for p in photo_paths()[:len(good)]]
    [cut] = [item for item in items if item.error is not None]
    assert cut.key == photo_paths()[len(good)].stem  # the sample the cut fell in
    assert "cut off in this sample (Response payload is not completed" in cut.error
