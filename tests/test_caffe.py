"""Caffe nets without Caffe: prototxt (both formats) + caffemodel written here with random
weights, against the same nets built by hand in PyTorch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from caffe_nets import SIZE, mobilenet, resnet, vgg_prototxt, vgg_weights, write_caffemodel
from corpus import photo_paths

import imgfeat
from imgfeat.cli import main
from imgfeat.errors import UsageError
from imgfeat.models import load_model
from imgfeat.models.caffe.schema import messages

torch.manual_seed(5)


def vgg_by_hand(x: torch.Tensor, w) -> dict[str, torch.Tensor]:
    x = F.relu(F.conv2d(x, *w["conv1_1"], padding=1))
    x = torch.nn.LocalResponseNorm(5, alpha=0.0001, beta=0.75, k=1.0)(x)
    x = torch.nn.MaxPool2d(2, 2, ceil_mode=True)(x)
    assert x.shape[-1] == 34  # ceil rounding
    x = F.relu(F.conv2d(x, *w["conv2"], padding=1, groups=2))
    pool5 = torch.nn.MaxPool2d(3, 2, ceil_mode=True)(x)
    fc6 = F.relu(F.linear(pool5.flatten(1), *w["fc6"]))
    fc7 = F.relu(F.linear(fc6, *w["fc7"]))
    return {"pool5": pool5, "fc7": fc7, "prob": F.softmax(F.linear(fc7, *w["fc8"]), 1)}


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    folder = tmp_path_factory.mktemp("caffe")
    weights = vgg_weights()
    for v1 in (False, True):
        tag = "v1" if v1 else "v2"
        (folder / f"{tag}.prototxt").write_text(vgg_prototxt(v1))
        write_caffemodel(folder / f"{tag}.caffemodel", weights, v1, legacy_dims=v1)
    return folder, weights


def run_net(prototxt, caffemodel, layers, x):
    model = load_model(str(prototxt), str(caffemodel))
    with torch.inference_mode():
        return model.make_tap(layers, torch.device("cpu"))(x)


@pytest.mark.parametrize("tag", ["v2", "v1"])
def test_vgg_style_net_matches_the_hand_built_one(vgg, tag):
    folder, weights = vgg
    x = torch.randn(2, 3, SIZE, SIZE) * 50
    got = run_net(folder / f"{tag}.prototxt", folder / f"{tag}.caffemodel",
                  ["fc7", "pool5", "prob"], x)
    expected = vgg_by_hand(x, weights)
    assert got["pool5"].shape == (2, 16, 17, 17)
    for blob in ("pool5", "fc7", "prob"):
        torch.testing.assert_close(got[blob], expected[blob], rtol=1e-4, atol=1e-4)


def test_default_layer_is_what_the_last_fc_reads(vgg):
    folder, _ = vgg
    model = load_model(str(folder / "v2.prototxt"), str(folder / "v2.caffemodel"))
    assert model.default_layer == "fc7"
    assert {"conv1_1", "pool5", "fc7", "relu7", "prob"} <= set(model.layer_names)


RESNET = """
input: "data" input_shape { dim: 1 dim: 3 dim: 9 dim: 9 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1"
        batch_norm_param { use_global_stats: true eps: 0.001 } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1"
        scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 1 } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" }
layer { name: "scale2" type: "Scale" bottom: "conv2" top: "conv2"
        scale_param { bias_term: true } }
layer { name: "sum" type: "Eltwise" bottom: "conv1" bottom: "conv2" top: "sum"
        eltwise_param { operation: SUM coeff: 1 coeff: 0.5 } }
