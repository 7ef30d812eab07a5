"""Google Cloud Storage and Azure Blob Storage as they are reached in practice: real local
emulators (gcp-storage-emulator, Azurite) and the fsspec clients a user has (gcsfs, adlfs),
never mocks. A folder of JPEGs and a webdataset tar on the service, the output there too, equal
bitwise to the same JPEGs extracted from a local folder; info and verify read the store there;
a missing bucket or container, and wrong credentials, are one line. One extraction per service,
reused by every test."""

import json

import numpy as np
import pytest
from corpus import photo_paths
from gcs_azure_servers import AZURITE_KEY, GCS, Azurite, azurite_command
from producers import RUN, write_tars

import imgfeat
from imgfeat.cli import main
from imgfeat.errors import UsageError
from imgfeat.sources import check_sources
from imgfeat.sources.folders import walk_remote_folder
from imgfeat.sources.stream import SourceOptions
from imgfeat.store.remote import Remote


@pytest.fixture(scope="module")
def jpegs(photo_reference, tmp_path_factory):
    """(folder of the test photos that are JPEGs, a tar of them, their features from a local
    folder by name): what the services must give back, bitwise. The local extraction is the
    session's, shared with the other collection tests."""
    folder = tmp_path_factory.mktemp("jpegs") / "photos"
    folder.mkdir()
    for path in photo_paths():
        if path.suffix == ".jpg":
            (folder / path.name).write_bytes(path.read_bytes())
    (tar,) = write_tars(folder.parent, [sorted(folder.iterdir())])
    _, features = photo_reference
    return folder, tar, {p.name: features[p.name] for p in folder.iterdir()}


def start(kind, log_path):
    """The service's server, or a one-line skip when its emulator or client is missing."""
    if kind == "gs":
        pytest.importorskip("gcsfs", reason="gcsfs not installed (pip install gcsfs)")
        pytest.importorskip("gcp_storage_emulator",
                            reason="gcp-storage-emulator not installed (pip install it)")
        return GCS(log_path)
    pytest.importorskip("adlfs", reason="adlfs not installed (pip install adlfs)")
    command = azurite_command()
    if command is None:
        pytest.skip("Azurite not installed (npm install -g azurite, or set IMGFEAT_AZURITE)")
    return Azurite(command, log_path)


@pytest.fixture(scope="module", params=["gs", "az"])
def service(request, jpegs, tmp_path_factory):
    """A running service holding the JPEGs loose and as a tar, and a store extracted from both
    onto it: (server, the store's URL)."""
    folder, tar, _ = jpegs
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    server = start(kind, root / "server.log")
    try:
        for bucket in ("data", "out"):
            server.bucket(bucket)
        fs = server.fs()
        fs.put(f"{folder}/", "data/photos/", recursive=True)
        fs.pipe("data/photos/README.md", b"not an image")
        fs.put(str(tar), f"data/tars/{tar.name}")
        out = f"{kind}://out/feats/"
        with pytest.MonkeyPatch.context() as patch:
            # runs' staging and readers' caches here, not in ~/.cache where another test
            # session's, of a store at the same URL on another server, would be found
            patch.setenv("IMGFEAT_STAGING", str(root / "staging"))
            assert run([f"{kind}://data/photos", f"{kind}://data/tars/shard-00.tar"], out,
                       server) == 0
            yield server, out
    finally:
        server.stop()


def options(server) -> list[str]:
    return ["--storage-options", json.dumps(server.options())]


def run(sources, out, server, *extra):
    return main(["extract", *sources, "-o", out, *options(server), *RUN, *extra])


def test_folder_and_tar_on_the_service_equal_the_local_folder(service, jpegs):
    server, out = service
    _, _, features = jpegs
    store = imgfeat.open_store(out, storage_options=server.options())
    assert store.errors == []
    assert len(store) == 2 * len(features)
    for key in store.keys:
        name = key.split("/")[-1]
        np.testing.assert_array_equal(store[key], features[name if "." in name
                                                            else f"{name}.jpg"])
    assert server.fs().exists(out.split("://")[1] + "shards/shard-000000.h5")


def test_info_and_verify_read_the_store_on_the_service(service, capsys):
    server, out = service
    capsys.readouterr()
    assert main(["info", out, *options(server)]) == 0
    assert "skipped    1 files of other types" in capsys.readouterr().out
    assert main(["verify", out, *options(server)]) == 0


def test_missing_bucket_or_container_is_one_line(service, tmp_path, capsys):
    server, _ = service
    kind = server.protocol
    source = f"{kind}://no-such-bucket/photos"
    with pytest.raises(UsageError, match=f"source not found: {source}"):
        check_sources([source], SourceOptions(server.options()))
    capsys.readouterr()
    assert run([source], str(tmp_path / "o"), server) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"source not found: {source}" in error
    assert not (tmp_path / "o").exists()  # refused before any work


def test_wrong_credentials_are_one_line_before_any_work(service):
    server, _ = service
    if server.protocol == "gs":
        pytest.skip("gcp-storage-emulator accepts any credentials")
    wrong = {"connection_string": server.options()["connection_string"].replace(
        AZURITE_KEY, "A" * 86 + "==")}  # a well-formed key of another account
    with pytest.raises(UsageError, match=r"^cannot read source az://data/photos: access denied"):
        check_sources(["az://data/photos"], SourceOptions(wrong))


def test_listings_see_what_another_client_wrote_since(service):
    """Each listing asks the service: a resumed run lists its shards at its start and must
    see, at its end, those its workers (other processes: other clients) uploaded meanwhile; a
    walk in a long-lived process sees photos added since the last."""
    server, _ = service
    kind = server.protocol
    other = server.fs()  # a client of its own, as a worker process has
    remote = Remote(f"{kind}://out/listed", server.options())
    url = f"{kind}://out/listed/photos"
    for number in range(2):
        other.pipe(f"out/listed/shards/shard-00000{number}.h5", b"shard")
        other.pipe(f"out/listed/photos/{number}.jpg", b"photo")
        names = [f"shard-00000{n}.h5" for n in range(number + 1)]
        assert remote.names("shards") == names
        keys = [item.key for item in walk_remote_folder(url, server.options())]
        assert keys == [f"{n}.jpg" for n in range(number + 1)]


def test_a_reader_sees_the_store_that_replaced_another_at_its_url(service, jpegs, tmp_path,
                                                                  monkeypatch):
    """This machine's cache of a store on the service (its row index) belongs to that store:
    another written at the URL since (--overwrite, a bucket made anew), with fewer shards and
    keys in other shards, is read as it is."""
    server, out = service
    if server.protocol == "gs":
        pytest.skip("the reader's cache is the same for every service: Azure's run is faster")
    features = jpegs[2]
    monkeypatch.setenv("IMGFEAT_STAGING", str(tmp_path))
    url = "az://out/replaced"
    server.fs().copy(out.split("://")[1], "out/replaced", recursive=True)
    key, name = "shard-00/hubble_deep_field", "hubble_deep_field.jpg"
    store = imgfeat.open_store(url, storage_options=server.options())
    assert store.shards == [0, 1, 2]
    np.testing.assert_array_equal(store[key], features[name])  # in shard 2
    assert run(["az://data/photos", "az://data/tars/shard-00.tar"], url, server, "--overwrite",
               "--shard-size", "8") == 0
    store = imgfeat.open_store(url, storage_options=server.options())
    assert store.shards == [0, 1]
    np.testing.assert_array_equal(store[key], features[name])  # in shard 1
