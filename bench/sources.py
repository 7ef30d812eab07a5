"""Where the images are: the same JPEGs as a local folder, as local webdataset tars, as tars on
an S3 server, as loose objects on that server, and as a Parquet table of their bytes. imgfeat's
images/s for each, beside the S3 server's own ceiling for the same objects at the same
concurrency (a plain concurrent GET loop, imgfeat's reads in flight).

The S3 server is moto's standalone server on 127.0.0.1 (what the tests use): it shares this
machine's cores with imgfeat, so its ceiling is this machine's, not a cloud's. A light model
(resnet18 at 64 pixels) keeps the model from hiding the source.

    python bench/sources.py [--count 2000] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))  # s3_server

from common import commit, imgfeat_command, machine, timed, write_section  # noqa: E402
from corpus import build  # noqa: E402

MODEL = ["--model", "timm:resnet18", "--image-size", "64", "--shard-size", "500",
         "--dtype", "float16"]
IN_FLIGHT = int(os.environ.get("IMGFEAT_READS_IN_FLIGHT", "16"))
RUNS = 3  # timed runs of each line after a warm one: their median (this machine is noisy)


def make_tars(folder: Path, files: list[Path], per_tar: int) -> list[Path]:
    import webdataset as wds

    tars = []
    for start in range(0, len(files), per_tar):
        name = folder / f"data-{start // per_tar:05d}.tar"
        with wds.TarWriter(str(name)) as writer:
            for path in files[start:start + per_tar]:
                writer.write({"__key__": path.stem, "jpg": path.read_bytes()})
        tars.append(name)
    return tars


def make_parquet(path: Path, files: list[Path]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": [p.read_bytes() for p in files],
                      "key": [p.name for p in files]})
    pq.write_table(table, path, row_group_size=250)
    return path


def get_ceiling(fs, paths: list[str], whole: bool) -> float:
    """Seconds to GET every object at IN_FLIGHT at once (tars: streamed in 8 MiB reads)."""
    def get(path: str) -> int:
        if not whole:
            return len(fs.cat_file(path))
        total = 0
        with fs.open(path, "rb", block_size=8 << 20) as handle:
            while chunk := handle.read(8 << 20):
                total += len(chunk)
        return total

    began = time.perf_counter()
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        list(pool.map(get, paths))
    return time.perf_counter() - began


def tar_phases(urls: list[str], options: dict) -> tuple[float, float]:
    """Seconds, in this process, of the plan's walk of the tars on S3 (one stream each) and of
    a worker's reads of their members (runs of ranged GETs, IN_FLIGHT at once): the two
    reads of a remote tar, timed apart."""
    from imgfeat.pipeline.byte_reader import ByteReader
    from imgfeat.pipeline.decode_pool import fetched
    from imgfeat.sources.tars import read_tar

    began = time.perf_counter()
    items = [item for url in urls for item in read_tar(url, options)]
    walked = time.perf_counter()
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        for _ in fetched(pool, ByteReader(options), items, IN_FLIGHT):
            pass
    return walked - began, time.perf_counter() - walked


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--per-tar", type=int, default=500)
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md")
    args = parser.parse_args()
    from s3_server import S3

    work = Path(tempfile.mkdtemp(prefix="imgfeat-bench-sources-"))
    folder = build(work / "jpegs", args.count)
    files = sorted(folder.glob("*.jpg"))
    tars = make_tars(work, files, args.per_tar)
    table = make_parquet(work / "images.parquet", files)
    server = S3()
    server.bucket("bench")
    fs = server.fs()
    for path in files:
        fs.put_file(str(path), f"bench/loose/{path.name}")
    for tar in tars:
        fs.put_file(str(tar), f"bench/tars/{tar.name}")
    options = ["--storage-options", json.dumps(server.options())]
    os.environ["IMGFEAT_STAGING"] = str(work / "staging")
    load_before = os.getloadavg()[0]
    pattern = f"data-{{00000..{len(tars) - 1:05d}}}.tar"
    lines = [
        ("local folder", str(folder), [], None),
        ("local tars", str(work / pattern), [], None),
        ("tars on S3 server", f"s3://bench/tars/{pattern}", options,
         (get_ceiling, [f"bench/tars/{t.name}" for t in tars], True)),
        ("loose objects on S3 server", "s3://bench/loose", options,
         (get_ceiling, [f"bench/loose/{p.name}" for p in files], False)),
        ("parquet of bytes (local)", str(table), [], None),
        ("local folder, again", str(folder), [], None),  # the load drifts: bracket the lines
    ]
    rows = []
    for name, source, extra, ceiling in lines:
        command = imgfeat_command(source, work / "out", *MODEL, *extra)
        timed(command)  # warm: the files in the page cache, as the S3 server holds its objects
        seconds = statistics.median(timed(command) for _ in range(RUNS))
        rate = args.count / seconds
        limit = None
        if ceiling is not None:
            measure, paths, whole = ceiling
            limit = args.count / measure(fs, paths, whole)
        rows.append((name, rate, limit))
        print(f"{name}: {rate:.1f} images/s" + (f", GET ceiling {limit:.1f}" if limit else ""),
              flush=True)
    walk, reads = tar_phases([f"s3://bench/tars/{t.name}" for t in tars], server.options())
    server.stop()
    local = max(rows[0][1], rows[-1][1])  # the faster of the two: the stricter target
    table_lines = ["| source | imgfeat images/s | read ceiling images/s | target min(local, "
                   "ceiling) | imgfeat / target |", "|---|---|---|---|---|"]
    for name, rate, limit in rows:
        target = min(local, limit) if limit else local
        table_lines.append(f"| {name} | {rate:.1f} | {f'{limit:.1f}' if limit else '-'} | "
                           f"{target:.1f} | {rate / target:.2f} |")
    body = (f"Machine: {machine()}; commit {commit()}; load average {load_before:.1f} at the "
            f"start, {os.getloadavg()[0]:.1f} at the end; {args.count} JPEGs of about 500x375 "
            f"(quality 90), tars of {args.per_tar}; {' '.join(MODEL)}, random weights, "
            f"the local folder measured first and last (target: the faster of the two); "
            f"default devices; whole processes, start-up included, each the median of "
            f"{RUNS} runs after a first that warms the page cache (cold, local lines measure "
            f"the disk); "
            f"the S3 server is moto's on "
            f"127.0.0.1 in the benchmark's process, its ceiling a plain GET loop at "
            f"{IN_FLIGHT} in flight (imgfeat's reads in flight per worker).\n\n"
            + "\n".join(table_lines)
            + f"\n\nThe two reads of the tars on the S3 server, timed apart in the benchmark's "
            f"process: the plan's walk (one stream per tar, for keys, offsets and captions; in a "
            f"run, it goes on while the model loads) "
            f"{walk:.2f} s, a worker's reads of the members (runs of up to 4 MiB, one ranged "
            f"GET each, {IN_FLIGHT} in flight) {reads:.2f} s, for {args.count} images.")
    print(body)
    if args.write:
        write_section("Sources: folders, tars, tables and object storage (issue 12)", body)


if __name__ == "__main__":
    main()
