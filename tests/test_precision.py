"""bf16 on CPUs with bf16 matrix units: the choice per CPU, the fidelity check against fp32
at start, what a store records and how a resumed run keeps it, and bf16 through the model
paths (frozen graph, several layers, Caffe) on real photos."""

import json
import warnings

import numpy as np
import pytest
import timm
import torch
from corpus import photo_paths
from test_caffe import vgg_prototxt, vgg_weights, write_caffemodel

import imgfeat
from imgfeat.cli import _precision, describe, main
from imgfeat.compute.build import build_extractor
from imgfeat.compute.extractor import Extractor
from imgfeat.compute.fidelity import THRESHOLD, agreement, check_batch, guard
from imgfeat.compute.precision import Choice, CpuCaps, choose_precision, cpu_caps
from imgfeat.models.base import LoadedModel
from imgfeat.models.preprocess import Preprocess
from imgfeat.options import ExtractOptions
from imgfeat.pipeline.cpu_decode import decode

CPU = torch.device("cpu")
BF16_HERE = cpu_caps().bf16_matrix_units
needs_bf16_units = pytest.mark.skipif(not BF16_HERE, reason="this CPU has no bf16 matrix units")


def caps(**has) -> CpuCaps:
    return CpuCaps(**{"mkldnn_bf16": True, "amx": False, "avx512_bf16": False, "arm": False,
                      **has})


# -- the choice -----------------------------------------------------------------------------


@pytest.mark.parametrize("cpu, expected", [
    (caps(avx512_bf16=True), "bf16"),                   # Zen 4, Cooper Lake
    (caps(amx=True, avx512_bf16=True), "bf16"),         # Sapphire Rapids
    (caps(), "fp32"),                                   # AVX512 alone: oneDNN only emulates
    (caps(mkldnn_bf16=False, avx512_bf16=True), "fp32"),  # a torch built without oneDNN bf16
    (caps(arm=True), "bf16"),                           # Graviton 3 (oneDNN says so on Arm)
    (caps(arm=True, mkldnn_bf16=False), "fp32"),        # Graviton 2
])
def test_auto_is_bf16_only_with_bf16_matrix_units(cpu, expected):
    choice = choose_precision("auto", CPU, caps=cpu)
    assert choice.precision == expected
    assert choice.guard == choice.may_fall_back == (expected == "bf16")


def test_forced_precisions_and_models_outside_torch():
    units = caps(avx512_bf16=True)
    assert choose_precision("fp32", CPU, caps=units) == Choice("fp32")
    assert choose_precision("bf16", CPU, caps=caps()) == Choice("bf16", guard=True)
    assert choose_precision("auto", CPU, runs_in_torch=False, caps=units) == Choice("fp32")


def test_this_cpu_is_read_through_onednn_and_cpuinfo():
    found = cpu_caps()
    assert found.mkldnn_bf16 == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "").split()
    if "avx512_bf16" in flags and torch.backends.mkldnn.is_available():
        assert found.avx512_bf16 and found.bf16_matrix_units


@pytest.mark.parametrize("recorded, requested, expected", [
    ({"precision": "fp32", "precision_check": {"used": "fp32"}}, "auto", "fp32"),  # fell back
    ({"precision": "fp32"}, "auto", "fp32"),            # an older imgfeat's CPU store
    ({"precision": "bf16", "precision_check": {"used": "bf16"}}, "auto", "bf16"),
    ({"precision": "bf16"}, "bf16", "bf16"),
])
def test_a_store_decides_the_precision_of_runs_that_continue_it(recorded, requested, expected):
    choice = choose_precision(requested, CPU, recorded, caps=caps(avx512_bf16=True))
    assert choice == Choice(expected, recorded=recorded.get("precision_check"))  # no check


def test_a_forced_precision_that_differs_from_the_store_is_not_adopted():
    choice = choose_precision("bf16", CPU, {"precision": "fp32"}, caps=caps(avx512_bf16=True))
    assert choice.precision == "bf16"  # the store's identity check then refuses the run


# -- the fidelity check ---------------------------------------------------------------------


