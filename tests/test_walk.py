"""Walking a large tree (issue 13): bounded memory per folder entry (spilled to disk past a
threshold), and a resumed plan that does not walk again what it recorded."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest

from imgfeat.plan.shards import last_planned_key, plan_shards, recorded_shards
from imgfeat.sources import iter_items, listing
from imgfeat.sources.folders import walk_folder
from imgfeat.store.layout import Layout


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "tree"
    for folder in ("a", "a/x", "b", "c/d/e", "z"):
        (root / folder).mkdir(parents=True)
    for name in ("a/1.jpg", "a/2.png", "a/x/3.jpg", "a/notes.txt", "b/4.jpg", "b/5.jpg",
                 "c/d/e/6.jpg", "c/7.jpg", "top.jpg", "z/8.jpg", "z/new\nline.jpg"):
        (root / name).write_bytes(b"")
    (root / "b" / "gone.jpg").symlink_to(root / "nowhere.jpg")
    return root


def test_a_walk_after_any_key_gives_exactly_the_rest(tree):
    full = [item.key for item in walk_folder(tree)]
    assert full[:3] == ["a/1.jpg", "a/2.png", "a/x/3.jpg"] and "b/gone.jpg" in full
    for position, key in enumerate(full):
        assert [item.key for item in walk_folder(tree, after=key)] == full[position + 1:], key
    (tree / "b" / "5.jpg").unlink()  # a recorded key that is gone: resume at the next name
    assert [i.key for i in walk_folder(tree, after="b/5.jpg")] == full[full.index("b/gone.jpg"):]


def test_a_spilled_listing_is_the_same_sorted_listing(tmp_path, monkeypatch):
    names = [f"img{i * 7919 % 5000:05d}.jpg" for i in range(5000)] + ["odd\nname.jpg"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setattr(listing, "SPILL_ENTRIES", 300)
    assert [name for name, _ in listing.sorted_entries(str(tmp_path))] == sorted(names)
    assert not [p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("imgfeat-listing-*")]


def test_memory_per_folder_entry_is_bounded(tmp_path, monkeypatch):
    count = 20_000
    for i in range(count):
        (tmp_path / f"photo_{i:08d}.jpg").write_bytes(b"")

    def peak() -> int:
        tracemalloc.start()
        for _ in walk_folder(tmp_path):
            pass
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return used

    whole = peak()
    assert whole / count < 100, f"{whole / count:.0f} bytes per entry"  # DirEntry: ~245
    monkeypatch.setattr(listing, "SPILL_ENTRIES", 2000)
    spilled = peak()  # past the threshold: sorted runs on disk, a block of each in memory
    assert spilled < whole / 2, (spilled, whole)


def test_a_resumed_plan_does_not_walk_again_what_it_recorded(tree, tmp_path, monkeypatch):
    layout = Layout(tmp_path / "out")
    layout.plan_dir.mkdir(parents=True)
    reference = Layout(tmp_path / "ref")
    reference.plan_dir.mkdir(parents=True)
    whole = list(plan_shards(iter_items([str(tree)]), reference, 3, []))
    planner = plan_shards(iter_items([str(tree)]), layout, 3, [])
    next(planner), next(planner)
    planner.close()  # stopped after two shards (six items, up to b/gone.jpg)
    already = recorded_shards(layout)
    after = last_planned_key(layout, already)
    assert after == "b/gone.jpg"
    listed = []
    real = listing.sorted_entries
    monkeypatch.setattr("imgfeat.sources.folders.sorted_entries",
                        lambda folder: listed.append(folder) or real(folder))
    rest = list(plan_shards(iter_items([str(tree)], after=after), layout, 3, already, seeked=True))
    assert [s.count for s in already + rest] == [s.count for s in whole]
    assert not any(folder.endswith(("/a", "/a/x")) for folder in listed)
    for index in range(len(whole)):
        assert layout.plan_file(index).read_bytes() == reference.plan_file(index).read_bytes()


def test_a_run_killed_while_walking_a_folder_resumes_the_walk_where_its_plan_ends(tree,
                                                                                  tmp_path):
    import subprocess
    import sys

    from conftest import FAST

    from imgfeat.cli import main

    def extract(out: Path, faults: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "imgfeat", "extract", str(tree), "-o", str(out), *FAST,
             "--shard-size", "3", "--devices", "cpu:1"], text=True, capture_output=True,
            env={**os.environ, "IMGFEAT_TEST_FAULTS": faults}, start_new_session=True,
            timeout=300)

    reference, out = tmp_path / "reference", tmp_path / "out"
    assert extract(reference).returncode == 0
    assert extract(out, "plan:2=kill").returncode == -9  # two shards planned, then killed
    assert sorted(Layout(out).planned()) == [0, 1]
    again = extract(out)
    assert again.returncode == 0, again.stderr
    planned = sorted(Layout(reference).planned())
    assert sorted(Layout(out).planned()) == planned
    for index in planned:
        assert Layout(out).plan_file(index).read_bytes() == \
            Layout(reference).plan_file(index).read_bytes()
    assert main(["verify", str(out)]) == 0


def test_a_resume_counts_plan_files_only_where_the_manifest_does_not_record_them(tmp_path,
                                                                                monkeypatch):
    from tiny_store import make_tiny_store

    from imgfeat.plan import shards

    layout = make_tiny_store(tmp_path / "store", 10)
    counted = []
    real = shards.count_shard_items
    monkeypatch.setattr(shards, "count_shard_items",
                        lambda layout_, index: counted.append(index) or real(layout_, index))
    full = shards.recorded_shards(layout)
    assert [s.count for s in full] == [3, 2, 2, 2, 2, 2, 2, 3, 2, 2] and len(counted) == 10
    counted.clear()
    assert shards.recorded_shards(layout, [s.count for s in full]) == full and not counted
    # a manifest that disagrees with the plan folder is not trusted: every file is counted
    assert shards.recorded_shards(layout, [s.count for s in full][1:]) == full
    assert len(counted) == 10
