"""bench/gpu_acceptance.py's judgement: each line held against its ceiling, the targets, the
decision on `--decode auto`, and the section written to docs/benchmarks.md."""

from __future__ import annotations

from dataclasses import dataclass

CEILING_TARGET = 0.9  # of min(model-only, decode) ceiling
GOAL = 10_000  # images/s: ResNet-50 from JPEG files on one H100
AUTO_SWITCH = "set AUTO_INCLUDES_GPU = True in src/imgfeat/pipeline/gpu_decode.py"


@dataclass
class Line:
    name: str
    end_to_end: float | None = None
    steady: float | None = None
    ceiling: str | None = None  # which ceiling it is held to (see ceilings)
    note: str = ""
    failed: bool = False

    def describe(self) -> str:
        rates = f"{_rate(self.end_to_end)} end to end, {_rate(self.steady)} steady"
        return f"{self.name}: {rates}" + (f"; {self.note}" if self.note else "")


def _rate(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:,.0f}/s"


def ceilings(lines: list[Line]) -> dict[str, float | None]:
    """min(model-only, decode) per way of decoding: CPU cores, nvJPEG, both at once; and
    for ViT-B/16 with CPU decoding."""
    steady = {line.name: line.steady for line in lines}
    model = steady.get("model-only ceiling")
    vit = next((line.steady for line in lines
                if line.name.startswith("model-only ceiling: ")), None)
    cpu = steady.get("decode-only ceiling: CPU cores")
    nvjpeg = steady.get("decode-only ceiling: nvJPEG")
    both = cpu + nvjpeg if cpu and nvjpeg else None

    def lower(*values):
        return min(values) if all(values) else None

    return {"cpu": lower(model, cpu), "nvjpeg": lower(model, nvjpeg),
            "both": lower(model, both), "vit": lower(vit, cpu)}


def ratio(line: Line, limits: dict[str, float | None]) -> float | None:
    limit = limits.get(line.ceiling) if line.ceiling else None
    return line.steady / limit if line.steady and limit else None


def verdict(lines: list[Line], check: dict, tests: tuple[bool, str], rehearse: bool
            ) -> tuple[str, bool]:
    """The verdict's text, and whether the run passes (tests, decoding, ceiling target)."""
    from imgfeat.pipeline.gpu_decode import AUTO_INCLUDES_GPU

    limits, by_name = ceilings(lines), {line.name: line for line in lines}
    shipped = by_name.get("imgfeat --decode auto, GPU share on" if AUTO_INCLUDES_GPU
                          else "imgfeat --decode cpu")
    shipped_ratio = ratio(shipped, limits) if shipped else None
    meets = shipped_ratio is not None and shipped_ratio >= CEILING_TARGET
    failed = [line.name for line in lines if line.failed]
    best = max((line.steady or 0 for line in lines
                if line.name.startswith("imgfeat --")), default=0)
    text = [
        "verdict" + (" (a CPU rehearsal: figures meaningless)" if rehearse else ""),
        f"- CUDA-only tests: {'passed' if tests[0] else 'FAILED'} ({tests[1]})",
        f"- GPU decoding gives the CPU path's results: {_decoding(check)}",
        f"- imgfeat as shipped ({shipped.name if shipped else '?'}): "
        + (f"{shipped_ratio:.2f} of its ceiling (target {CEILING_TARGET}): "
           f"{'met' if meets else 'NOT met'}" if shipped_ratio else "not measured"),
        f"- goal, {GOAL:,} images/s on one GPU: {'met' if best >= GOAL else 'not met'} "
        f"(best imgfeat line {best:,.0f}/s)",
        f"- --decode auto may include the GPU: {_auto_decision(check, by_name)}",
    ]
    if failed:
        text.append(f"- lines that failed: {', '.join(failed)}")
    ok = tests[0] and bool(check.get("matches")) and meets and not failed
    text.append(f"- acceptance: {'PASS' if ok else 'FAIL'}")
    return "\n".join(text), ok


def _decoding(check: dict) -> str:
    if "failed" in check:
        return f"NOT checked ({check['failed']})"
    return ("yes" if check["matches"] else "NO") + \
        f" (cosine min {check['cosine min']:.4f}, same errors {check['same errors']}, " \
        f"truncated caught {check['truncated caught']})"


def _auto_decision(check: dict, by_name: dict[str, Line]) -> str:
    cpu = by_name.get("imgfeat --decode cpu")
    gpu_lines = [by_name.get(name) for name in ("imgfeat --decode gpu",
                                                "imgfeat --decode auto, GPU share on")]
    fastest = max((line.steady or 0 for line in gpu_lines if line), default=0)
    if not check.get("matches"):
        return "no: GPU decoding does not match the CPU path"
    if not (cpu and cpu.steady and fastest):
        return "not decided: lines missing"
    if fastest <= cpu.steady:
        return f"no: not faster ({fastest:,.0f}/s against {cpu.steady:,.0f}/s on the CPU)"
    return f"YES ({fastest:,.0f}/s against {cpu.steady:,.0f}/s): {AUTO_SWITCH}"


def report(lines: list[Line], check: dict, tests: tuple[bool, str], text: str, args,
           machine: str, commit: str, seconds: float) -> str:
    """The docs/benchmarks.md section."""
    limits = ceilings(lines)
    rows = ["| line | end to end, images/s | steady, images/s | steady / its ceiling | note |",
            "|---|---|---|---|---|"]
    for line in lines:
        share = ratio(line, limits)
        rows.append(f"| {line.name} | {_cell(line.end_to_end)} | {_cell(line.steady)} | "
                    f"{f'{share:.2f}' if share else ''} | {line.note} |")
    decoding = ", ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                         for key, value in check.items() if key != "pixels")
    pixels = ", ".join(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
                       for key, value in check.get("pixels", {}).items())
    return "\n".join([
        f"Machine: {machine}; commit {commit}; `python bench/gpu_acceptance.py` "
        f"({seconds:.0f} s). {args.count} ImageNet-like JPEGs (500x375, quality 90), "
        f"{args.model} and {args.vit} with random weights, --precision auto; one GPU unless "
        "the line says otherwise. Steady: imgfeat from its shards' commit times, the scripts "
        "after their first 64 images. A ceiling is min(model-only, decode-only) for the way "
        "the line decodes.", "",
        f"CUDA-only tests: {tests[1]}.", "",
        f"Decoding check (imgfeat --decode gpu against cpu, real photos): {decoding}. "
        f"Model-sized pixels, device against CPU path: {pixels}.", "",
        *rows, "", *[line if line.startswith("- ") else f"**{line}**"
                     for line in text.splitlines()]])


def _cell(value: float | None) -> str:
    return "" if value is None or value != value else f"{value:,.0f}"
