"""Each shortcut the CPU pipeline takes gives the result of the plain way within rounding:
resizing only the cropped region, the frozen model graph; and the CPU worker's thread set-up."""

import os
import sys
import threading

import numpy as np
import pytest
import timm
import torch
from corpus import photo_paths
from PIL import Image
from torchvision.transforms import functional as F

from imgfeat.compute.extractor import Extractor
from imgfeat.models.base import LoadedModel
from imgfeat.models.preprocess import INTERPOLATIONS, Preprocess
from imgfeat.pipeline.core_split import cpu_decode_threads, decode_cores
from imgfeat.pipeline.cpu_decode import decode
from imgfeat.pipeline.host_memory import keep_freed_memory
from imgfeat.pipeline.shard_pipeline import DECODE_NICENESS, ShardPipeline


def resize_then_crop(preprocess: Preprocess, image: Image.Image) -> np.ndarray:
    resample, scale = INTERPOLATIONS[preprocess.interpolation], preprocess.scale_size
    if scale[0] == scale[1]:
        image = F.resize(image, scale[0], interpolation=resample)
    else:
        ratio = max(scale[0] / image.height, scale[1] / image.width)
        image = F.resize(image, [round(image.height * ratio), round(image.width * ratio)],
                         interpolation=resample)
    return np.asarray(F.center_crop(image, list(preprocess.size)))


@pytest.mark.parametrize("preprocess", [
    Preprocess(interpolation="bicubic"), Preprocess(), Preprocess(crop_pct=1.0),
    Preprocess(size=(160, 240), crop_pct=0.9), Preprocess(interpolation="lanczos"),
    Preprocess(size=(299, 299), interpolation="nearest"), Preprocess(interpolation="box"),
], ids=lambda p: f"{p.size[0]}x{p.size[1]}-{p.crop_pct}-{p.interpolation}")
def test_crop_region_resize_matches_resize_then_crop(preprocess):
    images = [decode(p.read_bytes(), None) for p in photo_paths()]
    images += [images[0].resize((230, 230)), images[1].resize((120, 90))]  # near and upscaled
    for image in images:
        fast, plain = preprocess.geometry(image), resize_then_crop(preprocess, image)
        assert fast.shape == plain.shape == (*preprocess.size, 3)
        difference = np.abs(fast.astype(int) - plain.astype(int))
        assert difference.max() <= 4 and (difference > 1).mean() < 1e-3


def extractor_for(module: torch.nn.Module, *, freeze: bool, layers=("pre_logits",),
                  classifier="fc") -> Extractor:
    model = LoadedModel("test", module, Preprocess(size=(64, 64)), classifier)
    return Extractor(model, list(layers), model.preprocess, device=torch.device("cpu"),
                     precision="fp32", pool="avg", l2=False, dtype="float32", freeze=freeze)


@pytest.mark.parametrize("layers", [("pre_logits",), ("layer2", "layer3")])
def test_frozen_graph_gives_the_eager_features(layers):
    def resnet():
        torch.manual_seed(0)
        return timm.create_model("resnet18", pretrained=False)

    frozen = extractor_for(resnet(), freeze=True, layers=layers)
    eager = extractor_for(resnet(), freeze=False, layers=layers)
    assert frozen.frozen and not eager.frozen
    pixels = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8)
    got, expected = frozen(pixels), eager(pixels)
    assert got.keys() == expected.keys() == set(layers)
    for layer in layers:
        np.testing.assert_allclose(got[layer], expected[layer], rtol=1e-3, atol=1e-4)


class BatchDependent(torch.nn.Module):
    """Branches on the batch size in Python: a trace would bake one branch in."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x):
        x = self.conv(x).mean((2, 3))
        if x.shape[0] == 2:
            x = x * 2
        return self.fc(x)


def test_a_model_that_traces_wrongly_stays_eager():
    extractor = extractor_for(BatchDependent(), freeze=True)
    assert not extractor.frozen
    pixels = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    assert extractor(pixels)["pre_logits"].shape == (3, 8)


def test_cpu_cores_split_between_model_and_decoding():
    assert cpu_decode_threads(model_threads=1, cores=2) == 1  # a pipeline: a core each
    assert cpu_decode_threads(model_threads=3, cores=4) == 1
    assert cpu_decode_threads(model_threads=2, cores=2) == 2  # in the model's gaps


def test_cores_go_where_they_run_most_images():
    # ResNet-50, fp32 and bf16: the model is the bottleneck; it shares every core
    assert decode_cores(model_rate=20, decode_rate=450, cores=2) == 0
    assert decode_cores(model_rate=43, decode_rate=450, cores=2) == 0
    # MobileNetV3-small, fp32 and bf16: a core decodes, a core runs the model
    assert decode_cores(model_rate=950, decode_rate=450, cores=2) == 1
    assert decode_cores(model_rate=1150, decode_rate=450, cores=2) == 1
    assert decode_cores(model_rate=5000, decode_rate=450, cores=2) == 1  # never every core
    assert decode_cores(model_rate=3000, decode_rate=450, cores=8) == 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority: Linux")
@pytest.mark.parametrize("yields", [True, False])
def test_decode_threads_yield_to_the_model_when_asked(tmp_path, yields):
    extractor = extractor_for(BatchDependent(), freeze=False)
    worker = ShardPipeline(extractor, None, batch_size=2, threads=2, max_pixels=None,
                    yield_to_model=yields)
    try:
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        theirs = worker._pool.submit(
            lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    finally:
        worker.close()
    assert theirs == (min(19, mine + DECODE_NICENESS) if yields else mine)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_allocator_keeps_freed_memory_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert keep_freed_memory()


def test_resizing_in_a_decode_thread_leaves_the_model_its_threads():
    from concurrent.futures import ThreadPoolExecutor

    image = decode(photo_paths()[0].read_bytes(), None)
    before = torch.get_num_threads()
    with ThreadPoolExecutor(1) as pool:
        in_thread = pool.submit(lambda: (Preprocess(interpolation="bicubic").geometry(image),
                                         torch.get_num_threads())).result()[1]
    assert in_thread == 1 and torch.get_num_threads() == before
