"""imgfeat against what users run today, side by side on the same JPEGs and the same model:

1. imgfeat end to end (`imgfeat extract`, a whole process, start-up included), at each
   precision: fp32, and on a CPU also bf16 (start-up includes its check against fp32);
2. the seed recipe ported to PyTorch: one image at a time, PIL, batch size 1;
3. the conventional script: Dataset + PIL + the model's transform, DataLoader with
   num_workers = cores, pin_memory, batch 64, the same precision;
4. the model-only ceiling: the model on preprocessed tensors already in memory, at its best
   batch size, run as imgfeat runs it (frozen graph on CPU, allocator setting); the eager
   timm model (same process, so same allocator setting) is reported beside it, and the
   ceiling takes the faster;
5. the decode-only ceiling: decode + preprocess on all cores, no model.

Lines 2 and 3 also run as whole processes (start-up included), like line 1. Ceilings are
steady-state rates; the model-only ceiling, and so the serial-sum ceiling, is measured at
each precision of line 1. Prints images/s and ratios and writes them to docs/benchmarks.md.

    python bench/throughput.py [--count 2000] [--model timm:resnet50 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import commit, imgfeat_command, machine, write_section
from corpus import build

HERE = Path(__file__).resolve().parent


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def device_and_precision() -> tuple[str, str]:
    import torch

    if torch.cuda.is_available():
        return "cuda", "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "cpu", "fp32"


def build_model(spec: str, device: str):
    """The model and its eval transform, built as a user's script would (random weights)."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(spec.removeprefix("timm:"), pretrained=False).eval().to(device)
    model = model.to(memory_format=torch.channels_last)
    config = timm.data.resolve_model_data_config(model)
    return model, timm.data.create_transform(**config, is_training=False)


def autocast(device: str, precision: str):
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device, dtype=dtype)


def files_of(corpus: Path) -> list[Path]:
    return sorted(corpus.glob("*.jpg"))


# -- the lines, each run in a process of its own --------------------------------------------


WARM_IMAGES = 64  # the in-process steady rate of lines 2-3 starts after these


def seed_recipe(corpus: Path, spec: str) -> float:
    """Runs the recipe; its steady rate (images/s after the first WARM_IMAGES)."""
    import h5py
    import numpy as np
    import torch
    from PIL import Image

    device, precision = device_and_precision()
    model, transform = build_model(spec, device)
    feats, names, clock = [], [], SteadyClock()
    with torch.inference_mode(), autocast(device, precision):
        for path in files_of(corpus):
            clock.tick(1)
            x = transform(Image.open(path).convert("RGB"))[None].to(device)
            feats.append(model.forward_head(model.forward_features(x), pre_logits=True)
                         .float().cpu().numpy()[0])
            names.append(path.name)
    rate = clock.rate()
    with h5py.File(tempfile.mktemp(suffix=".h5"), "w") as f:
        f["feats"], f["names"] = np.stack(feats), names
    return rate


class SteadyClock:
    """Images per second after the first WARM_IMAGES (each step's results already in hand,
    so the clock starts with the pipeline warm)."""

    def __init__(self):
        self.seen, self.began, self.counted = 0, None, 0

    def tick(self, images: int) -> None:
        """Call as a step of `images` begins."""
        if self.began is None and self.seen >= WARM_IMAGES:
            self.began = time.perf_counter()
        if self.began is not None:
            self.counted += images
        self.seen += images

    def rate(self) -> float:
        if self.began is None or not self.counted:
            return float("nan")
        return self.counted / (time.perf_counter() - self.began)


def conventional(corpus: Path, spec: str) -> float:
    """Runs the script; its steady rate (images/s after the first WARM_IMAGES)."""
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    device, precision = device_and_precision()
    model, transform = build_model(spec, device)

    class Images(Dataset):
        def __init__(self, paths):
            self.paths = paths

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            return transform(Image.open(self.paths[i]).convert("RGB"))

    loader = DataLoader(Images(files_of(corpus)), batch_size=64, num_workers=cores(),
                        pin_memory=device == "cuda")
    feats, clock = [], SteadyClock()
    with torch.inference_mode(), autocast(device, precision):
        for batch in loader:
            clock.tick(len(batch))
            batch = batch.to(device, non_blocking=True).contiguous(
                memory_format=torch.channels_last)
            feats.append(model.forward_head(model.forward_features(batch), pre_logits=True)
                         .float().cpu().numpy())
    rate = clock.rate()
    np.save(tempfile.mktemp(suffix=".npy"), np.concatenate(feats))
    return rate