class LosesItsDigitsInBf16(torch.nn.Module):
    """Features W v + 4096 - 4096: in bf16 the layer's output rounds to a multiple of 32 near
    4096, which wipes W v out; fp32 keeps it to 1e-3."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.fc = torch.nn.Linear(8, 16)
        with torch.no_grad():
            self.fc.bias.fill_(4096.0)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3))) - 4096.0


def extractor_of(module, layers=("output",), precision="bf16", size=32, **options):
    preprocess = Preprocess(size=(size, size))
    model = LoadedModel("test", module, preprocess, "fc")
    return Extractor(model, list(layers), preprocess, device=CPU, precision=precision,
                     pool="avg", l2=False, dtype="float32", **options)


def test_check_batch_is_photo_like_and_fixed():
    batch = check_batch((48, 64))
    assert batch.shape == (8, 48, 64, 3) and batch.dtype == torch.uint8
    assert torch.equal(batch, check_batch((48, 64)))
    pixels = batch.float()
    assert 40 < pixels.std() < 90  # the contrast of photos, not a flat or saturated field
    steps = (pixels[:, :, 1:] - pixels[:, :, :-1]).abs().mean()
    assert 0.1 < steps / pixels.std() < 0.35  # as smooth as photos (0.18 at this size)


def test_agreement_is_the_worst_image_of_any_layer():
    a = {"x": np.array([[1.0, 0.0], [0.0, 0.0]]), "y": np.array([[1.0], [2.0]])}
    b = {"x": np.array([[1.0, 1.0], [0.0, 0.0]]), "y": np.array([[3.0], [4.0]])}
    assert agreement(a, b) == pytest.approx(np.sqrt(0.5))  # zero rows in both agree
    assert agreement({"x": np.zeros((1, 2))}, {"x": np.ones((1, 2))}) == 0.0


def test_auto_falls_back_to_fp32_when_bf16_disagrees(capsys):
    extractor = extractor_of(LosesItsDigitsInBf16())
    record = guard(extractor, may_fall_back=True, requested="auto")
    assert record["agreement"] < THRESHOLD and record["used"] == "fp32"
    assert extractor.precision == "fp32" and extractor.identity()["precision"] == "fp32"
    assert extractor.identity()["precision_check"] == record
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "running fp32 for the whole run" in err[0]
    pixels = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    assert np.abs(extractor(pixels)["output"]).max() > 0  # fp32 keeps what bf16 lost


def test_forced_bf16_is_kept_and_measured(capsys):
    extractor = extractor_of(LosesItsDigitsInBf16())
    record = guard(extractor, may_fall_back=False, requested="bf16")
    assert record["used"] == "bf16" == extractor.precision
    assert "forces it" in capsys.readouterr().err


@needs_bf16_units
def test_a_sound_model_keeps_bf16_frozen(capsys):
    torch.manual_seed(0)
    extractor = extractor_of(timm.create_model("resnet18", pretrained=False),
                             layers=("pre_logits",), size=64)
    assert extractor.frozen
    record = guard(extractor, may_fall_back=True, requested="auto")
    assert record["used"] == "bf16" and record["agreement"] >= THRESHOLD
    assert extractor.frozen and extractor.precision == "bf16"
    assert capsys.readouterr().err == ""


# -- bf16 through the model paths, on real photos -------------------------------------------


def photo_batch(size: int) -> torch.Tensor:
    preprocess = Preprocess(size=(size, size))
    return torch.from_numpy(np.stack([preprocess.geometry(decode(p.read_bytes(), None))
                                      for p in photo_paths()]))


def cosine_min(a: dict, b: dict) -> float:
    return agreement(a, b)


@needs_bf16_units
@pytest.mark.parametrize("layers", [("pre_logits",), ("layer2", "layer3", "pre_logits")])
def test_frozen_bf16_matches_fp32_on_photos(layers):
    def resnet():
        torch.manual_seed(0)
        return timm.create_model("resnet18", pretrained=False)

    bf16 = extractor_of(resnet(), layers=layers, size=96)
    fp32 = extractor_of(resnet(), layers=layers, size=96, precision="fp32", freeze=False)
    assert bf16.frozen
    pixels = photo_batch(96)
    assert cosine_min(bf16(pixels), fp32(pixels)) >= 0.999


@needs_bf16_units
def test_caffe_net_in_bf16_matches_fp32_on_photos(tmp_path):
    torch.manual_seed(5)
    (tmp_path / "net.prototxt").write_text(vgg_prototxt(False))
    write_caffemodel(tmp_path / "net.caffemodel", vgg_weights(), v1=False)
    options = dict(model=str(tmp_path / "net.prototxt"), weights=str(tmp_path / "net.caffemodel"),
                   layer=["pool5", "fc7"], dtype="float32", mean_pixel=(104.0, 117.0, 123.0))
    bf16 = build_extractor(ExtractOptions(**options), "cpu")
    fp32 = build_extractor(ExtractOptions(**options, precision="fp32"), "cpu")
    assert bf16.precision == "bf16" and fp32.precision == "fp32"
    pixels = photo_batch(bf16.preprocess.size[0])
    assert cosine_min(bf16(pixels), fp32(pixels)) >= 0.999


# -- what a store records, and runs that continue it ----------------------------------------


@pytest.fixture
def bad_model_file(tmp_path):
    path = tmp_path / "bad.pt"
    module = LosesItsDigitsInBf16().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        torch.jit.trace(module, torch.zeros(1, 3, 32, 32)).save(str(path))
    return path


def run_cli(*args) -> int:
    return main(["extract", *map(str, args), "--image-size", "32", "--batch-size", "4",
                 "--quiet"])


@needs_bf16_units
def test_store_records_the_fall_back_and_its_reruns_keep_it(tmp_path, photos, bad_model_file,
                                                           capfd):
    out = tmp_path / "out"
    assert run_cli(photos, "-o", out, "--model", bad_model_file, "--shard-size", "4") == 0
    assert "running fp32 for the whole run" in capfd.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    check = manifest["precision_check"]
    assert manifest["precision"] == "fp32" and check["used"] == "fp32"
    assert check["requested"] == "auto" and check["agreement"] < THRESHOLD
    with imgfeat.open_store(out) as store:
        info = describe(store)
    assert f"precision  fp32 (bf16 tried: cosine {check['agreement']:.5f} against fp32" in info

    (out / "shards" / "shard-000001.h5").unlink()  # a run cut short: resume it
    assert run_cli(photos, "-o", out, "--model", bad_model_file, "--shard-size", "4") == 0
    assert capfd.readouterr().err == ""  # the store decided; no second check
    assert json.loads((out / "manifest.json").read_text())["precision_check"] == check

    assert run_cli(photos, "-o", out, "--model", bad_model_file, "--shard-size", "4",
                   "--precision", "bf16") == 2  # a different request is refused in one line
    assert "precision: \"fp32\" -> \"bf16\"" in capfd.readouterr().err


@needs_bf16_units
def test_two_workers_reach_one_decision(tmp_path, photos, bad_model_file):
    out = tmp_path / "out"
    assert run_cli(photos, "-o", out, "--model", bad_model_file, "--devices", "cpu:2",
                   "--shard-size", "3") == 0
    assert json.loads((out / "manifest.json").read_text())["precision"] == "fp32"


@needs_bf16_units
def test_auto_continues_a_store_extracted_in_fp32(tmp_path, photos):
    options = dict(model="timm:resnet18", weights="random", image_size=32, batch_size=4,
                   progress="none", shard_size=4)
    first = imgfeat.extract(str(photos), tmp_path / "out", precision="fp32", **options)
    assert first.manifest["precision"] == "fp32" and first.manifest["precision_check"] is None
    (tmp_path / "out" / "shards" / "shard-000000.h5").unlink()
    again = imgfeat.extract(str(photos), tmp_path / "out", **options)  # auto: not refused
    assert again.manifest["precision"] == "fp32" and len(again) == len(first)
    with imgfeat.open_store(tmp_path / "out") as store:
        assert "precision  fp32\n" in describe(store) + "\n"


def test_info_line_says_how_bf16_agreed():
    check = {"requested": "auto", "tried": "bf16", "agreement": 0.999987, "threshold": 0.999,
             "images": 8, "used": "bf16"}
    assert _precision({"precision": "bf16", "precision_check": check}) == \
        "precision  bf16 (cosine 0.99999 against fp32 on 8 check images at start)"
    forced = {**check, "requested": "bf16", "agreement": 0.98}
    assert "(forced; cosine 0.98000" in _precision({"precision": "bf16",
                                                     "precision_check": forced})
    assert _precision({"precision": "bf16"}) == "precision  bf16"  # a GPU store


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    torch.manual_seed(11)
    model = timm.create_model("resnet18", num_classes=0).eval()
    example = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, example), folder / "model.pt")
        program = torch.export.export(model, (example,),
                                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        torch.export.save(program, folder / "model.pt2")
        torch.onnx.export(model, (example,), folder / "model.onnx", input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}},
                          dynamo=False)
    return folder


@needs_bf16_units
@pytest.mark.parametrize("model", ["torchvision:resnet18", "model.pt", "model.pt2"])
def test_bf16_through_torch_backends_matches_fp32_on_photos(model_files, model):
    spec = model if ":" in model else str(model_files / model)
    options = dict(model=spec, weights="random" if ":" in model else "pretrained",
                   image_size=64, dtype="float32")
    bf16 = build_extractor(ExtractOptions(**options), "cpu")
    fp32 = build_extractor(ExtractOptions(**options, precision="fp32"), "cpu")
    assert bf16.precision == "bf16" and bf16.precision_check["used"] == "bf16"
    pixels = photo_batch(64)
    assert cosine_min(bf16(pixels), fp32(pixels)) >= 0.999


def test_onnx_models_stay_fp32_under_auto(model_files):
    pytest.importorskip("onnxruntime")
    options = ExtractOptions(model=str(model_files / "model.onnx"), image_size=64)
    assert build_extractor(options, "cpu").precision == "fp32"
