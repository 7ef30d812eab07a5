"""Runs stopped at exact instants of their whole life (planning, key index, shard writes, the
manifest, features.h5) by SIGKILL or SIGINT, then run again: the store must come out exactly as
an uninterrupted run makes it, bitwise, with nothing said to be done before it is.

The instants are fault points (imgfeat.store.faults): every durable write counts, and the run's
process group is signalled at the N-th one. Nothing here waits on a timer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST
from runs import assert_same_store, make_many, shard_mtimes

import imgfeat
from imgfeat.cli import main

pytestmark = pytest.mark.slow
SHARD = ["--shard-size", "4"]
KILLED, INTERRUPTED = -9, 130


@pytest.fixture(scope="module")
def listing(tmp_path_factory) -> Path:
    """A list file of 40 real images and 8 missing files (error records): 12 shards of 4."""
    folder = make_many(tmp_path_factory.mktemp("listed"), 40)
    lines = [f"part{i % 2}/img{i:03d}.jpg" for i in range(40)]
    for j in range(8):
        lines.insert(j * 6 + 2, f"gone/missing{j}.jpg")
    listing = folder / "list.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing


SETTINGS = [a for a in FAST if a != "--quiet"]  # the closing summary is part of what is tested


def extract_args(source: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", str(source), "-o", str(out), *SETTINGS, *SHARD, "--devices", "cpu:1",
            *extra]


@pytest.fixture(scope="module")
def reference(listing, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(extract_args(listing, out)) == 0
    return out


def run(args: list[str], faults: str = "") -> subprocess.CompletedProcess:
    """The command in a session of its own (as a terminal or a scheduler starts a job), so that
    a fault point can signal its whole process group."""
    env = {**os.environ, "IMGFEAT_TEST_FAULTS": faults}
    return subprocess.run([sys.executable, "-m", "imgfeat", *args], env=env, text=True,
                          capture_output=True, timeout=300, start_new_session=True)


def stopped(result: subprocess.CompletedProcess, code: int) -> None:
    assert result.returncode == code, result.stderr
    assert "done:" not in result.stderr
    if code == INTERRUPTED:
        assert "Traceback" not in result.stderr
        assert "run the same command again to resume" in result.stderr


def finished(result: subprocess.CompletedProcess, out: Path) -> None:
    assert result.returncode == 0, result.stderr
    assert "done:" in result.stderr
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert main(["verify", str(out)]) == 0
    assert imgfeat.open_store(out).complete


# Each chain stops the same run again and again, each time at the next instant of its life,
# then lets it finish. Every stop must happen (the point was reached) and keep what was done.
KILL_CHAIN = [
    "manifest-temp:1=kill",             # before the store exists
    "manifest:1=kill",                  # a store with no plan yet
    "plan:1=kill",                      # a plan file without its key index commit
    "keys:2=kill",                      # planning, two more shards recorded
    "plan:2=wait-shards:1,plan:4=kill",  # planning while shards are being committed
    "manifest:1=kill",                  # the plan just recorded as complete
    "shard-temp:1=kill",                # a shard written, not yet renamed
    "shard:2=kill",                     # a shard committed, the coordinator not yet told
    "counts-temp:1=kill",               # the record of shard counts not yet renamed
    "features-temp:1=kill",             # every shard done, features.h5 not yet renamed
    "features:1=kill",                  # features.h5 written, the summary not yet printed
]
INTERRUPT_CHAIN = [
    "plan:2=wait-shards:1,plan:3=int",  # Ctrl-C while planning
    "manifest:1=int",                   # ... the moment the plan is recorded complete
    "shard:2=int",                      # ... just after a shard is committed
    "features-temp:1=int",              # ... while features.h5 is written
]


@pytest.mark.parametrize("chain, code", [(KILL_CHAIN, KILLED), (INTERRUPT_CHAIN, INTERRUPTED)],
                         ids=["sigkill", "sigint"])
def test_stopped_at_each_instant_then_rerun_gives_the_same_store(listing, reference, tmp_path,
                                                                 chain, code):
    out = tmp_path / "out"
    for faults in chain:
        kept = shard_mtimes(out) if (out / "shards").exists() else {}
        stopped(run(extract_args(listing, out), faults), code)
        if (out / "manifest.json").exists() and not imgfeat.open_store(out).complete:
            assert main(["verify", str(out)]) == 1  # nothing claims a stopped run complete
        after = shard_mtimes(out) if (out / "shards").exists() else {}
        assert {name: after[name] for name in kept} == kept, faults  # nothing redone
    finished(run(extract_args(listing, out)), out)
    assert_same_store(reference, out)


def test_a_store_left_short_by_the_old_resume_is_detected_and_repaired(listing, reference,
                                                                        tmp_path, capsys):
    """What imgfeat before this fix left after a kill during planning: the first run's shards
    never extracted, and a manifest whose 'complete' plan holds only the second run's."""
    out = tmp_path / "out"
    assert main(extract_args(listing, out)) == 0
    (out / "shards" / "shard-000000.h5").unlink()
    (out / "features.h5").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["plan"]["shards"] = manifest["plan"]["shards"][1:]
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    problems = capsys.readouterr().out
    assert "the manifest records a plan of 11 shards, the plan folder holds 12" in problems
    assert "shard 0 is missing" in problems
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "missing    shards 0" in info and "plan       the manifest records" in info
    assert not imgfeat.open_store(out).complete
    finished(run(extract_args(listing, out)), out)
    assert_same_store(reference, out)


