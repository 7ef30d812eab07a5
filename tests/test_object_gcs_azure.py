"""Google Cloud Storage and Azure Blob Storage as they are reached in practice: real local
emulators (gcp-storage-emulator, Azurite) and the fsspec clients a user has (gcsfs, adlfs),
never mocks. A folder of JPEGs and a webdataset tar on the service, the output there too, equal
bitwise to the same JPEGs extracted from a local folder; info and verify read the store there;
a missing bucket or container, and wrong credentials, are one line. One extraction per service,
reused by every test."""

import json

import numpy as np
import pytest
from corpus import jpeg_bytes, photo_paths
from gcs_azure_servers import AZURITE_KEY, GCS, Azurite, azurite_command
from PIL import Image
from producers import RUN, write_tars

import imgfeat
from imgfeat.cli import main
from imgfeat.errors import UsageError
from imgfeat.sources import check_sources
from imgfeat.sources.folders import walk_remote_folder
from imgfeat.sources.stream import SourceOptions
from imgfeat.store.remote import Remote


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """(folder of JPEGs made from the test photos, a tar of them, their features from the local
    folder by name): what the services must give back, bitwise."""
    root = tmp_path_factory.mktemp("jpegs")
    folder = root / "photos"
    folder.mkdir()
    for path in photo_paths():
        data = path.read_bytes() if path.suffix == ".jpg" else jpeg_bytes(
            Image.open(path).convert("RGB"))
        (folder / f"{path.stem}.jpg").write_bytes(data)
    (tar,) = write_tars(root, [sorted(folder.glob("*.jpg"))])
    assert main(["extract", str(folder), "-o", str(root / "ref"), *RUN]) == 0
    store = imgfeat.open_store(root / "ref")
    return folder, tar, {key: store[key] for key in store.keys}


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
            patch.setenv("IMGFEAT_STAGING", str(root / "staging"))  # this machine's, not ~
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
