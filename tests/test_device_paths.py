"""Device JPEG decoding, run here on the CPU where its logic does not need a GPU (torchvision's
decode_jpeg runs on either): the resize that matches Pillow, routing, chunks and their memory,
the fallbacks, and the largest batch that fits. Tests marked `cuda` need a GPU and skip
elsewhere; bench/gpu_acceptance.py runs them."""

import io
import threading
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
import torchvision.io
from conftest import cuda
from corpus import photo_paths
from PIL import Image

from imgfeat.compute.extractor import Extractor
from imgfeat.errors import UsageError
from imgfeat.models.base import LoadedModel
from imgfeat.models.preprocess import Preprocess
from imgfeat.pipeline import device_resize, gpu_decode
from imgfeat.pipeline.batch_size import CPU_BATCH, GPU_BATCH_CAP, auto_batch, fit_batch
from imgfeat.pipeline.cpu_decode import pixels_from_bytes
from imgfeat.pipeline.decode_pool import Encoded
from imgfeat.pipeline.decode_route import DecodeSplit, device_pixels, key_point, scan_complete
from imgfeat.pipeline.device_resize import DeviceResizer, slice_bytes, split_tf32
from imgfeat.pipeline.gpu_decode import (
    DeviceDecoder,
    DeviceStage,
    chunk_ranges,
    decode_memory,
    resolve_decode,
)
from imgfeat.pipeline.shard_pipeline import ShardPipeline
from imgfeat.report.stage_times import OFF
from imgfeat.sources import Item
from imgfeat.store.layout import Layout

PREPROCESS = Preprocess(size=(64, 64), interpolation="bicubic")
# The CPU path decodes large JPEGs at a reduced scale (draft); nvJPEG decodes them whole.
WHOLE = replace(PREPROCESS, jpeg_draft=False)
CPU = torch.device("cpu")


def jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def encoded(data: bytes) -> Encoded:
    return Encoded(data, len(data))  # the pixel count only sizes the chunks


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return [jpeg(Image.open(p).convert("RGB")) for p in photo_paths()]


# -- resize and crop as Pillow does them --------------------------------------------------------


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(64, 64), (300, 200), (700, 700)])  # 700: upscale and pad
def test_device_resize_matches_pillow(interpolation, size):
    preprocess = Preprocess(size=size, interpolation=interpolation)
    resize = DeviceResizer(preprocess, CPU)
    for path in photo_paths()[:3]:
        image = Image.open(path).convert("RGB")
        planes = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        difference = np.abs(resize([planes])[0].numpy().astype(int)
                            - preprocess.geometry(image).astype(int))
        assert difference.max() <= 2 and difference.mean() < 0.05  # ties, rounded apart


def test_weights_stay_float32_exact_under_tf32():
    weights = device_resize.axis_weights(640, 256, 16, 224, "bicubic")
    high, low = split_tf32(weights)
    assert not (high.view(np.uint32) & 0x1FFF).any()  # fits TF32's 10 mantissa bits
    np.testing.assert_array_equal(high + low, weights.astype(np.float32))


def test_resize_in_slices_gives_the_same_rows_within_its_budget(monkeypatch):
    images = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((200, 150)))
                               .copy()).permute(2, 0, 1) for p in photo_paths()[:4]]
    whole = DeviceResizer(PREPROCESS, CPU)(images)
    budget = slice_bytes(2, 150, 200, 64, 64)  # two planes a slice: six slices
    monkeypatch.setattr(device_resize, "FLOAT_SLICE_BYTES", budget)
    stacked, real_stack = [], torch.stack
    monkeypatch.setattr(device_resize.torch, "stack",
                        lambda tensors: stacked.append(len(tensors)) or real_stack(tensors))
    sliced = DeviceResizer(PREPROCESS, CPU)(images)
    assert stacked == [2] * 6
    torch.testing.assert_close(sliced, whole, rtol=0, atol=0)


# -- which JPEGs the device takes ---------------------------------------------------------------


