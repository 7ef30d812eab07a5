"""Scale (issue 13): the coordinator's peak memory (its own RSS, not its workers') and its CPU
time per item for runs of N planned items whose items cost the workers almost nothing (a list
of missing files: every item is an error record); and the time from start to the first
committed shard for a tree of M files.

    python bench/scale.py --items 100000,1000000,10000000 --tree 1000000 --work /tmp/scale

Targets: peak memory at the largest N at most 1.5x that at the smallest; under 20 us of
coordinator CPU per item; the first shard within 10 s of start on the tree. Each line is
printed as JSON, with the machine's load average when it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = dict(model="timm:resnet18", weights="random", image_size=32, batch_size=4,
                devices="cpu:1", progress="none", dtype="float32")
RUN = """
import json, os, resource, sys, time
import imgfeat
began, before = time.perf_counter(), os.times()
store = imgfeat.extract([sys.argv[1]], sys.argv[2], **json.loads(sys.argv[3]))
after = os.times()
print(json.dumps({"wall_s": time.perf_counter() - began,
                  "cpu_s": after.user - before.user + after.system - before.system,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rows": len(store), "errors": store.error_count,
                  "torch_imported": "torch" in sys.modules}))
"""


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def missing_list(work: Path, count: int) -> Path:
    path = work / f"missing-{count}.txt"
    if not path.exists():
        with open(path, "w") as out:
            for start in range(0, count, 100_000):
                out.write("".join(f"gone/d{i // 1000:05d}/f{i:08d}.jpg\n"
                                  for i in range(start, min(count, start + 100_000))))
    return path


def planned_items(work: Path, count: int) -> dict:
    out = work / f"out-{count}"
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run([sys.executable, "-c", RUN, str(missing_list(work, count)), str(out),
                           json.dumps(SETTINGS)], env=env(), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["errors"] == count, line
    shutil.rmtree(out, ignore_errors=True)
    return {"items": count, **line, "cpu_us_per_item": line["cpu_s"] / count * 1e6,
            "load": os.getloadavg()}


def make_tree(work: Path, count: int, per_folder: int = 1000) -> Path:
    root = work / f"tree-{count}"
    if not (root / ".complete").exists():
        for i in range(count):
            folder = root / f"d{i // per_folder:05d}"
            if i % per_folder == 0:
                folder.mkdir(parents=True, exist_ok=True)
            (folder / f"f{i:08d}.jpg").touch()
        (root / ".complete").touch()
    return root


def first_shard(work: Path, count: int) -> dict:
    """Seconds from the start of `imgfeat extract` on a tree of `count` (empty) files to its
    first committed shard; the run is then stopped."""
    tree, out = make_tree(work, count), work / "out-tree"
    shutil.rmtree(out, ignore_errors=True)
    settings = {**SETTINGS, "progress": "none"}
    began = time.perf_counter()
    run = subprocess.Popen([sys.executable, "-c", RUN, str(tree), str(out),
                            json.dumps(settings)], env=env(), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shards = out / "shards"
    manifest_s = None
    while run.poll() is None:
        if manifest_s is None and (out / "manifest.json").exists():
            manifest_s = time.perf_counter() - began  # the workers have loaded the model
        if shards.is_dir() and any(p.suffix == ".h5" for p in shards.iterdir()):
            break
        time.sleep(0.05)
    seconds = time.perf_counter() - began
    os.killpg(run.pid, signal.SIGINT)
    run.wait(timeout=120)
    shutil.rmtree(out, ignore_errors=True)
    return {"tree_files": count, "first_shard_s": seconds, "workers_ready_s": manifest_s,
            "load": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", default="100000,1000000",
                        help="planned item counts, comma-separated")
    parser.add_argument("--tree", type=int, default=1_000_000, help="files in the tree (0: skip)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgfeat-scale"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for count in (int(n) for n in args.items.split(",") if n):
        print(json.dumps(planned_items(args.work, count)), flush=True)
    if args.tree:
        print(json.dumps(first_shard(args.work, args.tree)), flush=True)


if __name__ == "__main__":
    main()
