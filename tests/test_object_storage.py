"""Sources on a real S3-compatible server (moto's standalone server on 127.0.0.1, s3fs as the
client): folders, list files, tars and tables; bad buckets and credentials refused before any
work; throttling retried."""

import json

import numpy as np
import pytest
from corpus import photo_paths
from producers import RUN, hf_parquet, write_tars
from s3_server import S3, ThrottlingProxy

import imgfeat
from imgfeat.cli import main
from imgfeat.errors import UsageError
from imgfeat.sources import Item, check_sources
from imgfeat.sources.stream import SourceOptions


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A bucket holding the photos loose, as a list file, as tars and as a table."""
    server = S3()
    server.bucket("data")
    fs = server.fs()
    local = tmp_path_factory.mktemp("upload")
    paths = photo_paths()
    for path in paths:
        fs.pipe(f"data/photos/{path.name}", path.read_bytes())
    fs.pipe("data/photos/README.md", b"not an image")
    fs.pipe("data/lists/some.txt", "".join(f"../photos/{p.name}\n" for p in paths[:3]).encode()
            + b"../photos/gone.jpg\n")
    for tar in write_tars(local, [paths[:4], paths[4:]]):
        fs.put(str(tar), f"data/tars/{tar.name}")
    fs.put(str(hf_parquet(local / "table.parquet", paths)), "data/table.parquet")
    yield server
    server.stop()


def run(sources, out, options, *extra):
    return main(["extract", *sources, "-o", str(out), "--storage-options", json.dumps(options),
                 *RUN, *extra])


def test_every_source_kind_on_s3_equals_the_folder(s3, photo_reference, tmp_path, capsys):
    _, features = photo_reference
    out = tmp_path / "out"
    sources = ["s3://data/photos", "s3://data/lists/some.txt", "s3://data/tars/shard-{00..01}.tar",
               "s3://data/table.parquet"]
    assert run(sources, out, s3.options(), "--key-column", "name") == 0
    store = imgfeat.open_store(out)
    assert store.errors == [("some/../photos/gone.jpg", "cannot read file: not found")]
    paths = photo_paths()
    assert len(store) == len(paths) * 3 + 3
    stems = {p.stem: p.name for p in paths}
    for key in store.keys:
        name = key.split("/")[-1]
        np.testing.assert_array_equal(store[key], features[stems.get(name, name)])
    assert store.manifest["sources"][0] == "s3://data/photos"
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "skipped    1 files of other types" in capsys.readouterr().out


@pytest.mark.parametrize("source, message", [
    ("s3://no-such-bucket/photos", "source not found: s3://no-such-bucket/photos"),
    ("s3://data/nothing-here/", "source not found"),
    ("s3://data/tars/shard-{05..09}.tar", "matches nothing"),
])
def test_missing_bucket_prefix_or_tars_are_one_line(s3, source, message, tmp_path, capsys):
    with pytest.raises(UsageError, match=message):
        check_sources([source], SourceOptions(s3.options()))
    assert run([source], tmp_path / "o", s3.options()) == 2
    assert not (tmp_path / "o").exists()  # refused before any work


def test_the_names_of_a_pattern_are_looked_up_together(s3):
    """Ten thousand tars 50 ms away took minutes to check one by one before any work."""
    fs = s3.fs()
    for number in range(40):
        fs.pipe(f"data/many/{number:02d}.tar", b"")
    proxy = ThrottlingProxy(s3.port, every=0, head_delay=0.05)
    try:
        options = SourceOptions(s3.options(proxy.endpoint))  # a client of its own: its port
        assert check_sources(["s3://data/many/{00..39}.tar"], options)
        assert proxy.heads_peak > 1
        with pytest.raises(UsageError, match=r"names 41 files and 1 do not exist \(the first: "
                                             r"s3://data/many/40.tar\)"):
            check_sources(["s3://data/many/{00..40}.tar"], options)
    finally:
        proxy.stop()


def test_workers_make_the_run_s_file_systems_ready_with_one_request(s3):
    """A worker makes its s3fs client (half a second) while the first shard is planned, not
    when the shard's first read needs it; a failure there is left to that read."""
    from imgfeat.run import _remote_samples
    from imgfeat.store.storage import warm_up

    assert _remote_samples(["s3://data/tars/shard-{00..01}.tar", "/photos", "s3://data/photos"],
                           "s3://data/out") == ("s3://data/tars/shard-00.tar",)
    assert _remote_samples(["/photos"], "/out") == ()
    proxy = ThrottlingProxy(s3.port, every=0, head_delay=0.001)
    try:
        options = s3.options(proxy.endpoint, skip_instance_cache=True)
        warm_up(["s3://data/tars/shard-00.tar"], options)
        assert proxy.heads_peak == 1
        warm_up(["s3://no-such-bucket/x"], options)  # no error
    finally:
        proxy.stop()


def test_wrong_credentials_are_one_line_before_any_work(s3, tmp_path, monkeypatch):
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server checks keys
    options = {**s3.options(), "key": "wrong", "secret": "wrong", "skip_instance_cache": True}
    with pytest.raises(UsageError, match=r"cannot read source s3://data/photos: access denied"):
        check_sources(["s3://data/photos"], SourceOptions(options))


def test_throttling_is_retried(s3, photo_reference, tmp_path):
    _, features = photo_reference
    proxy = ThrottlingProxy(s3.port, every=3)
    try:
        options = s3.options(proxy.endpoint, skip_instance_cache=True)
        assert run(["s3://data/photos"], tmp_path / "out", options) == 0
    finally:
        proxy.stop()
    assert proxy.throttled > 0
    store = imgfeat.open_store(tmp_path / "out")
    assert not store.errors and len(store) == len(photo_paths())
    for key in store.keys:
        np.testing.assert_array_equal(store[key], features[key])


def test_tar_members_are_read_in_runs_of_ranged_gets(s3, monkeypatch):
    """A shard reads a tar on object storage in a few ranged GETs, not a second stream and
    not one GET per member; an object cut since the plan gives error records from the cut."""
    from imgfeat.pipeline import byte_reader
    from imgfeat.pipeline.byte_reader import ByteReader, runs
    from imgfeat.sources.tars import read_tar

    paths = photo_paths()
    proxy = ThrottlingProxy(s3.port, every=10 ** 9)  # counts GETs, never throttles
    try:
        options = s3.options(proxy.endpoint, skip_instance_cache=True)
        items = list(read_tar("s3://data/tars/shard-01.tar", options))
        monkeypatch.setattr(byte_reader, "RUN_BYTES", items[2].part[1] - items[0].part[1])
        grouped = list(runs(items))
        assert 1 < len(grouped) < len(items) and sum(grouped, []) == items
        before = proxy.count
        reader = ByteReader(options)
        data = [d for run in grouped for d in reader.read_run(run)]
        assert proxy.count - before == len(grouped)
        assert data == [p.read_bytes() for p in paths[4:]]
    finally:
        proxy.stop()
    fs = s3.fs()
    whole = fs.cat("data/tars/shard-01.tar")
    fs.pipe("data/tars/cut.tar", whole[:items[1].part[1] + 10])
    cut = [Item(i.key, "s3://data/tars/cut.tar", None, i.part) for i in items]
    got = [d for run in runs(cut) for d in ByteReader(s3.options()).read_run(run)]
    assert got[0] == paths[4].read_bytes()
    assert got[1] == f"tar member cut off: 10 of {items[1].part[2]} bytes"
    assert set(got[2:]) == {"cannot read tar member: OSError: [Errno 22] The requested range "
                            "is not satisfiable"}  # wholly past the end: S3's own words
