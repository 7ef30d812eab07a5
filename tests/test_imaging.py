import io

import numpy as np
import pytest
from corpus import (
    animated_gif,
    base_photo,
    bomb_png,
    encode,
    jpeg_bytes,
    oriented_pair,
    palette_alpha_png,
    sixteen_bit_png,
)
from PIL import Image

from imgfeat.errors import ImageError
from imgfeat.pipeline.cpu_decode import decode


def test_exif_orientation_is_applied():
    upright, data = oriented_pair()
    stored = Image.open(io.BytesIO(data))
    assert stored.size == (200, 320)  # sideways on disk
    image = decode(data)
    assert image.size == upright.size
    diff = np.abs(np.asarray(image, int) - np.asarray(upright, int)).mean()
    assert diff < 6, diff  # JPEG noise only; unrotated would not even have the same shape


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_common_formats_decode_to_rgb(fmt):
    image = decode(encode(base_photo((64, 48)), fmt))
    assert image.mode == "RGB" and image.size == (64, 48)


def test_cmyk_jpeg_becomes_rgb_close_to_original():
    photo = base_photo((64, 48))
    image = decode(encode(photo.convert("CMYK"), "JPEG", quality=95))
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image, int) - np.asarray(photo, int)).mean() < 12


def test_sixteen_bit_grey_is_scaled_not_clipped():
    image = np.asarray(decode(sixteen_bit_png()))
    assert image.dtype == np.uint8 and image.shape == (48, 64, 3)
    assert image[0, 0, 0] == 0 and image[-1, -1, 0] == 255
    assert 120 <= image[24, 32, 0] <= 136  # mid ramp is mid grey, not saturated white


def test_palette_with_transparency_composites_on_white():
    image = decode(palette_alpha_png())
    source = Image.open(io.BytesIO(palette_alpha_png()))
    transparent = np.asarray(source) == 0
    assert image.mode == "RGB"
    assert np.all(np.asarray(image)[transparent] == 255)


def test_alpha_composites_on_white():
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert np.asarray(decode(encode(rgba, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_first_frame_of_animation():
    assert np.asarray(decode(animated_gif()))[0, 0].tolist() == [255, 0, 0]


def test_grey_becomes_three_equal_channels():
    image = np.asarray(decode(encode(base_photo((32, 32)).convert("L"), "PNG")))
    assert image.shape == (32, 32, 3)
    assert np.array_equal(image[..., 0], image[..., 2])


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"hello, not an image" * 20, "not an image"),
    (jpeg_bytes(base_photo())[:3000], "truncated"),
])
def test_bad_files_raise_one_error_type(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode(data)


def test_decompression_bomb_refused_before_decoding():
    with pytest.raises(ImageError, match="too large.*--max-pixels"):
        decode(bomb_png())


def test_pixel_limit_is_configurable():
    data = encode(base_photo((100, 100)), "PNG")
    with pytest.raises(ImageError, match="too large"):
        decode(data, max_pixels=9_999)
    assert decode(data, max_pixels=None).size == (100, 100)


def test_float_pixels_are_refused_not_guessed():
    data = encode(Image.fromarray(np.ones((8, 8), np.float32) * 3.5, "F"), "TIFF")
    with pytest.raises(ImageError, match="floating-point"):
        decode(data)


def test_large_jpeg_is_draft_decoded_but_never_below_the_needed_side():
    data = jpeg_bytes(base_photo((1600, 1200)))
    assert decode(data).size == (1600, 1200)
    assert decode(data, min_side=256).size == (400, 300)  # 1/4 scale: still >= 256
    assert decode(data, min_side=600).size == (800, 600)  # 1/2 scale
    assert decode(data, min_side=1000).size == (1600, 1200)  # not twice the size: full


def test_draft_decode_stays_within_tolerance_of_full_decode():
    from imgfeat.models.preprocess import Preprocess

    photo = base_photo(None)
    data = jpeg_bytes(photo.resize((photo.width * 3, photo.height * 3), Image.LANCZOS))
    with_draft = Preprocess(size=(224, 224), crop_pct=0.875, interpolation="bicubic")
    full = Preprocess(size=(224, 224), crop_pct=0.875, interpolation="bicubic",
                      jpeg_draft=False)
    assert decode(data, min_side=with_draft.draft_side).size == (960, 641)  # drafted 1/2
    a = with_draft.geometry(decode(data, min_side=with_draft.draft_side)).astype(float)
    b = full.geometry(decode(data, min_side=full.draft_side)).astype(float)
    assert np.abs(a - b).mean() < 2.5
    a, b = a - a.mean(), b - b.mean()
    assert (a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b) > 0.999
