import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Tests never reach a model hub: a pretrained download must fail fast, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("IMGFEAT_TEST", "1")
# A node that ends while shards of its run are missing waits up to this long for a shared file
# system to show them (90 s by default); here no file system hides them, and node 0 of two
# often runs alone.
os.environ.setdefault("IMGFEAT_SETTLE_S", "2")

from corpus import copy_photos, make_mixed_corpus, photo_paths  # noqa: E402
from runs import make_many  # noqa: E402


def cuda(test):
    """Needs a CUDA device: skipped elsewhere; `pytest -m cuda` (bench/gpu_acceptance.py)
    selects these."""
    import torch

    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.cuda(skip(test))


# A small, fast setting shared by most tests: random weights, small images.
FAST = ["--model", "timm:resnet18", "--weights", "random", "--image-size", "64",
        "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="session")
def mixed_corpus(tmp_path_factory) -> tuple[Path, dict[str, bool]]:
    folder = tmp_path_factory.mktemp("mixed")
    return folder, make_mixed_corpus(folder)


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    copy_photos(folder)
    return folder


@pytest.fixture(scope="session")
def many(tmp_path_factory) -> Path:
    """40 distinct JPEGs in two sub-folders, for runs of several shards."""
    return make_many(tmp_path_factory.mktemp("many"), 40)


@pytest.fixture(scope="session")
def photo_reference(tmp_path_factory):
    """The real photos as a folder, and the features a fast run extracts from it: what tars,
    tables and object storage holding the same photos must give, bitwise."""
    from producers import RUN

    import imgfeat
    from imgfeat.cli import main

    root = tmp_path_factory.mktemp("collections")
    folder = root / "photos"
    folder.mkdir()
    for path in photo_paths():
        (folder / path.name).write_bytes(path.read_bytes())
    assert main(["extract", str(folder), "-o", str(root / "ref"), *RUN]) == 0
    store = imgfeat.open_store(root / "ref")
    return root, {key: store[key] for key in store.keys}
