"""Several layers in one pass: one dataset per layer, each equal to a run of that layer."""

import h5py
import numpy as np
import pytest
from conftest import FAST

import imgfeat
from imgfeat.cli import main
from imgfeat.errors import UsageError
from imgfeat.store.layout import feature_datasets

LAYERS = ["layer3", "layer4", "pre_logits"]


@pytest.fixture(scope="module")
def multi(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("multi") / "out"
    args = ["extract", str(photos), "-o", str(out), *FAST, "--devices", "cpu:1",
            "--shard-size", "4"]
    for layer in LAYERS:
        args += ["--layer", layer]
    assert main(args) == 0
    return out


def test_one_dataset_per_layer_each_with_its_head(multi):
    store = imgfeat.open_store(multi)
    assert store.layers == LAYERS
    assert store.feature_shapes == {"layer3": (256,), "layer4": (512,), "pre_logits": (512,)}
    with h5py.File(multi / "shards" / "shard-000000.h5", "r") as f:
        assert sorted(f["features"]) == sorted(LAYERS)
    with h5py.File(multi / "features.h5", "r") as f:
        for layer in LAYERS:
            np.testing.assert_array_equal(f[f"features/{layer}"][:],
                                          np.asarray(store.features(layer)))


def test_each_layer_equals_a_single_layer_run(multi, photos, tmp_path):
    store = imgfeat.open_store(multi)
    for layer in ("layer3", "pre_logits"):
        single = imgfeat.extract(str(photos), tmp_path / layer, model="timm:resnet18",
                                 weights="random", image_size=64, batch_size=4,
                                 progress="none", layer=layer, devices="cpu:1")
        np.testing.assert_array_equal(np.asarray(single.features()),
                                      np.asarray(store.features(layer)))


def test_a_multi_layer_store_asks_which_layer(multi):
    store = imgfeat.open_store(multi)
    with pytest.raises(UsageError, match="holds layers layer3, layer4, pre_logits"):
        store.features()
    row = store[store.keys[0]]
    assert set(row) == set(LAYERS) and row["layer3"].shape == (256,)


def test_export_and_verify_a_multi_layer_store(multi, tmp_path, capsys):
    assert main(["verify", str(multi)]) == 0
    assert main(["export", str(multi), "--to", "h5", str(tmp_path / "l4.h5"), "--layer",
                 "layer4", "--quiet"]) == 0
    with h5py.File(tmp_path / "l4.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][:],
                                      np.asarray(imgfeat.open_store(multi).features("layer4")))
    assert main(["export", str(multi), "--to", "npy", str(tmp_path / "x"), "--quiet"]) == 2
    assert "holds layers" in capsys.readouterr().err


def test_layer_names_with_slashes_are_escaped():
    assert feature_datasets(["inception_3a/1x1", "fc7"]) == {
        "inception_3a/1x1": "features/inception_3a%2F1x1", "fc7": "features/fc7"}
    assert feature_datasets(["only"]) == {"only": "features"}


def test_a_layer_named_twice_is_refused(photos, tmp_path):
    with pytest.raises(UsageError, match="named twice"):
        imgfeat.extract(str(photos), tmp_path / "o", model="timm:resnet18", weights="random",
                        layer=["layer3", "layer3"], progress="none")
