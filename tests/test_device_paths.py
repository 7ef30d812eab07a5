"""The GPU-side options, run here on the CPU where their logic does not need a GPU: the
device JPEG decoder (torchvision's decode_jpeg, which runs on either), its share of the work,
the largest batch that fits, and --compile."""

import io
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from corpus import photo_paths
from PIL import Image

from imgfeat.compute import torch_compile as compiled
from imgfeat.compute.extractor import Extractor
from imgfeat.errors import UsageError
from imgfeat.models.base import LoadedModel
from imgfeat.models.preprocess import Preprocess
from imgfeat.pipeline.batch_size import CPU_BATCH, GPU_BATCH_CAP, auto_batch, fit_batch
from imgfeat.pipeline.cpu_decode import pixels_from_bytes
from imgfeat.pipeline.gpu_decode import (
    DecodeSplit,
    DeviceDecoder,
    device_decodable,
    resolve_decode,
)
from imgfeat.pipeline.shard_pipeline import ShardPipeline
from imgfeat.sources import Item
from imgfeat.store.layout import Layout

PREPROCESS = Preprocess(size=(64, 64), interpolation="bicubic")


def jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return [jpeg(Image.open(p).convert("RGB")) for p in photo_paths()]


def test_device_decoder_agrees_with_the_cpu_path(jpegs):
    decoded = DeviceDecoder(PREPROCESS, torch.device("cpu"))(jpegs)
    for data, pixels in zip(jpegs, decoded):
        expected = pixels_from_bytes(data, PREPROCESS, None)
        assert pixels.shape == expected.shape == (64, 64, 3) and pixels.dtype == torch.uint8
        difference = np.abs(pixels.numpy().astype(int) - expected.astype(int))
        assert difference.mean() < 3  # two decoders, two antialiasing filters


def test_device_decoder_finds_the_bad_file_in_a_batch(jpegs):
    broken = jpegs[0][:len(jpegs[0]) // 3]  # truncated
    decoded = DeviceDecoder(PREPROCESS, torch.device("cpu"))([jpegs[1], broken, jpegs[2]])
    assert decoded[0] is not None and decoded[2] is not None
    assert decoded[1] is None


def test_only_upright_rgb_or_grey_jpegs_within_limits_go_to_the_device():
    photo = Image.open(photo_paths()[0]).convert("RGB")
    assert device_decodable(jpeg(photo), PREPROCESS, None)
    assert device_decodable(jpeg(photo.convert("L")), PREPROCESS, None)
    assert not device_decodable(jpeg(photo.convert("CMYK")), PREPROCESS, None)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the CPU path applies it
    assert not device_decodable(jpeg(photo, exif=exif), PREPROCESS, None)
    png = io.BytesIO()
    photo.save(png, "PNG")
    assert not device_decodable(png.getvalue(), PREPROCESS, None)
    assert not device_decodable(jpeg(photo), PREPROCESS, max_pixels=100)
    assert not device_decodable(b"not an image", PREPROCESS, None)
    assert not device_decodable(jpeg(photo), Preprocess(mode="pad"), None)


def test_decode_modes_by_device():
    assert resolve_decode("auto", torch.device("cpu")) == "cpu"
    assert resolve_decode("cpu", torch.device("cpu")) == "cpu"
    with pytest.raises(UsageError, match="--decode gpu"):
        resolve_decode("gpu", torch.device("cpu"))


def test_split_spreads_its_share_and_follows_the_rates():
    everything = DecodeSplit("gpu", cpu_threads=4)
    assert all(everything.take() for _ in range(10))
    split = DecodeSplit("auto", cpu_threads=4)
    split.share = 0.25
    assert sum(split.take() for _ in range(100)) == 25
    # CPU: 4 threads at 10 ms an image = 400/s; device: 1200/s -> 3/4 to the device
    for _ in range(20):
        split.update(0.010, device_images=120, device_seconds=0.1)
    assert split.share == pytest.approx(0.75, abs=0.01)
    split.disable()
    assert not any(split.take() for _ in range(10))


def extractor(**options) -> Extractor:
    torch.manual_seed(0)
    model = LoadedModel("test", timm.create_model("resnet18", pretrained=False), PREPROCESS,
                        "fc")
    return Extractor(model, ["pre_logits"], PREPROCESS, device=torch.device("cpu"),
                     precision="fp32", pool="avg", l2=False, dtype="float32", **options)


def run_worker(folder: Path, items: list[Item], decode: str) -> h5py.File:
    layout = Layout(folder)
    layout.shards_dir.mkdir(parents=True)
    worker = ShardPipeline(extractor(freeze=False), layout, batch_size=4, threads=2,
                    max_pixels=10**8, decode=decode)
    try:
        worker.run_shard(0, items, lambda rows, errors: None)
    finally:
        worker.close()
    return h5py.File(layout.shard_file(0), "r")


def test_worker_with_device_decoding_keeps_every_image_and_error(tmp_path, mixed_corpus):
    folder, _expected = mixed_corpus
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".txt")
    broken_jpeg = tmp_path / "broken.jpg"
    broken_jpeg.write_bytes(photo_paths()[0].read_bytes()[:2000])
    items = [Item(str(p.relative_to(folder)), str(p)) for p in paths]
    items.append(Item("broken.jpg", str(broken_jpeg)))
    with run_worker(tmp_path / "cpu", items, "cpu") as cpu, \
            run_worker(tmp_path / "gpu", items, "gpu") as device:
        assert list(device["keys"]) == list(cpu["keys"])
        assert sorted(device["errors/keys"]) == sorted(cpu["errors/keys"])
        a, b = cpu["features"][:], device["features"][:]
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() > 0.99


