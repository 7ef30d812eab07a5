"""Colour JPEGs go through simplejpeg straight to arrays where it is installed: the same
pixels as Pillow's decoder, full size and drafted, upright for every EXIF orientation, the
same refusals, and the same model-sized pixels after the geometry."""

import numpy as np
import pytest
from corpus import jpeg_bytes, photo_paths
from PIL import Image

from imgfeat.errors import ImageError
from imgfeat.models.preprocess import Preprocess
from imgfeat.pipeline import jpeg_decode
from imgfeat.pipeline.cpu_decode import decode, pixels_from_bytes

pytestmark = pytest.mark.skipif(jpeg_decode.simplejpeg is None, reason="needs simplejpeg")


def both(data: bytes, min_side=None) -> tuple[np.ndarray, np.ndarray]:
    """(simplejpeg's pixels, Pillow's) through imgfeat's decode."""
    fast = decode(data, None, min_side, as_array=True)
    assert isinstance(fast, np.ndarray)
    return fast, np.asarray(decode(data, None, min_side))


@pytest.mark.parametrize("min_side", [None, 60, 150])
def test_same_pixels_as_pillow_on_photos(min_side):
    for path in photo_paths():
        if Image.open(path).format != "JPEG":
            continue
        fast, pillow = both(path.read_bytes(), min_side)
        assert fast.shape == pillow.shape and np.array_equal(fast, pillow), path.name


@pytest.mark.parametrize("min_side", [100, 300, 512, 700])
def test_large_jpeg_is_drafted_as_pillow_drafts_it(min_side):
    large = jpeg_bytes(Image.open(photo_paths()[0]).convert("RGB").resize((2000, 1500)))
    fast, pillow = both(large, min_side)
    assert fast.shape == pillow.shape and np.array_equal(fast, pillow)
    assert min(fast.shape[:2]) >= min_side


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_as_pillow_applies_it(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    photo = Image.open(photo_paths()[0]).convert("RGB").resize((64, 40))
    fast, pillow = both(jpeg_bytes(photo, exif=exif.tobytes()))
    assert fast.shape == pillow.shape and np.array_equal(fast, pillow)


def test_refusals_and_other_jpegs():
    good = jpeg_bytes(Image.open(photo_paths()[0]).convert("RGB"))
    with pytest.raises(ImageError, match="corrupt or truncated image"):
        decode(good[: len(good) // 2], None, as_array=True)
    grey = jpeg_bytes(Image.open(photo_paths()[0]).convert("L"))
    assert isinstance(decode(grey, None, as_array=True), Image.Image)  # Pillow's, as RGB


@pytest.mark.parametrize("preprocess", [Preprocess(interpolation="bicubic"), Preprocess(),
                                        Preprocess(mode="squash", size=(96, 128))])
def test_model_pixels_match_the_pillow_path(preprocess):
    for path in photo_paths():
        data = path.read_bytes()
        fast = pixels_from_bytes(data, preprocess, None)
        plain = preprocess.geometry(decode(data, None, preprocess.draft_side))
        assert np.array_equal(fast, plain), path.name
