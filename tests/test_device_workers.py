"""A GPU worker's own conduct, checked on the CPU where its logic allows: out-of-memory retries
that free the failed batch, the devices a worker process sees, its decode threads under Ray,
backend settings, an ONNX model that cannot reach CUDA, and --compile's batch sizes and
errors."""

import multiprocessing as mp
import os
import shutil
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from conftest import cuda
from corpus import photo_paths
from PIL import Image

from imgfeat.compute import torch_compile as compiled
from imgfeat.compute.device import tune_backends
from imgfeat.compute.extractor import Extractor
from imgfeat.engine.placement import Placement, own_device_only
from imgfeat.engine.ray_engine import node_decode_threads, ray_placements
from imgfeat.models.base import LoadedModel
from imgfeat.models.layers import Tap
from imgfeat.models.preprocess import Preprocess
from imgfeat.pipeline.shard_pipeline import Done, ShardPipeline
from imgfeat.sources import Item
from imgfeat.store.layout import Layout

SMALL = Preprocess(size=(16, 16))
OUT_OF_MEMORY = torch.cuda.OutOfMemoryError


# -- out of memory ------------------------------------------------------------------------------


class Activations:
    """Stands for the tensors a pass holds."""


class SmallDevice:
    """A model side whose device holds passes of at most `fits` images. A pass that does not
    fit fails with its activations alive in its frame, so in the traceback, as a real one
    does; every pass first counts how many failed passes' activations are still alive."""

    device, preprocess, dtype = torch.device("cpu"), SMALL, np.dtype("float32")
    feature_shapes = {"mean": (1,)}

    def __init__(self, fits: int):
        self.fits, self.sizes, self.alive_at_start = fits, [], []
        self._failed: list[weakref.ref] = []

    def launch(self, batch: torch.Tensor) -> Done:
        self.alive_at_start.append(sum(ref() is not None for ref in self._failed))
        self.sizes.append(len(batch))
        activations = Activations()
        if len(batch) > self.fits:
            self._failed.append(weakref.ref(activations))
            raise OUT_OF_MEMORY("CUDA out of memory (simulated)")
        return Done({"mean": batch.float().mean((1, 2, 3)).numpy()[:, None]})

    def __call__(self, batch: torch.Tensor):
        return self.launch(batch).result()

    def identity(self) -> dict:  # what each shard records (store/manifest.identity_digest)
        return {"model": {"spec": "small-device"}, "layers": {"mean": [1]}}


@pytest.fixture(scope="module")
def small_jpegs(tmp_path_factory) -> list[Item]:
    folder = tmp_path_factory.mktemp("small")
    photo = Image.open(photo_paths()[0]).convert("RGB")
    items = []
    for i in range(10):
        path = folder / f"img{i}.jpg"
        photo.crop((i * 10, 0, 200 + i * 10, 150)).resize((40, 30)).save(path, quality=90)
        items.append(Item(path.name, str(path)))
    return items


def test_out_of_memory_retry_frees_the_failed_batch_first(tmp_path, small_jpegs):
    model = SmallDevice(fits=2)
    pipeline = ShardPipeline(model, Layout(tmp_path), batch_size=8, threads=2, max_pixels=None)
    try:
        result = pipeline.run_shard(0, small_jpegs, lambda rows, errors: None)
    finally:
        pipeline.close()
    assert result.rows == len(small_jpegs) and model.sizes[:3] == [8, 4, 2]
    assert not any(model.alive_at_start)  # each retry began with the failed pass gone


def test_a_halved_batch_holds_for_the_shard_and_the_next_shard_tries_the_full_size(
        tmp_path, small_jpegs):
    model = SmallDevice(fits=3)
    pipeline = ShardPipeline(model, Layout(tmp_path), batch_size=8, threads=2, max_pixels=None)
    try:
        pipeline.run_shard(0, small_jpegs, lambda rows, errors: None)
        assert pipeline.batch_size == 2 and max(model.sizes[2:]) <= 2
        model.sizes.clear()
        pipeline.run_shard(1, small_jpegs, lambda rows, errors: None)
    finally:
        pipeline.close()
    assert model.sizes[:3] == [8, 4, 2] and pipeline.batch_size == 2


def test_a_failed_pass_leaves_no_tapped_tensor_behind():
    class Boom(torch.nn.Module):
        def forward(self, x):
            raise OUT_OF_MEMORY("CUDA out of memory (simulated)")

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), Boom())
    tap = Tap(LoadedModel("boom", module, SMALL, None), ["0", "1"])
    with pytest.raises(OUT_OF_MEMORY):
        tap(torch.zeros(2, 3, 16, 16))
    assert tap._tensors == {}


