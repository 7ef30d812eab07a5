"""The GPU acceptance command: what imgfeat's GPU paths do on a real GPU, in one run of at most
ten minutes on an H100.

1. the CUDA-only tests (`pytest -m cuda`; they skip on machines without a GPU);
2. GPU decoding against the CPU path on real photos (bench/decode_check.py): the features'
   cosine, truncated files caught, the same error set; whether `--decode auto` may take the GPU;
3. on COUNT ImageNet-like JPEGs (bench/corpus.py, 20,000) with ResNet-50 at 224 on one GPU:
   imgfeat end to end with --decode cpu, gpu and auto (as shipped, and with its GPU share on),
   with and without --compile; the seed recipe ported to PyTorch (on the first 2,000: it runs
   one image at a time); the conventional DataLoader script; the model-only ceiling at the auto
   batch size; the decode-only ceilings (all CPU cores; nvJPEG); ViT-B/16 end to end;
4. with several GPUs, all of them against one (scaling efficiency);
5. writes the figures to docs/benchmarks.md (a section named after the GPU) and prints the
   verdict: imgfeat at >= 0.9 of min(model-only, decode) ceiling, and the goal, 10,000 images/s
   for ResNet-50 from JPEG files on one H100. Exit status 1 when a test, the decoding check or
   the ceiling target fails.

Steady rates leave start-up out: imgfeat's from its shards' commit times (four shards a run),
the scripts' from their own clock after a warm-up. Lines that would overrun the time budget are
skipped, and the report says so. Without a GPU the command says so in one line and exits 0;
`--rehearse` runs every step small on the CPU, to check the command itself (figures
meaningless, written under --work, not to docs).

    python bench/gpu_acceptance.py [--count 20000] [--budget 570] [--skip-tests] [--rehearse]
    python bench/gpu_acceptance.py --only "decode cpu" --only probe   # chosen lines alone
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
os.environ["PYTHONPATH"] = os.pathsep.join(  # this tree's imgfeat, here and in every child
    filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
sys.path.insert(0, str(ROOT / "src"))

from common import RESULTS, commit, imgfeat_command, machine, write_section  # noqa: E402
from corpus import build  # noqa: E402
from decode_check import check as check_decoding  # noqa: E402
from gpu_verdict import Line, report, verdict  # noqa: E402

SHARDS = 4  # per run: the steady rate is the rows of shards 2..4 over their commit times


class LineFailed(Exception):
    pass


class Acceptance:
    """One run: its options, its clock, and the lines measured so far."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.began = args, time.monotonic()
        self.device = "cpu" if args.rehearse else "cuda:0"
        self.work: Path = args.work
        self.lines: list[Line] = []

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.began)

    def process(self, command: list[str], timeout: float, env: dict | None = None
                ) -> tuple[float, str]:
        """(seconds, stdout) of a command that must succeed within `timeout`."""
        began, limit = time.perf_counter(), max(10.0, min(timeout, self.left()))
        try:
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                  timeout=limit, env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            raise LineFailed("skipped: time budget (stopped)" if limit < timeout
                             else f"timed out after {timeout:.0f} s") from None
        if done.returncode != 0:
            with open(self.work / "failures.log", "a") as log:  # the whole story, for later
                log.write(f"$ {' '.join(command)}\n{done.stdout}\n{done.stderr}\n\n")
            raise LineFailed(_last_line(done.stderr or done.stdout))
        return time.perf_counter() - began, done.stdout

    def json_of(self, command: list[str], timeout: float) -> tuple[float, object]:
        seconds, out = self.process(command, timeout)
        return seconds, json.loads(out.strip().splitlines()[-1])


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


# -- step 1 and 2 -------------------------------------------------------------------------------


def cuda_tests(run: Acceptance) -> tuple[bool, str]:
    # Only the modules that hold CUDA tests: the others import the test extras (moto, selenium,
    # faiss...), which a GPU machine set up for extraction alone need not have.
    files = sorted(str(path) for path in (ROOT / "tests").glob("test_*.py")
                   if "@cuda" in path.read_text())
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
               *files]
    try:
        _, out = run.process(command, timeout=run.left() * 0.4)
    except LineFailed as failed:
        return False, str(failed)
    return True, _last_line(out)


