"""Helpers shared by the tests that run whole extractions: a corpus of many distinct JPEGs,
comparing stores, and watching a run from outside to kill it at a chosen moment."""

import subprocess
import time
from pathlib import Path

import numpy as np
from corpus import jpeg_bytes, photo_paths
from PIL import Image

import imgfeat


def make_many(folder: Path, count: int) -> Path:
    """`count` distinct JPEGs cut from the real photos, in two sub-folders."""
    photos = [Image.open(p).convert("RGB") for p in photo_paths()]
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        box = (i * 7 % (w // 3), i * 5 % (h // 3), w - i * 3 % (w // 3), h - i % (h // 3))
        path = folder / f"part{i % 2}" / f"img{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(photo.crop(box).resize((160, 120))))
    return folder


def contents(out: Path):
    store = imgfeat.open_store(out)
    return store.keys, np.asarray(store.features()), store.errors


def assert_same_store(a: Path, b: Path) -> None:
    keys_a, feats_a, errors_a = contents(a)
    keys_b, feats_b, errors_b = contents(b)
    assert keys_a == keys_b and errors_a == errors_b
    np.testing.assert_array_equal(feats_a, feats_b)  # bitwise


def shard_mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("shard-*.h5")}


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"run ended before the kill point: {process.stderr.read()}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.005)


def committed(out: Path) -> int:
    return len(list((out / "shards").glob("shard-*.h5"))) if (out / "shards").exists() else 0


def writing(out: Path) -> bool:
    return (out / "shards").exists() and any(".tmp-" in p.name
                                             for p in (out / "shards").iterdir())