# -- the devices a worker sees ------------------------------------------------------------------


def test_a_worker_is_given_only_its_own_gpu():
    environ = {}
    assert own_device_only(Placement("cuda:2", 4, 4), environ).device == "cuda:0"
    assert environ["CUDA_VISIBLE_DEVICES"] == "2"
    environ = {"CUDA_VISIBLE_DEVICES": "4, 6"}  # indices count among the parent's devices
    assert own_device_only(Placement("cuda:1", 4, 4), environ).device == "cuda:0"
    assert environ["CUDA_VISIBLE_DEVICES"] == "6"
    environ = {"CUDA_VISIBLE_DEVICES": "GPU-3f2a,GPU-77b0"}
    own_device_only(Placement("cuda:0", 4, 4), environ)
    assert environ["CUDA_VISIBLE_DEVICES"] == "GPU-3f2a"
    environ = {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert own_device_only(Placement("cpu", 2, 2), environ).device == "cpu"
    assert environ["CUDA_VISIBLE_DEVICES"] == ""  # a CPU worker touches no GPU


def spawned_view(placement: Placement, count_devices: bool = False):
    from worker_view import report_view

    context = mp.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=report_view, args=(placement, results, count_devices))
    process.start()
    try:
        view = results.get(timeout=120)
        assert results.get(timeout=60) == ("fatal", 0, "seen")
    finally:
        process.join(timeout=60)
    return view


def test_the_spawned_worker_sees_its_own_device_before_cuda_starts(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert spawned_view(Placement("cuda:1", 1, 1)) == ("view", "7", "cuda:0", None)


@cuda
def test_the_spawned_worker_counts_one_gpu():
    last = f"cuda:{torch.cuda.device_count() - 1}"
    _, _visible, device, count = spawned_view(Placement(last, 1, 1), count_devices=True)
    assert device == "cuda:0" and count == 1


def test_ray_gpu_actors_decode_with_their_nodes_cpus_per_gpu():
    ray = SimpleNamespace(
        cluster_resources=lambda: {"CPU": 104.0, "GPU": 16.0},
        get_runtime_context=lambda: SimpleNamespace(get_node_id=lambda: "big"),
        nodes=lambda: [{"NodeID": "small", "Resources": {"CPU": 8.0, "GPU": 8.0}},
                       {"NodeID": "big", "Resources": {"CPU": 96.0, "GPU": 8.0}}])
    placements = ray_placements(ray, "cuda", None)
    assert len(placements) == 16 and {p.decode_threads for p in placements} == {0}  # per node
    assert node_decode_threads(ray) == 12
    assert {p.decode_threads for p in ray_placements(ray, "auto", 6)} == {6}  # --threads


# -- backend settings and model files -----------------------------------------------------------


def test_cuda_workers_tune_cudnn_and_allow_tf32_only_under_auto():
    saved = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    try:
        torch.backends.cudnn.benchmark = False
        torch.set_float32_matmul_precision("highest")
        tune_backends(torch.device("cpu"), "auto")
        assert not torch.backends.cudnn.benchmark
        tune_backends(torch.device("cuda"), "fp32")  # sets flags only: no GPU needed
        assert torch.backends.cudnn.benchmark
        assert torch.get_float32_matmul_precision() == "highest"
        tune_backends(torch.device("cuda"), "auto")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.set_float32_matmul_precision(saved[1])


def test_an_onnx_model_on_cuda_without_the_cuda_provider_says_so_in_one_line(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    from imgfeat.models.file_backend import OnnxTap

    path = tmp_path / "tiny.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 2, 3), (torch.zeros(1, 3, 8, 8),), path,
                      input_names=["input"], output_names=["output"], dynamo=False)
    OnnxTap(path, "input", "output", ["output"], torch.device("cuda"))
    err = capsys.readouterr().err.strip()
    assert err == ("imgfeat: tiny.onnx runs on the CPU, not cuda: this onnxruntime has no CUDA "
                   "provider (pip install onnxruntime-gpu)")


# -- --compile ----------------------------------------------------------------------------------


def features(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"mean": pixels.float().mean((1, 2, 3))[:, None]}


@pytest.fixture
def compiler(monkeypatch):
    """torch.compile replaced by a recorder: the sizes that reach the compiled graph, with
    `fail[size]` raised for a size."""
    record = SimpleNamespace(sizes=[], fail={})

    def compile_(fn, **_options):
        def run(pixels):
            record.sizes.append(len(pixels))
            if len(pixels) in record.fail:
                raise record.fail[len(pixels)]
            return fn(pixels)
        return run

    monkeypatch.setattr(compiled.torch, "compile", compile_)
    return record


def batch(count: int) -> torch.Tensor:
    return torch.arange(count * 12, dtype=torch.float32).reshape(count, 3, 2, 2)


def test_compile_runs_each_batch_size_once_and_pads_short_batches(compiler):
    model = compiled.Compiled(features)
    for count in (8, 5, 8, 3):
        torch.testing.assert_close(model(batch(count)), features(batch(count)))
    assert compiler.sizes == [8, 8, 8, 8]  # one graph: the short batches padded to 8
    compiler.fail[8] = OUT_OF_MEMORY("CUDA out of memory (simulated)")
    with pytest.raises(OUT_OF_MEMORY):
        model(batch(8))
    for count in (4, 3, 4):  # the worker's halves: a graph of their own, not padding to 8
        torch.testing.assert_close(model(batch(count)), features(batch(count)))
    del compiler.fail[8]
    model(batch(8))  # the next shard tries the full size again: the graph it had
    model(batch(5))
    assert compiler.sizes[4:] == [8, 4, 4, 4, 8, 8] and set(compiler.sizes) == {4, 8}


def test_compile_past_its_sizes_runs_new_sizes_eagerly_and_says_so(compiler, monkeypatch,
                                                                      capsys):
    monkeypatch.setattr(compiled, "MAX_SIZES", 2)
    model = compiled.Compiled(features)
    for count in (2, 4, 8, 16, 3):
        torch.testing.assert_close(model(batch(count)), features(batch(count)))
    assert compiler.sizes == [2, 4, 4]  # 8 and 16 eager, 3 padded to 4
    assert capsys.readouterr().err.count("--compile has compiled 2 batch sizes") == 1


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
])
def test_compile_reports_device_errors_as_errors(compiler, error):
    model = compiled.Compiled(features)
    model(batch(4))
    compiler.fail[4] = error
    with pytest.raises(RuntimeError, match="CUDA error|cuDNN error"):
        model(batch(4))
    compiler.fail[2] = error  # even while compiling a new size
    with pytest.raises(RuntimeError):
        model(batch(2))
    assert model.failure is None