def decoding(run: Acceptance) -> dict:
    def extract(folder: Path, out: Path, decode: str) -> None:
        if decode == "gpu" and run.args.rehearse:
            decode = "cpu"  # the plumbing only: a CPU device has no GPU decoder
        run.process(imgfeat_command(folder, out, "--model", run.args.model, "--devices",
                                    run.device, "--precision", "fp32", "--dtype", "float32",
                                    "--decode", decode), timeout=240)

    try:
        result = check_decoding(run.work, extract)
        _, pixels = run.json_of(_lines_command(run, "pixels", run.work / "decode-check"), 120)
    except LineFailed as failed:
        return {"matches": False, "failed": str(failed)}
    return {**result, "pixels": pixels}


def _lines_command(run: Acceptance, line: str, corpus: Path, model: str | None = None):
    return [sys.executable, str(HERE / "gpu_lines.py"), line, "--corpus", str(corpus),
            "--model", model or run.args.model, "--device", run.device]


# -- step 3 and 4: the lines --------------------------------------------------------------------


def imgfeat_line(run: Acceptance, corpus: Path, *options: str, model: str | None = None,
                 devices: str | None = None, shards: int = SHARDS, env: dict | None = None,
                 timeout: float = 180) -> tuple[float, float | None]:
    count = len(list(corpus.glob("*.jpg")))
    out = run.work / "out"
    command = imgfeat_command(corpus, out, "--model", model or run.args.model,
                              "--devices", devices or run.device,
                              "--shard-size", str(max(1, count // shards)), *options)
    seconds, _ = run.process(command, timeout, env)
    return count / seconds, shard_rate(out)


def shard_rate(out: Path) -> float | None:
    """Rows per second after the first commit: the rows of the later shards over the time
    from the first shard's commit to the last's."""
    import h5py

    shards = sorted((path.stat().st_mtime_ns, path) for path in (out / "shards").glob("*.h5"))
    if len(shards) < 2 or shards[-1][0] == shards[0][0]:
        return None
    rows = 0
    for _, path in shards[1:]:
        with h5py.File(path, "r") as shard:
            rows += len(shard["keys"]) + len(shard["errors/keys"])
    return rows / ((shards[-1][0] - shards[0][0]) / 1e9)


def script_line(run: Acceptance, line: str, corpus: Path) -> tuple[float, float]:
    command = [sys.executable, str(HERE / "throughput.py"), "--line", line, "--corpus",
               str(corpus), "--model", run.args.model]
    seconds, (steady,) = run.json_of(command, timeout=240)
    return len(list(corpus.glob("*.jpg"))) / seconds, steady


def ceiling_line(run: Acceptance, command: list[str]) -> tuple[None, float, str]:
    _, result = run.json_of(command, timeout=180)
    if isinstance(result, list):
        return None, result[0], ""
    return None, result["rate"], f"batch {result['batch']}" if "batch" in result else \
        f"{result.get('taken')} of {result.get('files')} files to the device"


def plan(run: Acceptance, corpus: Path, prefix: Path) -> list[tuple]:
    """(name, seconds it may take, needs a GPU, ceiling it is held to, how to measure)."""
    on = {"IMGFEAT_AUTO_DECODE_GPU": "1"}
    vit = run.args.vit
    decode_cpu = [sys.executable, str(HERE / "throughput.py"), "--line", "decode", "--corpus",
                  str(corpus), "--model", run.args.model]
    return [
        ("imgfeat --decode cpu", 40, False, "cpu", lambda: imgfeat_line(run, corpus,
                                                                         "--decode", "cpu")),
        ("imgfeat --decode gpu", 40, True, "nvjpeg", lambda: imgfeat_line(run, corpus,
                                                                           "--decode", "gpu")),
        ("imgfeat --decode auto, GPU share on", 40, True, "both",
         lambda: imgfeat_line(run, corpus, "--decode", "auto", env=on)),
        ("model-only ceiling", 40, False, None,
         lambda: ceiling_line(run, _lines_command(run, "model", corpus))),
        ("decode-only ceiling: CPU cores", 30, False, None, lambda: ceiling_line(run, decode_cpu)),
        ("decode-only ceiling: nvJPEG", 30, True, None,
         lambda: ceiling_line(run, _lines_command(run, "nvjpeg", corpus))),
        ("conventional DataLoader script", 40, False, "cpu",
         lambda: script_line(run, "conventional", corpus)),
        (f"seed recipe (first {run.args.seed_images})", 40, False, "cpu",
         lambda: script_line(run, "seed", prefix)),
        ("scaling", 60, True, "cpu", lambda: scaling(run, corpus)),
        (f"imgfeat {vit} --decode cpu", 50, False, "vit",
         lambda: imgfeat_line(run, corpus, "--decode", "cpu", model=vit)),
        (f"model-only ceiling: {vit}", 40, False, None,
         lambda: ceiling_line(run, _lines_command(run, "model", corpus, vit))),
        ("imgfeat --compile --decode cpu", 150, False, "cpu",
         lambda: imgfeat_line(run, corpus, "--compile", "--decode", "cpu", timeout=400)),
        ("imgfeat --compile --decode gpu", 60, True, "nvjpeg",
         lambda: imgfeat_line(run, corpus, "--compile", "--decode", "gpu", timeout=400)),
        ("imgfeat --compile --decode auto, GPU share on", 60, True, "both",
         lambda: imgfeat_line(run, corpus, "--compile", "--decode", "auto", env=on,
                              timeout=400)),
    ]


def scaling(run: Acceptance, corpus: Path) -> tuple[float, float, str]:
    """All GPUs against one, both with the default decoding and one shard per GPU four
    times over; the note gives the efficiency, all / (GPUs x one)."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus < 2:
        raise LineFailed("skipped: one GPU")
    _, one = imgfeat_line(run, corpus, devices="cuda:0", shards=SHARDS * gpus)
    end_to_end, every = imgfeat_line(run, corpus, devices="cuda", shards=SHARDS * gpus)
    return end_to_end, every, f"{gpus} GPUs: {every / (gpus * one):.2f} of {gpus} x one " \
        f"({one:.0f}/s)"


def probes(run: Acceptance, corpus: Path) -> list[tuple]:
    """Lines run only when `--only` names them: what a choice of the pipeline is worth."""
    threads = {"IMGFEAT_DECODE_PROCESSES": "0"}
    return [
        ("probe: imgfeat --decode cpu on threads", 60, False, "cpu",
         lambda: imgfeat_line(run, corpus, "--decode", "cpu", env=threads)),
        ("probe: imgfeat --decode cpu, chunks of 32", 40, False, "cpu",
         lambda: imgfeat_line(run, corpus, "--decode", "cpu",
                              env={"IMGFEAT_DECODE_CHUNK": "32"})),
        ("probe: imgfeat --decode cpu --threads 12", 40, False, "cpu",
         lambda: imgfeat_line(run, corpus, "--decode", "cpu", "--threads", "12")),
        ("probe: imgfeat --decode gpu --threads 2", 40, True, "nvjpeg",
         lambda: imgfeat_line(run, corpus, "--decode", "gpu", "--threads", "2")),
        ("probe: imgfeat --decode gpu --threads 4", 40, True, "nvjpeg",
         lambda: imgfeat_line(run, corpus, "--decode", "gpu", "--threads", "4")),
        ("probe: imgfeat --decode gpu --threads 8", 40, True, "nvjpeg",
         lambda: imgfeat_line(run, corpus, "--decode", "gpu", "--threads", "8")),
    ]


def measure(run: Acceptance, corpus: Path, prefix: Path) -> None:
    chosen = plan(run, corpus, prefix)
    if run.args.only:
        chosen = [line for line in chosen + probes(run, corpus)
                  if any(part in line[0] for part in run.args.only)]
    for name, seconds, needs_gpu, ceiling, how in chosen:
        line = Line(name, ceiling=ceiling)
        if needs_gpu and run.args.rehearse:
            line.note = "skipped: needs a GPU"
        elif run.left() < seconds:
            line.note = "skipped: time budget"
        else:
            try:
                line.end_to_end, line.steady, *note = how()
                line.note = note[0] if note else ""
            except LineFailed as failed:
                line.note = str(failed) if str(failed).startswith("skipped") \
                    else f"failed: {failed}"
                line.failed = not line.note.startswith("skipped")
        run.lines.append(line)
        print(f"  {line.describe()}", flush=True)


# -- the command --------------------------------------------------------------------------------


def prefix_of(corpus: Path, count: int) -> Path:
    """The corpus's first `count` files, linked into a folder of their own."""
    prefix = corpus.parent / f"{corpus.name}-first-{count}"
    prefix.mkdir(exist_ok=True)
    for path in sorted(corpus.glob("*.jpg"))[:count]:
        link = prefix / path.name
        if not link.exists():
            link.symlink_to(path)
    return prefix


def options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int)
    parser.add_argument("--budget", type=float, default=570.0, help="seconds for the run")
    parser.add_argument("--model")
    parser.add_argument("--vit")
    parser.add_argument("--seed-images", type=int)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="measure only the lines whose name holds TEXT (repeatable; "
                             "also the probes); no tests, no decoding check, no docs")
    parser.add_argument("--rehearse", action="store_true",
                        help="run every step small on the CPU to check this command")
    parser.add_argument("--work", type=Path,
                        default=Path(tempfile.gettempdir()) / "imgfeat-gpu-acceptance")
    args = parser.parse_args(argv)
    small = args.rehearse
    args.count = args.count or (160 if small else 20_000)
    args.model = args.model or ("timm:mobilenetv3_small_100" if small else "timm:resnet50")
    args.vit = args.vit or ("timm:vit_tiny_patch16_224" if small else "timm:vit_base_patch16_224")
    args.seed_images = args.seed_images or (96 if small else 2_000)
    return args


def main(argv: list[str] | None = None) -> int:
    args = options(argv)
    from imgfeat.engine.placement import gpu_count  # without a driver: no torch import

    if not gpu_count() and not args.rehearse:
        print("gpu_acceptance: no CUDA GPU on this machine; nothing measured")
        return 0
    import torch

    run = Acceptance(args)
    run.work.mkdir(parents=True, exist_ok=True)
    print(f"gpu_acceptance: {machine()}; commit {commit()}", flush=True)
    if args.only:
        corpus = build(run.work / f"corpus-{args.count}", args.count)
        measure(run, corpus, prefix_of(corpus, args.seed_images))
        return 0 if not any(line.failed for line in run.lines) else 1
    tests = (True, "skipped (--skip-tests)") if args.skip_tests else cuda_tests(run)
    print(f"1. CUDA-only tests: {'passed' if tests[0] else 'FAILED'}: {tests[1]}", flush=True)
    check = decoding(run)
    print(f"2. decoding check: {json.dumps(check)}", flush=True)
    corpus = build(run.work / f"corpus-{args.count}", args.count)
    print(f"3-4. lines on {args.count} JPEGs, {args.model}:", flush=True)
    measure(run, corpus, prefix_of(corpus, args.seed_images))
    text, ok = verdict(run.lines, check, tests, rehearse=args.rehearse)
    print(text, flush=True)
    body = report(run.lines, check, tests, text, args, machine(), commit(),
                  time.monotonic() - run.began)
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU rehearsal"
    results = run.work / "benchmarks-rehearsal.md" if args.rehearse else RESULTS
    write_section(f"GPU acceptance: {name}", body, results)
    print(f"5. written to {results}", flush=True)
    if args.rehearse:  # the command itself works: every step ran, no line failed
        ok = tests[0] and "failed" not in check and not any(line.failed for line in run.lines)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
