"""Layer names hold anything a model's names hold ('/' in Caffe blobs and ONNX values, '.' in
PyTorch modules, '%', spaces, non-ASCII): several layers in one pass are stored, and read back
by every reader: the Store, `imgfeat export` (npy, parquet, h5), `verify`, `whiten`, and h5py
on features.h5 by the documented name mapping."""

import shutil
from urllib.parse import unquote

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from caffe_nets import inception

import imgfeat
from imgfeat.cli import main
from imgfeat.errors import UsageError
from imgfeat.models import load_model
from imgfeat.models.layers import resolve_layers
from imgfeat.store.layout import Layout, feature_datasets, layer_dataset_name
from imgfeat.store.virtual import build_virtual_file

CAFFE_NAMES = {"out_a": "inception 3a/out%put", "out_b": "inception%2F3b/output",
               "pool": "pool5/7×7 s1 ü", "prob": "."}
ONNX_NAMES = ["/stem/conv %1", "/stem/act/Relu_output_0", "pool ü/7x7"]
TIMM_NAMES = ["layer1.0.conv1", "layer2.1", "pre_logits"]


def test_a_layer_name_is_one_hdf5_name_that_unquote_gives_back():
    names = ["a/b", "a%2Fb", "a%b", "%", "/", ".", "..", "x.y", " sp ace ", "ünï/冷"]
    escaped = [layer_dataset_name(name) for name in names]
    assert len(set(escaped)) == len(names)
    assert all("/" not in e and e != "." for e in escaped)
    assert [unquote(e) for e in escaped] == names
    # stores already written keep their dataset names
    assert feature_datasets(["inception_3a/1x1", "fc7", "50%"]) == {
        "inception_3a/1x1": "features/inception_3a%2F1x1", "fc7": "features/fc7",
        "50%": "features/50%25"}
    assert feature_datasets(["a/b"]) == {"a/b": "features"}


def test_a_name_with_a_nul_is_refused_in_one_line(tmp_path):
    (tmp_path / "nul.prototxt").write_text(
        'input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n'
        'layer { name: "a" type: "ReLU" bottom: "data" top: "a\\000b" }\n')
    model = load_model(str(tmp_path / "nul.prototxt"), "random")
    with pytest.raises(UsageError, match="NUL character cannot be stored"):
        resolve_layers(model, ["a\0b"])


def extract(sources, out, layers, **options) -> None:
    args = ["extract", *map(str, sources), "-o", str(out), "--devices", "cpu:1", "--quiet",
            "--shard-size", "4", "--dtype", "float32"]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    assert main(args + [f"--layer={layer}" for layer in layers]) == 0


def assert_read_back_everywhere(out, layers, tmp_path) -> None:
    store = imgfeat.open_store(out)
    assert store.layers == layers and len(store) >= 5
    features = {layer: np.asarray(store.features(layer)) for layer in layers}
    row = store[store.keys[1]]
    for layer in layers:
        np.testing.assert_array_equal(row[layer], features[layer][1])
        batches = [f for _, f in store.iter_batches(3, layer=layer)]
        np.testing.assert_array_equal(np.concatenate(batches), features[layer])
    assert_h5py_reads(out, store, features)
    assert_exports(out, store, features, tmp_path)
    assert main(["verify", str(out)]) == 0
    for number, layer in enumerate(layers):
        if features[layer].ndim == 2 and features[layer].shape[1] > 2:
            assert_whitens(out, layer, tmp_path / f"white{number}")


def assert_h5py_reads(out, store, features) -> None:
    """h5py users find a layer by the README's rule, or by the dataset's `layer` attribute."""
    with h5py.File(out / "features.h5", "r") as f:
        found = dict(f["features"].items())
        by_attribute = {d.attrs["layer"]: d[:] for d in found.values()}
        assert {unquote(name) for name in found} == set(features)
        for layer, values in features.items():
            np.testing.assert_array_equal(f["features/" + layer_dataset_name(layer)][:], values)
            np.testing.assert_array_equal(f[store.datasets[layer]][:], values)
            np.testing.assert_array_equal(by_attribute[layer], values)
        assert list(f["keys"].asstr()[:]) == store.keys


