"""--engine ray with sources and output on a real S3-compatible server: the actors share no
folder with the driver (their staging folders are their own), only the bucket."""

import json

import numpy as np
import test_ray
from corpus import photo_paths
from producers import RUN
from s3_server import S3

import imgfeat
from imgfeat.cli import main

cluster = test_ray.cluster  # the Ray test cluster, started once per module


def test_ray_reads_and_writes_s3(cluster, photo_reference, tmp_path, monkeypatch):
    _, features = photo_reference
    monkeypatch.setenv("IMGFEAT_STAGING", str(tmp_path / "driver"))  # not the actors'
    server = S3()
    try:
        server.bucket("raybucket")
        fs = server.fs()
        for path in photo_paths():
            fs.pipe(f"raybucket/photos/{path.name}", path.read_bytes())
        options = json.dumps(server.options())
        assert main(["extract", "s3://raybucket/photos", "-o", "s3://raybucket/feats",
                     "--storage-options", options, *RUN, "--engine", "ray",
                     "--ray-address", cluster, "--devices", "cpu:2"]) == 0
        store = imgfeat.open_store("s3://raybucket/feats", storage_options=server.options())
        assert sorted(store.keys) == sorted(features) and not store.errors
        for key in store.keys:
            np.testing.assert_array_equal(store[key], features[key])
        assert not fs.exists("raybucket/feats/features.h5")
    finally:
        server.stop()