def test_compile_out_of_memory_wrapped_by_the_compiler_still_halves(compiler):
    try:
        raise OUT_OF_MEMORY("CUDA out of memory (simulated)")
    except OUT_OF_MEMORY as cause:
        wrapped = RuntimeError("backend compiler failed")
        wrapped.__cause__ = cause
    compiler.fail[4] = wrapped
    with pytest.raises(OUT_OF_MEMORY):
        compiled.Compiled(features)(batch(4))


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


def extractor(device: str = "cpu", precision: str = "fp32", **options) -> Extractor:
    torch.manual_seed(0)
    preprocess = Preprocess(size=(64, 64))
    model = LoadedModel("test", timm.create_model("resnet18", pretrained=False), preprocess,
                        "fc")
    return Extractor(model, ["pre_logits"], preprocess, device=torch.device(device),
                     precision=precision, pool="avg", l2=False, dtype="float32", **options)


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


@cuda
@pytest.mark.slow
def test_compile_on_cuda_gives_the_eager_features():
    compiled_model = extractor("cuda", "bf16", compile=True)
    eager = extractor("cuda", "bf16")
    pixels = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8)
    a, b = compiled_model(pixels)["pre_logits"], eager(pixels)["pre_logits"]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99 and compiled_model._run.failure is None


def test_a_worker_that_ends_leaves_no_named_semaphore_behind():
    """Workers end with os._exit (the interpreter's teardown took a second), but after the
    exit handlers: multiprocessing's unlink the named semaphores of the decode pool's queues,
    which were left in /dev/shm (this test's tracker, pytest's, would remove them only when
    pytest ends)."""
    from worker_view import lock_then_exit

    context = mp.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=lock_then_exit, args=(results,))
    process.start()
    name = results.get(timeout=120)
    process.join(timeout=120)
    assert process.exitcode == 0
    assert not os.path.exists(f"/dev/shm/sem.{name.lstrip('/')}")
