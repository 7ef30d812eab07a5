"""Retrieval heads, multi-scale extraction and whitening, each against its definition."""

import math

import numpy as np
import pytest
import torch
from conftest import FAST

import imgfeat
from imgfeat.cli import main
from imgfeat.compute.pooling import apply_head, rmac_regions
from imgfeat.compute.whitening import learn
from imgfeat.errors import UsageError

rng = np.random.default_rng(0)


def maps(height: int, width: int) -> np.ndarray:
    return rng.normal(size=(3, 16, height, width)).astype(np.float32)


def head(array: np.ndarray, pool: str, **options) -> np.ndarray:
    return apply_head(torch.from_numpy(array), pool, **options).numpy()


@pytest.mark.parametrize("size", [(7, 7), (5, 9)])
def test_mac_spoc_gem_follow_their_formulas(size):
    x = maps(*size)
    np.testing.assert_allclose(head(x, "mac"), x.max(axis=(2, 3)), rtol=1e-6)
    np.testing.assert_allclose(head(x, "spoc"), x.mean(axis=(2, 3)), atol=1e-6)
    for p in (3.0, 4.5):
        expected = (np.maximum(x, 1e-6) ** p).mean(axis=(2, 3)) ** (1 / p)
        np.testing.assert_allclose(head(x, "gem", gem_p=p), expected, rtol=1e-4)


def reference_rmac(x: np.ndarray, levels: int = 3, overlap: float = 0.4) -> np.ndarray:
    """R-MAC written out from its definition, independently of imgfeat.head."""
    def unit(v):
        return v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-6)

    _, _, h, w = x.shape
    side_min = min(h, w)
    steps = np.arange(2, 8)
    spacing = (max(h, w) - side_min) / (steps - 1)
    best = int(np.argmin(np.abs((side_min ** 2 - side_min * spacing) / side_min ** 2 - overlap)))
    extra_w = best + 1 if h < w else 0
    extra_h = best + 1 if h > w else 0
    total = unit(x.max(axis=(2, 3)))
    for level in range(1, levels + 1):
        side = math.floor(2 * side_min / (level + 1))
        half = math.floor(side / 2 - 1)
        centres = []
        for length, count in ((h, level + extra_h), (w, level + extra_w)):
            step = 0 if count == 1 else (length - side) / (count - 1)
            centres.append([math.floor(half + i * step) - half for i in range(count)])
        for top in centres[0]:
            for left in centres[1]:
                region = x[:, :, top:top + side, left:left + side]
                total = total + unit(region.max(axis=(2, 3)))
    return total


@pytest.mark.parametrize("size", [(7, 7), (7, 10), (10, 7), (13, 20), (3, 5), (12, 40)])
def test_rmac_follows_its_definition(size):
    x = maps(*size)
    np.testing.assert_allclose(head(x, "rmac"), reference_rmac(x), rtol=1e-5, atol=1e-6)


def test_rmac_regions_of_a_square_map():
    regions = rmac_regions(12, 12)
    assert [side for _, _, side in regions].count(12) == 1  # level 1: the whole map
    assert len(regions) == 1 + 4 + 9
    assert all(top + s <= 12 and left + s <= 12 for top, left, s in regions)


def test_spatial_pools_refuse_token_outputs():
    with pytest.raises(UsageError, match="needs a spatial map"):
        apply_head(torch.randn(2, 5, 8), "rmac")


def test_multiscale_is_the_generalized_mean_of_unit_vectors():
    from imgfeat.compute.build import build_extractor
    from imgfeat.options import ExtractOptions

    extractor = build_extractor(ExtractOptions(model="timm:resnet18", weights="random",
                                               image_size=64, pool="gem", layer="layer4",
                                               scales=(1.0, 0.5)), "cpu")
    batch = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    combined = extractor(batch)["layer4"]
    pixels = extractor._to_input(batch)
    extractor.scales = (1.0,)
    with torch.inference_mode():
        full = apply_head(extractor._tap(pixels)["layer4"], "gem", True)
        half = apply_head(extractor._tap(torch.nn.functional.interpolate(
            pixels, scale_factor=0.5, mode="bilinear", align_corners=False))["layer4"], "gem",
            True)
    p = 3.0
    expected = torch.nn.functional.normalize(((full ** p + half ** p) / 2) ** (1 / p)).numpy()
    np.testing.assert_allclose(combined.astype(np.float32), expected, atol=2e-3)


def test_whitened_learning_set_has_identity_covariance():
    mixing = rng.normal(size=(32, 32))
    features = rng.normal(size=(500, 32)) @ mixing + 5.0
    whitening = learn(features, dim=12)
    whitened = whitening.apply(features)
    assert whitened.shape == (500, 12)
    np.testing.assert_allclose(whitened.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(np.cov(whitened, rowvar=False), np.eye(12), atol=1e-8)


def test_whitening_keeps_the_strongest_directions():
    features = rng.normal(size=(400, 3)) * np.array([10.0, 1.0, 0.1])
    whitening = learn(features, dim=1)
    assert abs(whitening.projection[0, 0]) > 10 * abs(whitening.projection[0, 1:]).max()


def test_whitening_dim_is_checked():
    with pytest.raises(UsageError, match="--dim must be between 1 and 7"):
        learn(rng.normal(size=(8, 10)), dim=9)


def test_whiten_command_and_extract_with_whiten_agree(mixed_corpus, tmp_path, capsys):
    folder = str(mixed_corpus[0])
    options = [*FAST, "--layer", "layer4", "--pool", "gem", "--l2", "--dtype", "float32",
               "--devices", "cpu:1"]
    store_dir = tmp_path / "store"
    assert main(["extract", folder, "-o", str(store_dir), *options]) == 0
    assert main(["whiten", str(store_dir), "--dim", "8", "-o", str(tmp_path / "w"),
                 "--l2"]) == 0
    whitened = imgfeat.open_store(tmp_path / "w")
    assert whitened.feature_shape == (8,) and whitened.keys == imgfeat.open_store(
        store_dir).keys
    assert main(["verify", str(tmp_path / "w")]) == 0
    assert main(["extract", folder, "-o", str(tmp_path / "x"), *options, "--whiten",
                 str(tmp_path / "w" / "whitening.npz")]) == 0
    direct = np.asarray(imgfeat.open_store(tmp_path / "x").features())
    np.testing.assert_allclose(direct, np.asarray(whitened.features()), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(direct, axis=1), 1.0, rtol=1e-5)


def test_whitening_that_does_not_fit_the_model_is_refused(tmp_path, photos):
    learn(rng.normal(size=(50, 10)), dim=4).save(tmp_path / "w.npz")
    with pytest.raises(UsageError, match="expects 10-d vectors"):
        imgfeat.extract(str(photos), tmp_path / "o", model="timm:resnet18", weights="random",
                        image_size=64, progress="none", whiten=str(tmp_path / "w.npz"))
