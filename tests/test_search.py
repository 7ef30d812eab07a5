"""Search, index and dedup on real photos with planted near-duplicates, embedded by a
TorchScript model of 8 x 8 thumbnails (tests/search_corpus.py), through the CLI and Python."""

import json
import shutil

import numpy as np
import pytest
from search_corpus import make_search_corpus, thumbnail_model

import imgfeat
from imgfeat.cli import main
from imgfeat.search import dedup as dedup_mod
from imgfeat.search import exact, index

pytest.importorskip("faiss")

EXTRACT = ["--image-size", "64", "--devices", "cpu:1", "--quiet", "--dtype", "float32"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    groups = make_search_corpus(root / "corpus")
    model = thumbnail_model(root / "thumb.pt")
    out = root / "out"
    assert main(["extract", str(root / "corpus"), "-o", str(out), "--model", str(model),
                 *EXTRACT]) == 0
    return root, out, groups


def search_json(capsys, *args) -> list:
    capsys.readouterr()
    assert main(["search", *map(str, args), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("kind", [None, "flat", "ivf"])
def test_search_finds_the_image_then_its_copies(built, capsys, kind, tmp_path):
    root, out, groups = built
    if kind:
        store_copy = tmp_path / "out"
        shutil.copytree(out, store_copy)
        out = store_copy
        assert main(["index", str(out), "--kind", kind, "--quiet"]) == 0
    for original, planted in groups.items():
        image = root / "corpus" / original
        for query in (image, original):  # an image file, and the key of the store
            (found,) = search_json(capsys, out, query, "-k", "4")
            keys = [hit["key"] for hit in found["results"]]
            assert keys[0] == original
            assert sorted(keys[1:]) == sorted(planted)


def test_dedup_finds_the_planted_groups(built, capsys, tmp_path):
    root, out, groups = built
    table, keep = tmp_path / "groups.parquet", tmp_path / "keep.txt"
    capsys.readouterr()
    assert main(["dedup", str(out), "-o", str(table), "--keep-list", str(keep),
                 "--quiet"]) == 0
    assert f"{len(groups)} groups" in capsys.readouterr().out
    import pyarrow.parquet as pq

    found = pq.read_table(table).to_pylist()
    predicted = _pairs({row["key"]: row["group"] for row in found})
    truth = _pairs({key: number for number, (original, planted) in enumerate(groups.items())
                    for key in [original, *planted]})
    precision = len(predicted & truth) / len(predicted)
    recall = len(predicted & truth) / len(truth)
    print(f"dedup at 0.95: precision {precision:.3f}, recall {recall:.3f}")
    assert precision >= 0.95 and recall >= 0.95
    first = {}
    for row in found:
        first.setdefault(row["group"], row)
    assert all(row["similarity"] == pytest.approx(1.0, abs=1e-5) for row in first.values())
    kept = keep.read_text().splitlines()
    store = imgfeat.open_store(out)
    assert len(kept) == len(store) - sum(len(p) for p in groups.values())
    assert {row["key"] for row in first.values()} <= set(kept)


def _pairs(group_of: dict) -> set:
    by_group = {}
    for key, group in group_of.items():
        by_group.setdefault(group, []).append(key)
    return {tuple(sorted((a, b))) for keys in by_group.values() for a in keys for b in keys
            if a < b}


def test_index_agrees_with_exact_search(built, tmp_path):
    _, out, _ = built
    shutil.copytree(out, tmp_path / "out")
    store = imgfeat.open_store(tmp_path / "out")
    queries = np.asarray(store.features()[:], np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth_scores, truth = exact.top_k(store, "output", queries, 10, batch=7)
    for kind in ("flat", "ivf"):
        index.build(store, kind=kind, say=lambda _: None)
        scores, rows = index.load(store).search(queries, 10)
        if kind == "flat":
            assert np.allclose(scores, truth_scores, atol=1e-5)
            assert (rows[:, 0] == truth[:, 0]).all()
        assert index.recall_at(rows, truth) >= 0.95


def test_python_search_and_neighbours(built, tmp_path):
    root, out, groups = built
    original, planted = next(iter(groups.items()))
    with imgfeat.open_store(out) as store:
        (hits,) = store.search([str(root / "corpus" / original)], k=4)
        assert hits[0][0] == original and hits[0][1] == pytest.approx(1.0, abs=1e-4)
        assert sorted(key for key, _ in store.neighbours(original, k=3)) == sorted(planted)
        (by_vector,) = store.search(store[original], k=1)
        assert by_vector[0][0] == original
        (tmp_path / "q" / "sub").mkdir(parents=True)
        for name, where in ((original, "q"), (planted[0], "q/sub")):
            shutil.copy(root / "corpus" / name, tmp_path / where / name)
        folder_hits = store.search([str(tmp_path / "q")], k=1)
        assert [hits[0][0] for hits in folder_hits] == [original, planted[0]]


def test_stale_index_is_refused_with_the_command_to_rebuild(built, tmp_path, capsys):
    root, _, _ = built
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    shutil.copytree(root / "corpus", corpus)
    extract = ["extract", str(corpus), "-o", str(out), "--model", str(root / "thumb.pt"),
               *EXTRACT]
    assert main(extract) == 0
    assert main(["index", str(out), "--quiet"]) == 0
    shutil.copy(next(corpus.glob("china*.jpg")), corpus / "new.jpg")
    assert main([*extract, "--incremental"]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "out"), "new.jpg"]) == 2
    err = capsys.readouterr().err
    assert "stale" in err and f"imgfeat index {tmp_path / 'out'}" in err
    assert err.count("\n") == 1
    assert main(["index", str(tmp_path / "out"), "--quiet"]) == 0
    assert main(["search", str(tmp_path / "out"), "new.jpg"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--text", "a red car"], "text queries need a CLIP model"),
    (["{root}/corpus/broken.jpg"], "cannot use query image"),
    (["no-such-thing.jpg"], "is neither a key of the store"),
    (["china-q0.jpg", "--layer", "fc"], "no layer 'fc'"),
    (["china-q0.jpg", "-k", "0"], "-k must be at least 1"),
    ([], "give at least one query"),
])
def test_search_mistakes_are_one_line(built, capsys, args, message):
    root, out, _ = built
    capsys.readouterr()
    assert main(["search", str(out), *[a.format(root=root) for a in args]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_dedup_of_a_large_store_needs_an_index(built, capsys, monkeypatch):
    _, out, _ = built
    monkeypatch.setattr(dedup_mod, "FLAT_ROWS", 10)
    capsys.readouterr()
    assert main(["dedup", str(out)]) == 2
    assert "build an index first with `imgfeat index" in capsys.readouterr().err


def test_a_damaged_index_is_one_line(built, tmp_path, capsys):
    _, out, _ = built
    shutil.copytree(out, tmp_path / "out")
    assert main(["index", str(tmp_path / "out"), "--quiet"]) == 0
    next((tmp_path / "out" / "index").glob("*.faiss")).write_bytes(b"not an index")
    capsys.readouterr()
    assert main(["search", str(tmp_path / "out"), "china-q0.jpg"]) == 2
    err = capsys.readouterr().err
    assert "unreadable" in err and "imgfeat index" in err and err.count("\n") == 1


def test_a_store_without_features_is_one_line(built, tmp_path, capsys):
    root, _, _ = built
    (tmp_path / "only").mkdir()
    shutil.copy(root / "corpus" / "broken.jpg", tmp_path / "only" / "broken.jpg")
    assert main(["extract", str(tmp_path / "only"), "-o", str(tmp_path / "out"), "--model",
                 str(root / "thumb.pt"), *EXTRACT]) == 0
    for command in (["index"], ["search", "--text", "x"], ["dedup"]):
        capsys.readouterr()
        assert main([command[0], str(tmp_path / "out"), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert "holds no features for layer 'output'" in err and err.count("\n") == 1
