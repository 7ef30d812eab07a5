"""TorchScript, torch.export and ONNX exports of a timm model give the model's own features."""

import warnings

import numpy as np
import pytest
import timm
import torch
from corpus import photo_paths

import imgfeat
from imgfeat.errors import UsageError

# The same preprocessing for the model and its exports (a file carries none of its own).
SAME = dict(image_size=96, crop_pct=0.875, interpolation="bilinear", dtype="float32",
            precision="fp32", progress="none", batch_size=4, devices="cpu:1")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports")
    torch.manual_seed(11)
    model = timm.create_model("resnet18", num_classes=0).eval()
    torch.save(model.state_dict(), folder / "weights.pth")
    example = torch.randn(2, 3, 96, 96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, example), folder / "model.pt")
        batch = torch.export.Dim("batch")
        program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
        torch.export.save(program, folder / "model.pt2")
        torch.onnx.export(model, (example,), folder / "model.onnx", input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}},
                          dynamo=False)
    return folder


def extract(tmp_path, name, model, **options):
    return np.asarray(imgfeat.extract([str(p) for p in photo_paths()], tmp_path / name,
                                      model=model, **SAME, **options).features())


@pytest.fixture(scope="module")
def reference(exports, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    return {layer: extract(out, layer, "timm:resnet18", weights=str(exports / "weights.pth"),
                           layer=layer)
            for layer in ("pre_logits", "layer3")}


def cosine_min(a, b) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@pytest.mark.parametrize("suffix", [".pt", ".pt2", ".onnx"])
def test_export_output_equals_the_model(exports, reference, tmp_path, suffix):
    features = extract(tmp_path, "out", str(exports / f"model{suffix}"))
    assert cosine_min(features, reference["pre_logits"]) >= 0.9999
    np.testing.assert_allclose(features, reference["pre_logits"], atol=1e-4)


def test_exported_program_layers_are_tapped_by_module_name(exports, reference, tmp_path):
    features = extract(tmp_path, "l3", str(exports / "model.pt2"), layer="layer3", pool="avg")
    np.testing.assert_allclose(features, reference["layer3"], atol=1e-4)


def test_onnx_intermediate_value_by_name(exports, reference, tmp_path):
    import onnx

    graph = onnx.load(str(exports / "model.onnx")).graph
    name = [out for node in graph.node for out in node.output if out.startswith("/layer3/")][-1]
    features = extract(tmp_path, "l3", str(exports / "model.onnx"), layer=name, pool="avg")
    np.testing.assert_allclose(features, reference["layer3"], atol=1e-4)


def test_torchscript_offers_its_output_only(exports, tmp_path):
    with pytest.raises(UsageError, match="unknown layer 'layer3'"):
        extract(tmp_path, "x", str(exports / "model.pt"), layer="layer3")


def test_a_broken_model_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(UsageError, match="cannot load onnx model"):
        extract(tmp_path, "x", str(bad))
    with pytest.raises(UsageError, match="model file not found"):
        extract(tmp_path, "y", str(tmp_path / "missing.pt2"))