def model_ceiling(spec: str, precision: str | None = None,
                  seconds: float = 4.0) -> tuple[float, float]:
    """The model alone on preprocessed images in memory, at its best batch size: (as imgfeat
    runs it: uint8 batches through its model side, frozen graph and allocator setting
    included; the eager timm model on float tensors, in this process and so with the same
    allocator setting, which makes it a stricter ceiling than lines 2-3's own speed)."""
    import torch

    from imgfeat.compute.build import build_extractor
    from imgfeat.options import ExtractOptions
    from imgfeat.pipeline.host_memory import keep_freed_memory

    keep_freed_memory()  # the setting imgfeat's workers run with: a process-wide choice
    device, default = device_and_precision()
    precision = precision or default
    extractor = build_extractor(ExtractOptions(model=spec, weights="random",
                                               precision=precision), device)
    model, _ = build_model(spec, device)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    mine = eager = 0.0
    for batch_size in (1, 4, 8, 16, 32, 64) if device == "cpu" else (64, 128, 256):
        pixels = torch.randint(0, 256, (batch_size, *size[1:], size[0]), dtype=torch.uint8,
                               device=device)
        mine = max(mine, _rate(lambda pixels=pixels: extractor(pixels), batch_size, seconds / 2))
        floats = torch.randn(batch_size, *size, device=device).contiguous(
            memory_format=torch.channels_last)

        def forward(floats=floats):
            with torch.inference_mode(), autocast(device, precision):
                model.forward_head(model.forward_features(floats), pre_logits=True).float().cpu()

        eager = max(eager, _rate(forward, batch_size, seconds / 2))
    return mine, eager


def _rate(step, batch_size: int, seconds: float) -> float:
    step()  # warm up
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        step()
        done += batch_size
    return done / (time.perf_counter() - began)


def _decode_one(args) -> None:
    path, preprocess = args
    from imgfeat.pipeline.decode_pool import load_pixels
    from imgfeat.sources import Item

    load_pixels(Item(path.name, str(path)), preprocess, None)


def decode_ceiling(corpus: Path, spec: str) -> float:
    """The fastest decode + preprocess at hand (imgfeat's uint8 path), one process per core."""
    from multiprocessing import get_context

    import timm

    from imgfeat.models.timm_backend import _preprocess

    preprocess = _preprocess(timm, build_model(spec, "cpu")[0])
    paths = files_of(corpus)
    with get_context("spawn").Pool(cores()) as pool:
        pool.map(_decode_one, [(paths[0], preprocess)] * cores())  # imports done
        began = time.perf_counter()
        pool.map(_decode_one, [(p, preprocess) for p in paths], chunksize=8)
        return len(paths) / (time.perf_counter() - began)


# -- the driver ------------------------------------------------------------------------------