def assert_exports(out, store, features, tmp_path) -> None:
    for number, (layer, values) in enumerate(features.items()):
        flat = values.reshape(len(values), -1)
        dest = tmp_path / f"export{number}"
        for to in ("npy", "parquet", "h5"):
            assert main(["export", str(out), "--to", to, str(dest / to), "--layer", layer,
                         "--quiet", "--dtype", "float32"]) == 0
        np.testing.assert_array_equal(np.load(dest / "npy" / "img_emb" / "img_emb_0.npy"), flat)
        table = pq.read_table(dest / "parquet")
        assert table.schema.metadata[b"imgfeat.layer"].decode() == layer
        np.testing.assert_array_equal(np.stack(table["embedding"].to_numpy(False)), flat)
        with h5py.File(dest / "h5", "r") as f:
            assert f.attrs["layer"] == layer
            np.testing.assert_array_equal(f["features"][:], values)


def assert_whitens(out, layer, dest) -> None:
    assert main(["whiten", str(out), "--layer", layer, "--dim", "2", "-o", str(dest)]) == 0
    whitened = imgfeat.open_store(dest)
    assert whitened.layers == [layer] and whitened.feature_shape == (2,)
    assert main(["verify", str(dest)]) == 0
    with h5py.File(dest / "features.h5", "r") as f:
        assert f["features"].attrs["layer"] == layer and f["features"].shape[1] == 2


@pytest.fixture(scope="module")
def caffe_store(photos, tmp_path_factory):
    folder = tmp_path_factory.mktemp("caffe")
    net = inception(names=CAFFE_NAMES)
    prototxt, caffemodel = net.save(folder, "net")
    extract([photos], folder / "out", list(CAFFE_NAMES.values()), model=prototxt,
            weights=caffemodel)
    return folder / "out"


def test_caffe_blobs_with_any_characters(caffe_store, tmp_path):
    assert_read_back_everywhere(caffe_store, list(CAFFE_NAMES.values()), tmp_path)


def test_a_store_left_without_features_h5_by_an_older_imgfeat_is_finished(caffe_store,
                                                                             tmp_path):
    """Runs before this fix wrote every shard, then failed on features.h5: the shards (with
    the same dataset names, and no `layer` attribute) make a complete store now."""
    old = tmp_path / "old"
    shutil.copytree(caffe_store, old)
    (old / "features.h5").unlink()
    for shard in (old / "shards").glob("shard-*.h5"):
        with h5py.File(shard, "r+") as f:
            for dataset in f["features"].values():
                del dataset.attrs["layer"]
    store = imgfeat.open_store(old)
    build_virtual_file(Layout(old), store.shards, store.manifest["layers"], "float32")
    with h5py.File(old / "features.h5", "r") as f:
        for layer in store.layers:
            np.testing.assert_array_equal(f[store.datasets[layer]][:],
                                          np.asarray(store.features(layer)))
    assert main(["verify", str(old)]) == 0


def onnx_model(path) -> None:
    """A small ONNX graph whose value names hold '/', '%', spaces and non-ASCII."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    weight = numpy_helper.from_array(rng.normal(0, 0.3, (6, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], [ONNX_NAMES[0]], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", [ONNX_NAMES[0]], [ONNX_NAMES[1]]),
             helper.make_node("GlobalAveragePool", [ONNX_NAMES[1]], [ONNX_NAMES[2]]),
             helper.make_node("Flatten", [ONNX_NAMES[2]], ["output"])]
    graph = helper.make_graph(
        nodes, "names", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                       ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 6])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_onnx_values_with_any_characters(photos, tmp_path):
    onnx_model(tmp_path / "names.onnx")
    extract([photos], tmp_path / "out", ONNX_NAMES, model=tmp_path / "names.onnx")
    assert_read_back_everywhere(tmp_path / "out", ONNX_NAMES, tmp_path)


def test_timm_modules_with_dots(photos, tmp_path):
    extract([photos], tmp_path / "out", TIMM_NAMES, model="timm:resnet18", weights="random",
            image_size=64, batch_size=4)
    with h5py.File(tmp_path / "out" / "features.h5", "r") as f:
        assert sorted(f["features"]) == sorted(TIMM_NAMES)  # '.' is kept as it is
    assert_read_back_everywhere(tmp_path / "out", TIMM_NAMES, tmp_path)
