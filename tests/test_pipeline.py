"""How a run proceeds: planning streams alongside extraction, progress, devices, precision."""

import io
import threading
import time

import numpy as np
from conftest import cuda
from corpus import photo_paths

import imgfeat
import imgfeat.run
from imgfeat.report.progress import Reporter
from imgfeat.sources import Item

OPTIONS = dict(model="timm:resnet18", weights="random", image_size=64, batch_size=2,
               progress="none")


def test_extraction_starts_before_the_listing_ends(tmp_path, monkeypatch):
    """A source that only goes on once the first shard is committed: a run that listed
    everything before extracting would wait forever (here: fail after a timeout)."""
    out = tmp_path / "out"
    photos = photo_paths()
    first_shard = out / "shards" / "shard-000000.h5"

    def slow_listing(sources, *_, **__):  # (sources, source options, tally, after)
        for path in photos[:2]:
            yield Item(path.name, str(path))
        deadline = time.monotonic() + 60
        while not first_shard.exists():
            assert time.monotonic() < deadline, "listing was not streamed"
            time.sleep(0.05)
        for path in photos[2:4]:
            yield Item(path.name, str(path))

    monkeypatch.setattr(imgfeat.run, "iter_items", slow_listing)
    store = imgfeat.extract(str(tmp_path), out, shard_size=2, **OPTIONS)
    assert store.keys == [p.name for p in photos[:4]]
    assert store.manifest["plan"] == {"complete": True, "items": 4, "shards": [2, 2]}


def test_progress_bar_shows_rate_and_errors():
    stream = io.StringIO()
    reporter = Reporter("bar", stream=stream)
    reporter.start(total=10)
    reporter.advance(6, 1)
    reporter.summary("done: 7 images")
    text = stream.getvalue()
    assert "7/10" in text and "img/s" in text and "1 errors" in text and "done: 7" in text


def test_progress_lines_are_periodic():
    stream = io.StringIO()
    reporter = Reporter("lines", stream=stream, interval=0)
    reporter.start(total=None)
    reporter.advance(3, 0)
    reporter.set_total(10)
    reporter.advance(2, 1)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("extract: 3 images")
    assert lines[1].startswith("extract: 6/10 images (60.0%)") and "eta" in lines[1]


def test_bf16_on_cpu_is_close_to_fp32(tmp_path, photos):
    fp32 = imgfeat.extract(str(photos), tmp_path / "a", precision="fp32", **OPTIONS)
    bf16 = imgfeat.extract(str(photos), tmp_path / "b", precision="bf16", **OPTIONS)
    a, b = np.asarray(fp32.features(), np.float32), np.asarray(bf16.features(), np.float32)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert bf16.manifest["precision"] == "bf16" and cos.min() > 0.98


def test_batch_size_does_not_change_features(tmp_path, photos):
    one = imgfeat.extract(str(photos), tmp_path / "a", **{**OPTIONS, "batch_size": 1})
    five = imgfeat.extract(str(photos), tmp_path / "b", **{**OPTIONS, "batch_size": 5})
    np.testing.assert_allclose(np.asarray(one.features(), np.float32),
                               np.asarray(five.features(), np.float32), rtol=1e-2, atol=1e-3)


@cuda
def test_cuda_matches_cpu(tmp_path, photos):
    cpu = imgfeat.extract(str(photos), tmp_path / "cpu", devices="cpu", **OPTIONS)
    gpu = imgfeat.extract(str(photos), tmp_path / "gpu", devices="cuda", precision="fp32",
                          **OPTIONS)
    a, b = np.asarray(cpu.features(), np.float32), np.asarray(gpu.features(), np.float32)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999


def test_decode_threads_do_not_leak(tmp_path, photos):
    before = threading.active_count()
    imgfeat.extract(str(photos), tmp_path / "a", **OPTIONS)
    time.sleep(0.2)
    assert threading.active_count() <= before + 1  # at most the finished planner thread


def test_profile_prints_time_per_stage(tmp_path, photos, capsys):
    from imgfeat.cli import main

    assert main(["extract", str(photos), "-o", str(tmp_path / "o"), "--model", "timm:resnet18",
                 "--weights", "random", "--image-size", "64", "--profile"]) == 0
    err = capsys.readouterr().err
    for stage in ("read", "decode", "preprocess", "wait", "forward", "write", "wall"):
        assert f"\n{stage} " in err