layer { name: "out" type: "ReLU" bottom: "sum" top: "sum" }
"""


def test_resnet_block_with_batchnorm_scale_and_eltwise(tmp_path):
    w = {"conv1": [torch.randn(4, 3, 3, 3)],
         "bn1": [torch.randn(4) * 5, torch.rand(4) * 10 + 1, torch.tensor([5.0])],
         "scale1": [torch.rand(4) + 0.5, torch.randn(4)],
         "conv2": [torch.randn(4, 4, 3, 3), torch.randn(4)],
         "bn2": [torch.randn(4) * 5, torch.rand(4) * 10 + 1, torch.tensor([2.0])],
         "scale2": [torch.rand(4) + 0.5, torch.randn(4)]}
    (tmp_path / "res.prototxt").write_text(RESNET)
    write_caffemodel(tmp_path / "res.caffemodel", w, v1=False)
    x = torch.randn(2, 3, 9, 9)

    def bn(v, blobs, eps):
        mean, var = blobs[0] / blobs[2], blobs[1] / blobs[2]
        return (v - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + eps)

    def scale(v, blobs):
        return v * blobs[0].view(1, -1, 1, 1) + blobs[1].view(1, -1, 1, 1)

    a = F.relu(scale(bn(F.conv2d(x, w["conv1"][0], padding=1), w["bn1"], 1e-3), w["scale1"]))
    b = scale(bn(F.conv2d(a, *w["conv2"], padding=1), w["bn2"], 1e-5), w["scale2"])
    got = run_net(tmp_path / "res.prototxt", tmp_path / "res.caffemodel", ["sum"], x)
    torch.testing.assert_close(got["sum"], F.relu(a + 0.5 * b), rtol=1e-4, atol=1e-4)


MISC = """
input: "data" input_dim: 1 input_dim: 3 input_dim: 6 input_dim: 6
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "split" type: "Split" bottom: "conv" top: "a" top: "b" }
layer { name: "prelu" type: "PReLU" bottom: "a" top: "p" }
layer { name: "sig" type: "Sigmoid" bottom: "b" top: "s" }
layer { name: "tanh" type: "TanH" bottom: "b" top: "t" }
layer { name: "prod" type: "Eltwise" bottom: "p" bottom: "s" top: "prod"
        eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "prod" bottom: "t" top: "max"
        eltwise_param { operation: MAX } }
layer { name: "cat" type: "Concat" bottom: "max" bottom: "p" top: "cat" }
layer { name: "ave" type: "Pooling" bottom: "cat" top: "ave"
        pooling_param { pool: AVE kernel_size: 4 stride: 4 pad: 1 } }
layer { name: "leaky" type: "ReLU" bottom: "ave" top: "leaky" relu_param { negative_slope: 0.1 } }
layer { name: "flat" type: "Flatten" bottom: "leaky" top: "flat" }
layer { name: "shape" type: "Reshape" bottom: "flat" top: "shape"
        reshape_param { shape { dim: 0 dim: -1 dim: 2 } } }
