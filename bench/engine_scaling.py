"""Throughput of the local engine with one and two CPU workers (and one CUDA worker when a GPU
is present), end to end from JPEG files, side by side in one run.

    python bench/engine_scaling.py [--count 400] [--model timm:resnet50 ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import commit, imgfeat_command, machine, timed, write_section
from corpus import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--model", action="append")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "imgfeat-bench")
    args = parser.parse_args()
    models = args.model or ["timm:resnet50", "timm:mobilenetv3_small_100"]
    corpus = build(args.work / f"corpus-{args.count}", args.count)
    devices = ["cpu:1", "cpu:2"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = ["| model | devices | seconds | images/s | vs cpu:1 |", "|---|---|---|---|---|"]
    for model in models:
        base = None
        for device in devices:
            seconds = timed(imgfeat_command(corpus, args.work / "out", "--model", model,
                                            "--devices", device, "--shard-size", "100"))
            rate = args.count / seconds
            base = base or rate
            rows.append(f"| {model} | {device} | {seconds:.1f} | {rate:.1f} | "
                        f"{rate / base:.2f}x |")
            print(rows[-1], flush=True)
    body = (f"Machine: {machine()}; commit {commit()}; {args.count} JPEGs of 500x375 "
            "(quality 90), random weights, fp32 on CPU; wall time of `imgfeat extract` end "
            "to end, start-up included.\n\n" + "\n".join(rows))
    write_section("Local engine: workers per machine", body)


if __name__ == "__main__":
    main()