def test_finalize_writes_features_file_of_a_complete_store_only(listing, reference, tmp_path,
                                                               capsys):
    out = tmp_path / "out"
    stopped(run(extract_args(listing, out), "features-temp:1=kill"), KILLED)
    assert not (out / "features.h5").exists()
    assert main(["finalize", str(out)]) == 0
    assert_same_store(reference, out)
    (out / "shards" / "shard-000004.h5").unlink()
    capsys.readouterr()
    assert main(["finalize", str(out)]) == 2
    assert "1 planned shards are not committed" in capsys.readouterr().err


def test_a_failure_writing_features_file_keeps_the_shards_and_says_how_to_finish(
        listing, reference, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(extract_args(listing, out)) == 0
    (out / "features.h5").unlink()
    (out / "features.h5").mkdir()  # the rename onto it fails, as a full or read-only disk would
    (out / "features.h5" / "in-the-way").touch()
    capsys.readouterr()
    assert main(extract_args(listing, out)) == 3
    err = capsys.readouterr().err
    assert "every shard is committed, but writing features.h5 failed" in err
    assert f"run 'imgfeat finalize {out}'" in err and "done:" not in err
    assert len(imgfeat.open_store(out).shards) == 12
    (out / "features.h5" / "in-the-way").unlink()
    (out / "features.h5").rmdir()
    assert main(["finalize", str(out)]) == 0
    assert_same_store(reference, out)


def grown_folder(tmp_path: Path) -> tuple[Path, list[str]]:
    folder = make_many(tmp_path / "grow", 10)
    return folder, extract_args(folder, tmp_path / "out")


def add_images(folder: Path) -> None:
    extra = make_many(folder.parent / "extra", 16)
    for i, path in enumerate(sorted(extra.rglob("*.jpg"))[10:]):
        path.rename(folder / f"part{i % 2}" / f"new{i}.jpg")


@pytest.fixture(scope="module")
def incremental_reference(tmp_path_factory) -> Path:
    folder, args = grown_folder(tmp_path_factory.mktemp("incremental"))
    assert main(args) == 0
    add_images(folder)
    assert main([*args, "--incremental"]) == 0
    return Path(args[args.index("-o") + 1])


@pytest.mark.parametrize("faults, code, resume", [
    ("plan:1=kill", KILLED, []),                    # a plain rerun finishes the incremental walk
    ("shard:1=int", INTERRUPTED, ["--incremental"]),
])
def test_incremental_stopped_then_rerun(incremental_reference, tmp_path, faults, code, resume):
    folder, args = grown_folder(tmp_path)
    out = Path(args[args.index("-o") + 1])
    assert main(args) == 0
    add_images(folder)
    stopped(run([*args, "--incremental"], faults), code)
    assert not imgfeat.open_store(out).complete
    finished(run([*args, *resume]), out)
    assert_same_store(incremental_reference, out)


@pytest.mark.parametrize("victim, faults", [(0, "plan:2=kill"), (1, "shard:1=kill")])
def test_one_of_two_nodes_killed_then_rerun(listing, reference, tmp_path, victim, faults):
    out = tmp_path / "shared"

    def node(rank: int, node_faults: str = "") -> subprocess.Popen:
        command = [sys.executable, "-m", "imgfeat",
                   *extract_args(listing, out, "--num-nodes", "2", "--node-rank", str(rank))]
        return subprocess.Popen(command, env={**os.environ, "IMGFEAT_TEST_FAULTS": node_faults},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    nodes = {rank: node(rank, faults if rank == victim else "") for rank in (0, 1)}
    assert nodes[victim].wait(timeout=300) == KILLED
    again = node(victim)
    for process in (nodes[1 - victim], again):
        assert process.wait(timeout=300) == 0, process.stderr.read()
    assert_same_store(reference, out)
    assert imgfeat.open_store(out).complete and (out / "features.h5").exists()
    assert main(["verify", str(out)]) == 0


def test_a_second_run_on_a_folder_in_use_is_refused(listing, tmp_path, capsys):
    import fcntl

    out = tmp_path / "out"
    assert main(extract_args(listing, out, "--num-nodes", "2", "--node-rank", "0")) == 0
    for extra in ([], ["--overwrite"]):
        with open(out / ".locks" / "node-1.lock" if extra else out / ".locks" / "node-0.lock",
                  "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # a run of that node is at work
            capsys.readouterr()
            code = main(extract_args(listing, out, "--num-nodes", "2", "--node-rank", "0",
                                     *extra))
            err = capsys.readouterr().err
        assert code == 2, err
        assert f"another imgfeat run (node {1 if extra else 0}) is writing" in err
    assert len(imgfeat.open_store(out).shards) == 6  # nothing was deleted
    assert main(extract_args(listing, out, "--num-nodes", "2", "--node-rank", "1")) == 0
    assert imgfeat.open_store(out).complete


@pytest.fixture(scope="module")
def with_others(tmp_path_factory) -> Path:
    """24 real images in two folders, and 5 files of other types on both sides of where a
    walk killed after two shards resumes (part0/img014.jpg)."""
    folder = make_many(tmp_path_factory.mktemp("others"), 24)
    for name in ("part0/a.txt", "part0/b.md", "part1/notes.txt", "part1/zz.csv", "top.txt"):
        (folder / name).write_text("not an image\n")
    return folder


@pytest.mark.parametrize("faults", ["plan:2=kill", "tally:2=kill", "tally-temp:3=kill"])
def test_files_of_other_types_are_all_counted_after_a_resumed_walk(with_others, tmp_path,
                                                                    faults, capsys):
    """The resumed walk starts after the last planned key, so it cannot see the files before
    it: their count comes from the plan folder. Whichever instant the run died at."""
    out = tmp_path / "out"
    stopped(run(extract_args(with_others, out), faults), KILLED)
    finished(run(extract_args(with_others, out)), out)
    assert json.loads((out / "manifest.json").read_text())["plan"]["skipped"] == 5
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "skipped    5 files of other types" in capsys.readouterr().out


def test_a_plan_without_the_count_is_walked_again_and_counts_all(with_others, tmp_path):
    """A store planned before the count was recorded: no seek, the walk counts every file."""
    out = tmp_path / "out"
    stopped(run(extract_args(with_others, out), "plan:3=kill"), KILLED)
    (out / "plan" / "skipped.json").unlink()
    finished(run(extract_args(with_others, out)), out)
    assert json.loads((out / "manifest.json").read_text())["plan"]["skipped"] == 5