def timed_process(args: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def precisions() -> list[str]:
    """fp32, and bf16 where a CPU has the units for it (or the GPU's own precision)."""
    from imgfeat.compute.precision import cpu_caps

    device, precision = device_and_precision()
    if device == "cuda":
        return [precision]
    return ["fp32", "bf16"] if cpu_caps().bf16_matrix_units else ["fp32"]


def measure(corpus: Path, small: Path, spec: str, work: Path, extra: list[str]
            ) -> list[tuple[str, str, float, float]]:
    """(line, precision, end-to-end rate, steady rate) per line. The steady rate of a
    whole-process line is taken from two runs, on the corpus and on its first images: the
    difference cancels the start-up (imports, model build, worker start) that both runs pay."""
    count, few = len(files_of(corpus)), len(files_of(small))
    me = [sys.executable, str(Path(__file__).resolve())]
    baseline = device_and_precision()[1]
    commands = {("imgfeat", p): lambda c, p=p: imgfeat_command(
        c, work / "out", "--model", spec, "--precision", p, *extra) for p in precisions()}
    commands[("seed recipe", baseline)] = lambda c: [
        *me, "--line", "seed", "--corpus", str(c), "--model", spec]
    commands[("conventional", baseline)] = lambda c: [
        *me, "--line", "conventional", "--corpus", str(c), "--model", spec]
    rows = []
    for (line, precision), command in commands.items():
        full, short = timed_process(command(corpus)), timed_process(command(small))
        rows.append((line, precision, count / full, (count - few) / max(full - short, 1e-9)))
    for precision in precisions():
        rate, eager = _line_output(me, "model", corpus, spec, precision)
        rows.append(("model-only ceiling", precision, rate, rate))
        rows.append(("model only, eager timm model", precision, eager, eager))
    decode = _line_output(me, "decode", corpus, spec, baseline)[0]
    rows.append(("decode-only ceiling", "-", decode, decode))
    return rows


def _line_output(me: list[str], line: str, corpus: Path, spec: str, precision: str) -> list:
    output = subprocess.run([*me, "--line", line, "--corpus", str(corpus), "--model", spec,
                             "--precision", precision],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def report(spec: str, count: int, rows: list[tuple[str, str, float, float]]) -> str:
    steady = {(line, precision): rate for line, precision, _, rate in rows}
    decode = steady[("decode-only ceiling", "-")]
    shared = cores() <= 4  # decode and model share the cores: the best is their serial sum
    name = "serial sum" if shared else "min"
    ceilings = {}
    for precision in precisions():
        model = max(steady[("model-only ceiling", precision)],
                    steady[("model only, eager timm model", precision)])
        ceilings[precision] = 1 / (1 / decode + 1 / model) if shared else min(decode, model)
        rows.append((f"ceiling: {name} of decode and model", precision, 0.0,
                     ceilings[precision]))
    lines = [f"{count} JPEGs.", "",
             "| line | precision | end to end, images/s | steady, images/s | "
             "imgfeat (steady, same precision) is x |", "|---|---|---|---|---|"]
    for line, precision, end_to_end, rate in rows:
        mine = steady.get(("imgfeat", precision), steady[("imgfeat", "fp32")])
        lines.append(f"| {line} | {precision} | {f'{end_to_end:.1f}' if end_to_end else ''} | "
                     f"{rate:.1f} | {mine / rate:.2f} |")
    if "bf16" in ceilings:
        fast, slow = steady[("imgfeat", "bf16")], steady[("imgfeat", "fp32")]
        ends = {p: e for line, p, e, _ in rows if line == "imgfeat"}
        lines += ["", f"imgfeat bf16 against imgfeat fp32: {fast / slow:.2f}x steady, "
                  f"{ends['bf16'] / ends['fp32']:.2f}x end to end; imgfeat bf16 is "
                  f"{fast / ceilings['bf16']:.2f} of its bf16 {name} ceiling."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--line", choices=("seed", "conventional", "model", "decode"))
    parser.add_argument("--corpus", type=Path)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--model", action="append")
    parser.add_argument("--precision", help="the precision of a --line model run")
    parser.add_argument("--imgfeat-option", action="append", default=[],
                        help="extra option for the imgfeat line (repeatable)")
    parser.add_argument("--work", type=Path,
                        default=Path(tempfile.gettempdir()) / "imgfeat-bench")
    args = parser.parse_args()
    if args.line:
        spec = args.model[0]
        if args.line == "seed":
            print(json.dumps([seed_recipe(args.corpus, spec)]))
        elif args.line == "conventional":
            print(json.dumps([conventional(args.corpus, spec)]))
        elif args.line == "model":
            print(json.dumps(model_ceiling(spec, args.precision)))
        else:
            print(json.dumps([decode_ceiling(args.corpus, spec)]))
        return
    corpus = build(args.work / f"corpus-{args.count}", args.count)
    small = build(args.work / "corpus-100", 100)
    device, _ = device_and_precision()
    for spec in args.model or ["timm:resnet50", "timm:mobilenetv3_small_100"]:
        load = os.getloadavg()[0]
        rows = measure(corpus, small, spec, args.work, args.imgfeat_option)
        section = report(spec, args.count, rows)
        print(section, "\n", flush=True)
        write_section(f"Throughput against the alternatives: {spec} ({device})",
                      f"Machine: {machine()}; commit {commit()}; load average {load:.1f} at "
                      f"the start, {os.getloadavg()[0]:.1f} at the end; random weights; "
                      "500x375 JPEGs (quality 90). All lines measured in the same run; the "
                      "seed recipe and the conventional script at the device's usual precision "
                      "(fp32 on CPU). Lines 1-3 are whole processes: end to end includes "
                      "start-up; steady is (N - 100) / (time on N - time on the first 100)."
                      "\n\n" + section)


if __name__ == "__main__":
    main()
