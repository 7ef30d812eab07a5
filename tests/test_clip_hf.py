"""open_clip and Hugging Face models built from small random configs, through the CLI, against
each library's own preprocessing and forward pass."""

import json

import numpy as np
import pytest
import torch
from corpus import photo_paths
from PIL import Image

import imgfeat
from imgfeat.cli import main
from imgfeat.models.weights import seeded

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                            "head_width": 16},
             "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2,
                          "layers": 1}}


def cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def images():
    return [Image.open(p).convert("RGB") for p in photo_paths()[:4]]


def run(tmp_path, model, *extra):
    out = tmp_path / "out"
    args = ["extract", *[str(p) for p in photo_paths()[:4]], "-o", str(out), "--model", model,
            "--dtype", "float32", "--quiet", "--devices", "cpu:1", *extra]
    assert main(args) == 0
    return imgfeat.open_store(out)


def test_open_clip_image_tower_through_the_cli(tmp_path):
    config = tmp_path / "tinyclip.json"
    config.write_text(json.dumps(TINY_CLIP))
    store = run(tmp_path, f"open_clip:{config}", "--weights", "random")
    assert store.layer == "output" and store.feature_shape == (16,)
    open_clip.add_model_config(str(config))
    with seeded():
        model, _, preprocess = open_clip.create_model_and_transforms("tinyclip")
    with torch.inference_mode():
        expected = model.eval().encode_image(torch.stack([preprocess(i) for i in images()]))
    assert cosines(store.features()[:], expected.numpy()).min() >= 0.999


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny-vit"
    torch.manual_seed(2)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8)
    model = transformers.ViTModel(config).eval()
    model.save_pretrained(folder)
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32},
                                               image_mean=[0.5, 0.4, 0.3],
                                               image_std=[0.2, 0.25, 0.3])
    processor.save_pretrained(folder)
    with torch.inference_mode():
        out = model(**processor(images=images(), return_tensors="pt"))
    return folder, out


@pytest.mark.parametrize("layer, expected", [
    (None, lambda out: out.pooler_output),
    ("cls", lambda out: out.last_hidden_state[:, 0]),
    ("mean", lambda out: out.last_hidden_state.mean(1)),
])
def test_hugging_face_backbone_through_the_cli(tmp_path, tiny_vit, layer, expected):
    folder, out = tiny_vit
    store = run(tmp_path, f"hf:{folder}", *(["--layer", layer] if layer else []))
    assert store.layer == (layer or "pooled")
    assert cosines(store.features()[:], expected(out).numpy()).min() >= 0.999


def test_unknown_open_clip_model_is_one_clear_error(tmp_path, capsys):
    assert main(["extract", str(photo_paths()[0]), "-o", str(tmp_path / "o"), "--model",
                 "open_clip:ViT-Q-99", "--weights", "random", "--quiet"]) == 2
    assert "unknown open_clip model 'ViT-Q-99'" in capsys.readouterr().err