layer { name: "soft" type: "Softmax" bottom: "shape" top: "soft" softmax_param { axis: 2 } }
"""


def test_remaining_layer_types(tmp_path):
    w = {"conv": [torch.randn(4, 3, 1, 1), torch.randn(4)], "prelu": [torch.rand(4)]}
    (tmp_path / "misc.prototxt").write_text(MISC)
    write_caffemodel(tmp_path / "misc.caffemodel", w, v1=False)
    x = torch.randn(2, 3, 6, 6)
    conv = F.conv2d(x, *w["conv"])
    p = F.prelu(conv, w["prelu"][0])
    mx = torch.maximum(p * torch.sigmoid(conv), torch.tanh(conv))
    ave = F.avg_pool2d(torch.cat([mx, p], 1), 4, 4, 1, ceil_mode=True, count_include_pad=True)
    flat = F.leaky_relu(ave, 0.1).flatten(1)
    expected = F.softmax(flat.reshape(2, -1, 2), dim=2)
    got = run_net(tmp_path / "misc.prototxt", tmp_path / "misc.caffemodel", ["soft"], x)
    torch.testing.assert_close(got["soft"], expected, rtol=1e-5, atol=1e-6)


def test_unsupported_layer_is_named_with_its_type(tmp_path):
    (tmp_path / "bad.prototxt").write_text(
        'input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n'
        'layer { name: "up" type: "Deconvolution" bottom: "data" top: "up" }\n')
    with pytest.raises(UsageError, match="layer 'up' has type 'Deconvolution'"):
        load_model(str(tmp_path / "bad.prototxt"), "random")


def test_bad_files_are_one_clear_error(tmp_path, vgg):
    (tmp_path / "broken.prototxt").write_text("layer { name: ")
    with pytest.raises(UsageError, match="not a valid Caffe prototxt"):
        load_model(str(tmp_path / "broken.prototxt"), "random")
    (tmp_path / "w.caffemodel").write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(UsageError, match="not a valid Caffe caffemodel"):
        load_model(str(vgg[0] / "v2.prototxt"), str(tmp_path / "w.caffemodel"))
    with pytest.raises(UsageError, match="needs its weights"):
        load_model(str(vgg[0] / "v2.prototxt"), "pretrained")


def test_extract_runs_a_caffe_net_with_caffe_preprocessing(vgg, tmp_path):
    from imgfeat.models.caffe import caffe_preprocess
    from imgfeat.pipeline.cpu_decode import decode

    folder, weights = vgg
    photos = photo_paths()[:3]
    store = imgfeat.extract([str(p) for p in photos], tmp_path / "out",
                            model=str(folder / "v1.prototxt"),
                            weights=str(folder / "v1.caffemodel"), layer=["fc7", "pool5"],
                            pool="none", dtype="float32", progress="none", devices="cpu:1",
                            precision="fp32")  # against an fp32 reference
    assert store.layers == ["fc7", "pool5"]
    preprocess = caffe_preprocess((SIZE, SIZE))
    rgb = np.stack([preprocess.geometry(decode(p.read_bytes(), min_side=preprocess.draft_side))
                    for p in photos]).astype(np.float32)
    bgr = torch.from_numpy(rgb[..., ::-1].copy()).permute(0, 3, 1, 2)
    mean = torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    expected = vgg_by_hand(bgr - mean, weights)
    np.testing.assert_allclose(np.asarray(store.features("fc7")), expected["fc7"].numpy(),
                               rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.asarray(store.features("pool5")),
                               expected["pool5"].numpy(), rtol=1e-3, atol=1e-3)


def test_mean_file_and_input_scale(vgg, tmp_path):
    from imgfeat.models.caffe import caffe_preprocess
    from imgfeat.pipeline.cpu_decode import decode

    folder, weights = vgg
    means = (90.0, 100.0, 110.0)  # B, G, R
    blob = messages()["BlobProto"]()
    blob.shape.dim.extend([1, 3, 4, 4])
    blob.data.extend(np.repeat(means, 16).tolist())
    (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())
    photo = photo_paths()[0]
    store = imgfeat.extract([str(photo)], tmp_path / "out", model=str(folder / "v2.prototxt"),
                            weights=str(folder / "v2.caffemodel"), layer="fc7",
                            mean_file=str(tmp_path / "mean.binaryproto"), input_scale=0.5,
                            dtype="float32", progress="none", devices="cpu:1",
                            precision="fp32")
    preprocess = caffe_preprocess((SIZE, SIZE))
    rgb = preprocess.geometry(decode(photo.read_bytes(), min_side=preprocess.draft_side))
    bgr = torch.from_numpy(rgb[None, ..., ::-1].astype(np.float32).copy()).permute(0, 3, 1, 2)
    x = (bgr - torch.tensor(means).view(1, 3, 1, 1)) * 0.5
    np.testing.assert_allclose(np.asarray(store.features()), vgg_by_hand(x, weights)["fc7"],
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("maker", [resnet, mobilenet], ids=["batchnorm-scale", "depthwise"])
def test_layers_and_random_weights_need_no_caffemodel(maker, tmp_path, capsys):
    """Every layer with parameters (Convolution, BatchNorm, Scale, PReLU, InnerProduct)
    builds from the prototxt alone: `imgfeat layers` lists the net, `--weights random`
    extracts finite, non-constant features from several layers."""
    net = maker()
    prototxt, _ = net.save(tmp_path, "net")
    assert main(["layers", str(prototxt)]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert set(net.blobs()) <= set(listed)
    layers = [net.blobs()[1], net.blobs()[len(net.blobs()) // 2], "prob"]
    args = ["extract", str(photo_paths()[0]), str(photo_paths()[1]), "-o", str(tmp_path / "o"),
            "--model", str(prototxt), "--weights", "random", "--devices", "cpu:1", "--quiet",
            "--dtype", "float32"]
    assert main(args + [arg for layer in layers for arg in ("--layer", layer)]) == 0
    store = imgfeat.open_store(tmp_path / "o")
    for layer in layers:
        features = np.asarray(store.features(layer))
        assert np.isfinite(features).all() and features.std() > 0, layer


def test_untrained_parameters_follow_caffe_fillers(tmp_path):
    """No caffemodel: BatchNorm and Scale start as the identity, biases at 0, PReLU at 0.25."""
    prototxt, _ = resnet().save(tmp_path, "net")
    steps = {step.layer_name: step for step in load_model(str(prototxt), "random").module.steps}
    assert torch.equal(steps["scale_conv1"].value, torch.ones(8))
    assert torch.equal(steps["scale_conv1"].bias, torch.zeros(8))
    assert torch.equal(steps["bn_conv1"].mean, torch.zeros(8))
    assert torch.equal(steps["bn_conv1"].var, torch.ones(8))
    assert torch.equal(steps["res2b_prelu"].weight, torch.full((16,), 0.25))
    assert steps["conv1"].weight.std() == pytest.approx((3 * 7 * 7) ** -0.5, rel=0.2)


def test_a_caffemodel_without_a_layers_blobs_is_named(tmp_path):
    net = resnet()
    del net.weights["scale_conv1"]
    prototxt, caffemodel = net.save(tmp_path, "net")
    with pytest.raises(UsageError, match="no weights for Caffe layer 'scale_conv1'"):
        load_model(str(prototxt), str(caffemodel))


SCALE_BY_BLOB = """
input: "data" input_shape { dim: 1 dim: 3 dim: 4 dim: 4 }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "flat" type: "Flatten" bottom: "pool" top: "flat" }
layer { name: "scaled" type: "Scale" bottom: "data" bottom: "flat" top: "scaled"
        scale_param { axis: 0 bias_term: true } }
layer { name: "shifted" type: "Bias" bottom: "scaled" top: "shifted" }
"""


def test_scale_by_a_second_bottom_reads_its_bias_from_the_first_blob(tmp_path):
    bias, shift = torch.randn(1, 3), torch.randn(3)
    (tmp_path / "s.prototxt").write_text(SCALE_BY_BLOB)
    write_caffemodel(tmp_path / "s.caffemodel", {"scaled": [bias], "shifted": [shift]}, False)
    x = torch.randn(1, 3, 4, 4)
    got = run_net(tmp_path / "s.prototxt", tmp_path / "s.caffemodel", ["scaled", "shifted"], x)
    scaled = x * x.mean((2, 3))[..., None, None] + bias[..., None, None]
    torch.testing.assert_close(got["scaled"], scaled)
    torch.testing.assert_close(got["shifted"], scaled + shift.view(1, 3, 1, 1))
    untrained = load_model(str(tmp_path / "s.prototxt"), "random")
    with torch.inference_mode():
        torch.testing.assert_close(untrained.make_tap(["shifted"], torch.device("cpu"))(x)
                                   ["shifted"], x * x.mean((2, 3))[..., None, None])