def test_fit_batch_takes_the_largest_that_fits():
    mib = 2**20
    peaks = {8: 1000 * mib + 8 * 10 * mib, 32: 1000 * mib + 32 * 10 * mib}
    assert fit_batch(peaks, free=10_000 * mib, headroom=0.8) == 696  # (8000 - 1000) / 10
    assert fit_batch(peaks, free=10**15) == GPU_BATCH_CAP
    assert fit_batch(peaks, free=1005 * mib, headroom=1.0) == 1  # never 0


def test_auto_batch_on_cpu_is_the_measured_best():
    assert auto_batch(extractor(freeze=False)) == CPU_BATCH


def test_compile_failure_runs_eagerly(monkeypatch, capsys):
    def broken(fn, **_options):
        def call(*args):
            raise RuntimeError("no compiler here\nmore lines")
        return call

    monkeypatch.setattr(compiled.torch, "compile", broken)
    model = extractor(compile=True)
    pixels = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    expected = extractor(freeze=False)(pixels)["pre_logits"]
    np.testing.assert_allclose(model(pixels)["pre_logits"], expected, rtol=1e-4, atol=1e-5)
    assert "--compile failed (RuntimeError: no compiler here); running eagerly" \
        in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on CPU needs a C compiler")
def test_compile_gives_the_eager_features_and_pads_short_batches(capsys):
    model, eager = extractor(compile=True), extractor(freeze=False)
    for count in (4, 3):  # the second is padded to the first's compiled shape
        pixels = torch.randint(0, 256, (count, 64, 64, 3), dtype=torch.uint8)
        got = model(pixels)["pre_logits"]
        assert got.shape == (count, 512)
        np.testing.assert_allclose(got, eager(pixels)["pre_logits"], rtol=1e-3, atol=1e-3)
    assert model._run.failure is None, capsys.readouterr().err


# -- on a CUDA device (skipped elsewhere) ---------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@cuda
def test_nvjpeg_agrees_with_the_cpu_path(jpegs):
    decoded = DeviceDecoder(PREPROCESS, torch.device("cuda"))(jpegs)
    for data, pixels in zip(jpegs, decoded):
        assert pixels.is_cuda
        difference = np.abs(pixels.cpu().numpy().astype(int)
                            - pixels_from_bytes(data, PREPROCESS, None).astype(int))
        assert difference.mean() < 3


@cuda
@pytest.mark.parametrize("decode", ["gpu", "auto"])
def test_gpu_runs_keep_every_image_and_match_cpu(tmp_path, mixed_corpus, decode):
    import imgfeat

    folder, _expected = mixed_corpus
    options = dict(model="timm:resnet18", weights="random", image_size=64, progress="none",
                   precision="fp32", dtype="float32")
    cpu = imgfeat.extract(str(folder), tmp_path / "cpu", devices="cpu", **options)
    gpu = imgfeat.extract(str(folder), tmp_path / "gpu", devices="cuda", decode=decode,
                          batch_size=None, **options)
    assert gpu.keys == cpu.keys
    assert sorted(key for key, _ in gpu.errors) == sorted(key for key, _ in cpu.errors)
    assert cosine_min(gpu.features(), cpu.features()) > 0.99


@cuda
def test_auto_batch_on_cuda_fits_and_is_large():
    torch.manual_seed(0)
    model = LoadedModel("test", timm.create_model("resnet18", pretrained=False), PREPROCESS,
                        "fc")
    extractor = Extractor(model, ["pre_logits"], PREPROCESS, device=torch.device("cuda"),
                          precision="bf16", pool="avg", l2=False, dtype="float32")
    size = auto_batch(extractor)
    assert 64 <= size <= GPU_BATCH_CAP
    extractor(torch.zeros((size, 64, 64, 3), dtype=torch.uint8))  # it does fit


@cuda
@pytest.mark.slow
def test_compile_on_cuda_gives_the_eager_features():
    def build(**options):
        torch.manual_seed(0)
        model = LoadedModel("test", timm.create_model("resnet18", pretrained=False),
                            PREPROCESS, "fc")
        return Extractor(model, ["pre_logits"], PREPROCESS, device=torch.device("cuda"),
                         precision="bf16", pool="avg", l2=False, dtype="float32", **options)

    compiled_model, eager = build(compile=True), build()
    pixels = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8)
    assert cosine_min(compiled_model(pixels)["pre_logits"], eager(pixels)["pre_logits"]) > 0.99
    assert compiled_model._run.failure is None