def test_only_complete_baseline_upright_rgb_or_grey_jpegs_go_to_the_device():
    photo = Image.open(photo_paths()[0]).convert("RGB")
    good = jpeg(photo)
    assert device_pixels(good, PREPROCESS, None) == photo.width * photo.height
    assert device_pixels(good + b"\0" * 64, PREPROCESS, None)  # padding after the end: fine
    assert device_pixels(jpeg(photo.convert("L")), PREPROCESS, None)
    assert device_pixels(jpeg(photo, progressive=True), PREPROCESS, None) is None
    assert device_pixels(good[:len(good) * 2 // 3], PREPROCESS, None) is None  # truncated
    assert device_pixels(jpeg(photo.convert("CMYK")), PREPROCESS, None) is None
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the CPU path applies it
    assert device_pixels(jpeg(photo, exif=exif), PREPROCESS, None) is None
    png = io.BytesIO()
    photo.save(png, "PNG")
    assert device_pixels(png.getvalue(), PREPROCESS, None) is None
    assert device_pixels(good, PREPROCESS, max_pixels=100) is None
    assert device_pixels(b"not an image", PREPROCESS, None) is None
    assert device_pixels(good, Preprocess(mode="pad"), None) is None


def test_a_scan_without_its_end_marker_looks_incomplete(jpegs):
    for data in jpegs:
        assert scan_complete(data)
        assert not scan_complete(data[:-2]) and not scan_complete(data[:len(data) // 2])


def test_decode_modes_by_device(monkeypatch):
    assert resolve_decode("auto", CPU) == "cpu"
    assert resolve_decode("auto", torch.device("cuda")) == "cpu"  # until a GPU run proves it
    assert resolve_decode("gpu", torch.device("cuda")) == "gpu"
    with pytest.raises(UsageError, match="--decode gpu"):
        resolve_decode("gpu", CPU)
    monkeypatch.setattr(gpu_decode, "AUTO_INCLUDES_GPU", True)
    assert resolve_decode("auto", torch.device("cuda")) == "auto"
    assert resolve_decode("auto", CPU) == "cpu"


def test_routing_follows_the_key_and_a_share_fixed_per_shard():
    keys = [f"folder/img{i:05d}.jpg" for i in range(4000)]
    assert all(DecodeSplit("gpu", cpu_threads=4).take(key) for key in keys)
    split = DecodeSplit("auto", cpu_threads=4)
    taken = {key for key in keys if split.take(key)}
    assert abs(len(taken) / len(keys) - 0.5) < 0.03
    # CPU: 4 threads at 10 ms an image = 400/s; device: 1200/s -> 3/4 to the device, but only
    # from the next shard on
    for _ in range(20):
        split.update(0.010, device_images=120, device_seconds=0.1)
    assert {key for key in keys if split.take(key)} == taken
    split.begin_shard()
    assert split.share == 0.75 and taken < {key for key in keys if split.take(key)}
    split.disable()
    assert not any(split.take(key) for key in keys)
    assert key_point("a/b.jpg") == key_point("a/b.jpg") != key_point("a/c.jpg")


def test_decode_routing_and_store_are_the_same_on_two_runs(tmp_path, monkeypatch):
    items = many_items(tmp_path)
    routed: list[set[str]] = []
    real = DeviceStage.wants

    def wants(self, key, data):
        pixels = real(self, key, data)
        if pixels is not None:
            with lock:
                routed[-1].add(key)
        return pixels

    lock = threading.Lock()
    monkeypatch.setattr(DeviceStage, "wants", wants)
    stores = []
    for run, threads in enumerate((1, 3)):  # other thread timing, same routing
        routed.append(set())
        with run_worker(tiny(), tmp_path / str(run), items, "auto", threads=threads) as store:
            stores.append((list(store["keys"]), store["features"][:]))
    assert routed[0] == routed[1] and 0 < len(routed[0]) < len(items)
    assert stores[0][0] == stores[1][0]
    np.testing.assert_array_equal(stores[0][1], stores[1][1])


# -- decoding in chunks, and what falls back to the CPU -----------------------------------------


def test_device_decoder_agrees_with_the_cpu_path(jpegs):
    decoded = DeviceDecoder(PREPROCESS, CPU)([encoded(data) for data in jpegs])
    for data, pixels in zip(jpegs, decoded):
        expected = pixels_from_bytes(data, WHOLE, None)
        assert pixels.shape == expected.shape == (64, 64, 3) and pixels.dtype == torch.uint8
        difference = np.abs(pixels.numpy().astype(int) - expected.astype(int))
        assert difference.max() <= 2 and difference.mean() < 0.01  # the same decoder here


def test_device_decoder_finds_the_bad_file_in_a_batch(jpegs):
    broken = jpegs[0][:len(jpegs[0]) // 3]  # truncated
    decoded = DeviceDecoder(PREPROCESS, CPU)([encoded(jpegs[1]), encoded(broken),
                                              encoded(jpegs[2])])
    assert decoded[0] is not None and decoded[2] is not None
    assert decoded[1] is None


def test_chunks_keep_to_their_pixel_budget(monkeypatch):
    monkeypatch.setattr(gpu_decode, "CHUNK_PIXELS", 100)
    pixels = [30, 30, 30, 30, 150, 10, 90, 20]
    runs = chunk_ranges(pixels)
    assert [list(run) for run in runs] == [[0, 1, 2], [3], [4], [5, 6], [7]]
    assert all(sum(pixels[i] for i in run) <= 100 or len(run) == 1 for run in runs)
    assert chunk_ranges([]) == []


def test_decode_memory_counts_a_chunk_its_resize_and_the_batch():
    fixed, per_row = decode_memory(Preprocess(size=(224, 224)))
    chunk = gpu_decode.CHUNK_PIXELS * (3 + gpu_decode.NVJPEG_BYTES_PER_PIXEL)
    assert fixed >= chunk + device_resize.FLOAT_SLICE_BYTES and per_row == 224 * 224 * 3
    # one plane of the largest photo the device takes, whatever the slice budget
    side = int(gpu_decode.DEVICE_MAX_PIXELS ** 0.5) + 1
    assert fixed >= chunk + slice_bytes(1, side, side, 224, 224)
    # and the batch that fits leaves it free
    peaks = {8: 1000 * 2**20 + 8 * 10 * 2**20, 32: 1000 * 2**20 + 32 * 10 * 2**20}
    free = 8_000 * 2**20
    assert fit_batch(peaks, free - fixed, extra_per_image=per_row) \
        < fit_batch(peaks, free) < GPU_BATCH_CAP


def test_out_of_memory_in_a_chunk_decodes_that_chunk_on_the_cpu_once_said(
        jpegs, monkeypatch, capsys):
    monkeypatch.setattr(gpu_decode, "CHUNK_PIXELS", 1)  # one image a chunk
    real, calls = torchvision.io.decode_jpeg, []

    def decode_jpeg(data, **options):
        calls.append(len(data) if isinstance(data, list) else 1)
        if len(calls) in (2, 4):
            raise RuntimeError("Error while decoding JPEG images: CUDA out of memory. Tried")
        return real(data, **options)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    stage = DeviceStage("gpu", WHOLE, CPU, None, cpu_threads=2)
    stage.held = [(row, encoded(data)) for row, data in enumerate(jpegs[:5])]
    batch = torch.zeros((5, 64, 64, 3), dtype=torch.uint8)
    filled, failed = stage.fill(batch, OFF)
    assert not failed and stage.split.share == 1.0  # not turned off
    for row, data in enumerate(jpegs[:5]):
        expected = pixels_from_bytes(data, WHOLE, None)
        assert np.abs(filled[row].numpy().astype(int) - expected.astype(int)).max() <= 2
    assert capsys.readouterr().err.count("ran out of memory") == 1


def test_a_decoder_that_fails_outright_is_turned_off_and_says_so(jpegs, monkeypatch, capsys):
    def broken(*_args, **_options):
        raise ValueError("nvJPEG is not there")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", broken)
    stage = DeviceStage("gpu", PREPROCESS, CPU, None, cpu_threads=2)
    stage.held = [(0, encoded(jpegs[0]))]
    filled, failed = stage.fill(torch.zeros((1, 64, 64, 3), dtype=torch.uint8), OFF)
    assert not failed and filled[0].any() and stage.split.share == 0
    assert "GPU JPEG decoding failed on cpu (ValueError: nvJPEG is not there)" \
        in capsys.readouterr().err


# -- a worker decoding on the device ------------------------------------------------------------


def extractor(**options) -> Extractor:
    torch.manual_seed(0)
    model = LoadedModel("test", timm.create_model("resnet18", pretrained=False), PREPROCESS,
                        "fc")
    return Extractor(model, ["pre_logits"], PREPROCESS, device=CPU, precision="fp32",
                     pool="avg", l2=False, dtype="float32", **options)


def many_items(folder: Path) -> list[Item]:
    """24 keys, one small photo: what goes where depends on the key alone."""
    path = folder / "small.jpg"
    path.write_bytes(jpeg(Image.open(photo_paths()[0]).convert("RGB").resize((160, 120))))
    return [Item(f"copy{i:03d}.jpg", str(path)) for i in range(24)]


@pytest.fixture(scope="module")
def model() -> Extractor:
    return extractor(freeze=False)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=4)
        self.fc = torch.nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def tiny() -> Extractor:
    torch.manual_seed(0)
    return Extractor(LoadedModel("tiny", Tiny(), PREPROCESS, "fc"), ["pre_logits"], PREPROCESS,
                     device=CPU, precision="fp32", pool="avg", l2=False, dtype="float32",
                     freeze=False)


def run_worker(model: Extractor, folder: Path, items: list[Item], decode: str,
               threads: int = 2) -> h5py.File:
    layout = Layout(folder)
    layout.shards_dir.mkdir(parents=True)
    worker = ShardPipeline(model, layout, batch_size=4, threads=threads, max_pixels=10**8,
                           decode=decode)
    try:
        worker.run_shard(0, items, lambda rows, errors: None)
    finally:
        worker.close()
    return h5py.File(layout.shard_file(0), "r")


def test_worker_with_device_decoding_keeps_every_image_and_error(model, tmp_path,
                                                                 mixed_corpus):
    folder, _expected = mixed_corpus
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".txt")
    broken_jpeg = tmp_path / "broken.jpg"
    broken_jpeg.write_bytes(photo_paths()[0].read_bytes()[:2000])
    items = [Item(str(p.relative_to(folder)), str(p)) for p in paths]
    items.append(Item("broken.jpg", str(broken_jpeg)))
    with run_worker(model, tmp_path / "cpu", items, "cpu") as cpu, \
            run_worker(model, tmp_path / "gpu", items, "gpu") as device:
        assert list(device["keys"]) == list(cpu["keys"])
        assert sorted(device["errors/keys"]) == sorted(cpu["errors/keys"])
        assert cosine_min(cpu["features"][:], device["features"][:]) > 0.999


# -- the batch that fits ------------------------------------------------------------------------


def test_fit_batch_takes_the_largest_that_fits():
    mib = 2**20
    peaks = {8: 1000 * mib + 8 * 10 * mib, 32: 1000 * mib + 32 * 10 * mib}
    assert fit_batch(peaks, free=10_000 * mib, headroom=0.8) == 696  # (8000 - 1000) / 10
    assert fit_batch(peaks, free=10_000 * mib, headroom=0.8, extra_per_image=10 * mib) == 344
    assert fit_batch(peaks, free=10**15) == GPU_BATCH_CAP
    assert fit_batch(peaks, free=1005 * mib, headroom=1.0) == 1  # never 0
    assert fit_batch(peaks, free=0) == 1


def test_auto_batch_on_cpu_is_the_measured_best(model):
    assert auto_batch(model) == CPU_BATCH


# -- on a CUDA device (skipped elsewhere) -------------------------------------------------------


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@cuda
def test_nvjpeg_agrees_with_the_cpu_path(jpegs):
    decoded = DeviceDecoder(PREPROCESS, torch.device("cuda"),
                            torch.cuda.Stream())([encoded(data) for data in jpegs])
    for data, pixels in zip(jpegs, decoded):
        assert pixels.is_cuda
        difference = np.abs(pixels.cpu().numpy().astype(int)
                            - pixels_from_bytes(data, WHOLE, None).astype(int))
        assert difference.mean() < 1.5  # nvJPEG's IDCT and chroma upsampling are its own


@cuda
def test_device_batches_are_ordered_against_the_pass_in_flight(jpegs):
    """Decode batch k+1 while batch k's pass is queued: the pass's features must be those of
    the batch run alone (nvJPEG wrote into no memory the pass still used), and each batch
    the rows decoded alone."""
    device = torch.device("cuda")
    model = LoadedModel("test", timm.create_model("resnet50", pretrained=False), PREPROCESS,
                        "fc")
    run = Extractor(model, ["pre_logits"], PREPROCESS, device=device, precision="fp32",
                    pool="avg", l2=False, dtype="float32")
    stage = DeviceStage("gpu", PREPROCESS, device, None, cpu_threads=2)
    items = [encoded(data) for data in jpegs] * 16
    expected_rows = torch.stack(DeviceDecoder(PREPROCESS, device, torch.cuda.Stream())(items))
    expected_rows = expected_rows.cpu()
    expected = run(expected_rows)["pre_logits"]
    pending = batch = None
    for _ in range(6):
        stage.held = list(enumerate(items))
        following, failed = stage.fill(torch.zeros((len(items), 64, 64, 3),
                                                   dtype=torch.uint8).pin_memory(), OFF)
        assert not failed
        if pending is not None:  # decoded while it ran
            assert cosine_min(pending.result()["pre_logits"], expected) > 0.99999
            assert torch.equal(batch.cpu(), expected_rows)
        batch, pending = following, run.launch(following)
    assert cosine_min(pending.result()["pre_logits"], expected) > 0.99999


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
    assert cosine_min(gpu.features(), cpu.features()) > 0.999


@cuda
def test_auto_batch_on_cuda_fits_is_large_and_leaves_room_for_decoding():
    torch.manual_seed(0)
    model = LoadedModel("test", timm.create_model("resnet18", pretrained=False), PREPROCESS,
                        "fc")
    extractor = Extractor(model, ["pre_logits"], PREPROCESS, device=torch.device("cuda"),
                          precision="bf16", pool="avg", l2=False, dtype="float32")
    size = auto_batch(extractor)
    assert 64 <= size <= GPU_BATCH_CAP
    extractor(torch.zeros((size, 64, 64, 3), dtype=torch.uint8))  # it does fit
    free, _ = torch.cuda.mem_get_info()
    assert auto_batch(extractor, reserve=(free // 2, 0)) < size or size == GPU_BATCH_CAP
