"""Text and image queries of a store made by an open_clip model built from a small config with
random weights: texts through the text tower, images through the image tower, and the scores
those of a direct open_clip computation."""

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
pytest.importorskip("faiss")

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                            "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2,
                          "layers": 1}}
# The vocabulary of open_clip's own tokenizer, which text queries go through.
TEXTS = ["a red car", "a cat on a sofa"]


def unit(array) -> np.ndarray:
    array = np.asarray(array, np.float64)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    config = root / "tinyclip_search.json"
    config.write_text(json.dumps(TINY_CLIP))
    photos = [str(p) for p in photo_paths()[:4]]
    assert main(["extract", *photos, "-o", str(root / "out"), "--model", f"open_clip:{config}",
                 "--weights", "random", "--dtype", "float32", "--precision", "fp32", "--quiet",
                 "--devices", "cpu:1"]) == 0
    open_clip.add_model_config(str(config))
    with seeded():
        model, _, preprocess = open_clip.create_model_and_transforms("tinyclip_search")
    tokenizer = open_clip.get_tokenizer("tinyclip_search")
    images = [Image.open(p).convert("RGB") for p in photos]
    with torch.inference_mode():
        text = model.eval().encode_text(tokenizer(TEXTS)).numpy()
        image = model.encode_image(torch.stack([preprocess(i) for i in images])).numpy()
    return imgfeat.open_store(root / "out"), photos, unit(text), unit(image)


def test_text_queries_score_as_open_clip_does(clip_store):
    store, photos, text, image = clip_store
    keys = [p.rsplit("/", 1)[-1] for p in photos]
    # open_clip's text embeddings against the stored image features: the same numbers; and
    # against open_clip's own image embeddings (its preprocessing differs from the store's by
    # resampling details): the same up to that.
    on_store = text @ unit(store.features()[:]).T
    direct = text @ image.T
    results = store.search([], k=len(keys), text=TEXTS)
    for row, hits in enumerate(results):
        assert len(hits) == len(keys)
        for key, score in hits:
            assert score == pytest.approx(on_store[row, keys.index(key)], abs=1e-5)
            assert score == pytest.approx(direct[row, keys.index(key)], abs=5e-3)


def test_texts_take_the_text_tower_and_images_the_image_tower(clip_store):
    store, photos, text, image = clip_store
    from imgfeat.search.api import searcher_of

    searcher = searcher_of(store, None)
    assert np.allclose(searcher.embedder.texts(TEXTS), text, atol=1e-5)
    embedded = searcher.embedder.images([(p, open(p, "rb").read()) for p in photos])
    assert (np.sum(embedded * image, axis=1) >= 0.999).all()
    stored = unit(store.features()[:])
    assert (np.sum(embedded * stored, axis=1) >= 0.99999).all()


def test_text_query_through_the_cli(clip_store, capsys):
    store, *_ = clip_store
    capsys.readouterr()
    assert main(["search", str(store.layout.root), "--text", "a red car", "-k", "2",
                 "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "query,rank,key,score" and len(lines) == 3
    assert lines[1].startswith("text: a red car,1,")


def test_the_page_searches_by_text_on_a_clip_store_only(clip_store):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from serving import form, request, serving

    from imgfeat.serve.app import create_app

    store, photos, text, _ = clip_store
    with serving(create_app(store)) as port:
        status, body = request(port, "/api/info")
        assert status == 200 and json.loads(body)["text"] is True
        status, body = request(port, "/api/search", "POST", *form({"text": TEXTS[0], "k": "4"}))
        assert status == 200
        hits = json.loads(body)["hits"]
        on_store = text[0] @ unit(store.features()[:]).T
        keys = [p.rsplit("/", 1)[-1] for p in photos]
        assert [h["score"] for h in hits] == pytest.approx(
            [on_store[keys.index(h["key"])] for h in hits], abs=1e-4)
