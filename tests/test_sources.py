import os

import pytest

from imgfeat.errors import UsageError
from imgfeat.plan.shards import plan_shards, read_shard_items
from imgfeat.sources import check_sources, iter_items
from imgfeat.store.layout import Layout


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def keys(sources):
    return [(i.key, i.error) for i in iter_items([str(s) for s in sources])]


def test_folder_walk_is_recursive_sorted_and_skips_non_images(tmp_path):
    for name in ["b.jpg", "a/z.PNG", "a/b/c.webp", "a.txt", ".hidden.jpg", ".git/x.jpg"]:
        touch(tmp_path / name)
    assert keys([tmp_path]) == [("a/b/c.webp", None), ("a/z.PNG", None), ("b.jpg", None)]


def test_walk_streams(tmp_path):
    for i in range(5):
        touch(tmp_path / f"{i}.jpg")
    items = iter_items([str(tmp_path)])
    assert next(items).key == "0.jpg"  # a generator: nothing listed before it is asked for


def test_symlink_loop_is_reported_not_fatal(tmp_path):
    touch(tmp_path / "a" / "x.jpg")
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    found = keys([tmp_path])
    assert ("a/x.jpg", None) in found
    assert ("a/loop/", "symbolic link loop: the folder contains itself") in found


def test_unreadable_subfolder_is_reported_not_fatal(tmp_path, monkeypatch):
    touch(tmp_path / "ok" / "x.jpg")
    touch(tmp_path / "secret" / "y.jpg")
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("secret"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert keys([tmp_path]) == [("ok/x.jpg", None),
                                ("secret/", "unreadable folder: Permission denied")]


def test_broken_symlink_is_reported(tmp_path):
    os.symlink(tmp_path / "gone.jpg", tmp_path / "link.jpg")
    assert keys([tmp_path]) == [("link.jpg", "broken symbolic link")]


def test_list_file_resolves_relative_paths_against_its_folder(tmp_path):
    touch(tmp_path / "imgs" / "a.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\nimgs/a.jpg\n\n{tmp_path / 'imgs' / 'a.jpg'}\n")
    items = list(iter_items([str(listing)]))
    assert [i.key for i in items] == ["imgs/a.jpg", f"{tmp_path}/imgs/a.jpg"]
    assert all(os.path.exists(i.path) for i in items)


def test_several_sources_keep_keys_apart_by_source_name(tmp_path):
    touch(tmp_path / "cam1" / "0001.jpg")
    touch(tmp_path / "cam2" / "0001.jpg")
    assert keys([tmp_path / "cam1", tmp_path / "cam2"]) == [
        ("cam1/0001.jpg", None), ("cam2/0001.jpg", None)]


def test_sources_with_the_same_name_are_refused(tmp_path):
    touch(tmp_path / "x" / "data" / "a.jpg")
    touch(tmp_path / "y" / "data" / "a.jpg")
    with pytest.raises(UsageError, match="both give keys starting with 'data/'"):
        check_sources([str(tmp_path / "x" / "data"), str(tmp_path / "y" / "data")])


def test_missing_source_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="source not found"):
        check_sources([str(tmp_path / "nope")])


def test_duplicate_keys_become_error_records(tmp_path):
    touch(tmp_path / "a.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\nb.jpg\na.jpg\n./a.jpg\n")
    layout = Layout(tmp_path / "out")
    layout.plan_dir.mkdir(parents=True)
    shards = list(plan_shards(iter_items([str(listing)]), layout, 2, []))
    assert [s.count for s in shards] == [2, 2]
    items = read_shard_items(layout, 0) + read_shard_items(layout, 1)
    assert [(i.key, i.error is None) for i in items] == [
        ("a.jpg", True), ("b.jpg", True), ("a.jpg", False), ("a.jpg", False)]
    assert items[2].error.startswith("duplicate key")


def test_non_utf8_file_name_gets_a_storable_key(tmp_path):
    name = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    with open(name, "wb") as handle:
        handle.write(b"x")
    [item] = list(iter_items([str(tmp_path)]))
    assert item.key == "caf\\xe9.jpg"
    assert os.path.exists(item.path)
    item.key.encode("utf-8")


@pytest.mark.parametrize("incremental", [False, True])
def test_a_plan_file_that_failed_to_write_leaves_its_keys_unplanned(tmp_path, monkeypatch,
                                                                     incremental):
    """A full disk while writing shard 1's plan file: the resumed walk must plan those keys
    again as new, not as duplicates of keys that were never recorded."""
    import imgfeat.plan.shards as shards_module

    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{i}.jpg\n" for i in range(6)))
    layout = Layout(tmp_path / "out")
    layout.plan_dir.mkdir(parents=True)
    real_write = shards_module.write_shard_items

    def full_disk(layout_, index, items):
        if index == 1:
            raise OSError(28, "No space left on device")
        real_write(layout_, index, items)

    monkeypatch.setattr(shards_module, "write_shard_items", full_disk)
    planner = plan_shards(iter_items([str(listing)]), layout, 2, [])
    assert next(planner).index == 0
    with pytest.raises(OSError):
        next(planner)
    monkeypatch.setattr(shards_module, "write_shard_items", real_write)
    already = shards_module.recorded_shards(layout)
    assert [s.index for s in already] == [0]
    resumed = list(plan_shards(iter_items([str(listing)]), layout, 2, already,
                               skip_known=incremental))
    assert [s.index for s in resumed] == [1, 2]
    items = read_shard_items(layout, 1) + read_shard_items(layout, 2)
    assert [(i.key, i.error) for i in items] == [(f"{n}.jpg", None) for n in range(2, 6)]


def test_the_early_walk_stays_a_bounded_step_ahead_and_passes_on_errors():
    """The plan's walk runs while the model loads: at most `limit` items ahead of the planner;
    the skipped count travels with each item; a failure reaches the planner; close() stops it."""
    import threading

    from imgfeat.plan.early_walk import EarlyWalk
    from imgfeat.sources import Item
    from imgfeat.sources.stream import Tally

    walked = []
    gate = threading.Event()

    def items(tally):
        for number in range(10):
            tally.skipped += 1  # a file of another type before each image
            walked.append(number)
            if number == 3:
                gate.set()
            yield Item(f"k{number}", f"/x/{number}.jpg")
        raise UsageError("the source went away")

    tally = Tally()
    walk = EarlyWalk(items(tally), tally, limit=3)
    assert gate.wait(10)
    walk._thread.join(0.2)
    assert len(walked) == 4  # three in the queue, the fourth waiting for room
    planner_tally = Tally()
    taken = walk.items(planner_tally)
    assert next(taken).key == "k0" and planner_tally.skipped == 1  # not the walk's count
    assert [next(taken).key for _ in range(8)] == [f"k{n}" for n in range(1, 9)]
    assert planner_tally.skipped == 9
    with pytest.raises(UsageError, match="went away"):
        list(taken)
    stopped = EarlyWalk(iter(Item(f"k{n}", f"/{n}.jpg") for n in range(100)), Tally(), limit=2)
    stopped.close()
    assert not stopped._thread.is_alive()
