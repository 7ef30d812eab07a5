"""Features equal a plain reference computation: PIL -> the library's own eval transform ->
the model, for the default embedding and for a tapped layer."""

import numpy as np
import pytest
import timm
import torch
from corpus import photo_paths
from PIL import Image
from safetensors.torch import save_file

import imgfeat


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def timm_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref")
    torch.manual_seed(7)
    model = timm.create_model("resnet18", pretrained=False).eval()
    weights = folder / "resnet18.safetensors"
    save_file(model.state_dict(), str(weights))
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config, is_training=False)
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in photo_paths()])
    return folder, weights, model, batch


def run(folder, weights, name, **options):
    return imgfeat.extract([str(p) for p in photo_paths()], folder / name,
                           model="timm:resnet18", weights=str(weights), dtype="float32",
                           precision="fp32", progress="none", batch_size=4, **options)


def test_default_embedding_matches_timm_pre_logits(timm_setup):
    folder, weights, model, batch = timm_setup
    with torch.inference_mode():
        expected = model.forward_head(model.forward_features(batch), pre_logits=True).numpy()
    store = run(folder, weights, "default")
    assert store.keys == [p.name for p in photo_paths()]
    assert cosines(np.asarray(store.features()), expected).min() >= 0.999


def test_tapped_layer_with_avg_pool_matches_hooked_model(timm_setup):
    folder, weights, model, batch = timm_setup
    taps = []
    handle = model.layer3.register_forward_hook(lambda m, i, o: taps.append(o))
    with torch.inference_mode():
        model(batch)
    handle.remove()
    expected = taps[0].mean((2, 3)).numpy()
    store = run(folder, weights, "layer3", layer="layer3", pool="avg")
    assert store.feature_shape == (256,)
    assert cosines(np.asarray(store.features()), expected).min() >= 0.999


def test_unpooled_map_and_l2(timm_setup):
    folder, weights, model, batch = timm_setup
    store = run(folder, weights, "map", layer="layer4", pool="none", l2=True)
    assert store.feature_shape == (512, 7, 7)
    flat = np.asarray(store.features()).reshape(len(store), -1)
    np.testing.assert_allclose(np.linalg.norm(flat, axis=1), 1.0, rtol=1e-5)


def test_torchvision_model_matches_its_weights_transform(tmp_path):
    from torchvision import models

    torch.manual_seed(3)
    model = models.get_model("resnet18", weights=None).eval()
    weights = tmp_path / "tv.pth"
    torch.save(model.state_dict(), weights)
    transform = models.get_model_weights("resnet18").DEFAULT.transforms()
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in photo_paths()])
    taps = []
    model.fc.register_forward_pre_hook(lambda m, args: taps.append(args[0]))
    with torch.inference_mode():
        model(batch)
    store = imgfeat.extract([str(p) for p in photo_paths()], tmp_path / "tv",
                            model="torchvision:resnet18", weights=str(weights),
                            dtype="float32", progress="none")
    assert cosines(np.asarray(store.features()), taps[0].numpy()).min() >= 0.999
