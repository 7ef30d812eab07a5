"""A Hugging Face CLIP built from a tiny config with random weights and saved as a repo folder
(model, image processor, tokenizer; no hub): extraction runs its vision tower and stores the
projected embedding (`embed`, the default); text queries go through its text tower and score
as transformers computes them. Text on a store that cannot compare with text is one line."""

import numpy as np
import pytest
import torch
from corpus import photo_paths
from hf_clip import CONTEXT, save_tiny_clip, save_tiny_siglip

import imgfeat
from imgfeat.cli import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("faiss")

TEXTS = ["a red car", "a cat on a sofa", "a photo of the beach"]


def unit(array) -> np.ndarray:
    array = np.asarray(array, np.float64)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def extract(out, model: str, *extra: str) -> imgfeat.Store:
    photos = [str(p) for p in photo_paths()[:4]]
    assert main(["extract", *photos, "-o", str(out), "--model", model, "--dtype", "float32",
                 "--precision", "fp32", "--quiet", "--devices", "cpu:1", *extra]) == 0
    return imgfeat.open_store(out)


def store_pixels(store) -> torch.Tensor:
    """The photos as the store's extraction shaped them (decode, resize, crop: uint8), then
    through the repo's own image processor, which leaves 32x32 images that size and only
    rescales and normalises them: the pixel_values the model saw."""
    from imgfeat.pipeline.cpu_decode import pixels_from_bytes
    from imgfeat.search.query import build_query_extractor

    preprocess = build_query_extractor(store).preprocess
    shaped = [pixels_from_bytes(p.read_bytes(), preprocess, None) for p in photo_paths()[:4]]
    processor = transformers.AutoImageProcessor.from_pretrained(store_repo(store))
    return processor(images=shaped, return_tensors="pt")["pixel_values"]


def store_repo(store) -> str:
    return store.model.removeprefix("hf:")


def projected(out) -> torch.Tensor:
    # transformers 4 returns the tensor, 5 an output whose pooler_output is the projection
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfclip")
    model = save_tiny_clip(root / "repo")
    store = extract(root / "out", f"hf:{root / 'repo'}", "--layer", "embed", "--layer", "cls")
    return store, model


def test_extraction_stores_the_projected_image_embedding(clip_store):
    store, model = clip_store
    assert store.layers == ["embed", "cls"] and store.feature_shapes["embed"] == (16,)
    pixels = store_pixels(store)
    with torch.inference_mode():
        embed = projected(model.get_image_features(pixel_values=pixels)).numpy()
        cls = model.vision_model(pixel_values=pixels).last_hidden_state[:, 0].numpy()
    assert np.allclose(store.features("embed")[:], embed, atol=1e-5)
    assert np.allclose(store.features("cls")[:], cls, atol=1e-5)


def test_embed_is_the_default_layer_of_a_dual_encoder(clip_store, tmp_path):
    store, _ = clip_store
    assert extract(tmp_path / "out", store.model).layer == "embed"


def text_features(store, model, texts, padding=True) -> np.ndarray:
    tokenizer = transformers.AutoTokenizer.from_pretrained(store_repo(store))
    tokens = tokenizer(texts, padding=padding, return_tensors="pt",
                       **({"max_length": CONTEXT} if padding == "max_length" else {}))
    with torch.inference_mode():
        return unit(projected(model.get_text_features(**tokens)).numpy())


def test_text_queries_score_as_transformers_does(clip_store):
    store, model = clip_store
    keys = [p.name for p in photo_paths()[:4]]
    expected = text_features(store, model, TEXTS) @ unit(store.features("embed")[:]).T
    results = store.search([], k=len(keys), text=TEXTS, layer="embed")
    assert len(results) == len(TEXTS)
    for row, hits in enumerate(results):
        assert sorted(key for key, _ in hits) == sorted(keys)
        for key, score in hits:
            assert score == pytest.approx(expected[row, keys.index(key)], abs=1e-5)


def test_text_query_through_the_cli(clip_store, capsys):
    store, model = clip_store
    capsys.readouterr()
    assert main(["search", str(store.layout.root), "--layer", "embed", "--text", TEXTS[0],
                 "-k", "4", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "query,rank,key,score" and len(lines) == 5
    keys = [p.name for p in photo_paths()[:4]]
    expected = text_features(store, model, TEXTS[:1])[0] @ unit(store.features("embed")[:]).T
    for line in lines[1:]:
        label, _, key, score = line.rsplit(",", 3)
        assert label == f"text: {TEXTS[0]}"
        assert float(score) == pytest.approx(expected[keys.index(key)], abs=1e-4)


def test_text_on_another_layer_of_a_clip_store_is_one_line(clip_store, capsys):
    store, _ = clip_store
    capsys.readouterr()
    assert main(["search", str(store.layout.root), "--layer", "cls", "--text", "a car"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "layer embed" in err and "'cls'" in err


def test_text_on_a_store_of_a_hugging_face_backbone_is_one_line(tmp_path, capsys):
    folder = tmp_path / "vit"
    torch.manual_seed(2)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8)
    transformers.ViTModel(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    store = extract(tmp_path / "out", f"hf:{folder}")
    capsys.readouterr()
    assert main(["search", str(store.layout.root), "--text", "a red car"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "text queries need a CLIP model" in err


def test_the_page_offers_text_on_a_hugging_face_clip_store(clip_store):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import json

    from serving import form, request, serving

    from imgfeat.serve.app import create_app

    store, model = clip_store
    with serving(create_app(store, layer="embed")) as port:
        status, body = request(port, "/api/info")
        assert status == 200 and json.loads(body)["text"] is True
        status, body = request(port, "/api/search", "POST", *form({"text": TEXTS[0], "k": "4"}))
        assert status == 200
        keys = [p.name for p in photo_paths()[:4]]
        expected = text_features(store, model, TEXTS[:1])[0] @ unit(store.features("embed")[:]).T
        hits = json.loads(body)["hits"]
        assert [h["score"] for h in hits] == pytest.approx(
            [expected[keys.index(h["key"])] for h in hits], abs=1e-4)


def test_siglip_embeds_images_and_texts_as_transformers_does(tmp_path):
    model = save_tiny_siglip(tmp_path / "repo")
    store = extract(tmp_path / "out", f"hf:{tmp_path / 'repo'}")
    assert store.layer == "embed"
    with torch.inference_mode():
        embed = projected(model.get_image_features(pixel_values=store_pixels(store))).numpy()
    assert np.allclose(store.features()[:], embed, atol=1e-5)
    # SigLIP compares texts padded to the full length, as it was trained
    expected = text_features(store, model, TEXTS, padding="max_length") @ unit(embed).T
    keys = [p.name for p in photo_paths()[:4]]
    for row, hits in enumerate(store.search([], k=4, text=TEXTS)):
        for key, score in hits:
            assert score == pytest.approx(expected[row, keys.index(key)], abs=1e-5)
