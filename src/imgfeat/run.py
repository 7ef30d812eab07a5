"""One extraction run on one device: check everything a user could get wrong before any work,
open (or resume) the output folder, plan while extracting, and finish the store."""

from __future__ import annotations

import queue
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from imgfeat.decode import default_threads
from imgfeat.devices import resolve_device, resolve_precision
from imgfeat.errors import UsageError
from imgfeat.extractor import Extractor
from imgfeat.head import check_pool
from imgfeat.imaging import DEFAULT_MAX_PIXELS
from imgfeat.models import DEFAULT_MODEL, load_model
from imgfeat.models.layers import resolve_layer
from imgfeat.plan import DEFAULT_SHARD_SIZE, Shard, plan_shards, read_shard_items, recorded_shards
from imgfeat.progress import Reporter
from imgfeat.sources import check_sources, iter_items
from imgfeat.store.layout import Layout
from imgfeat.store.manifest import (
    FORMAT,
    identity_conflicts,
    read_manifest,
    software_versions,
    write_manifest,
)
from imgfeat.store.reader import Store
from imgfeat.store.virtual import build_virtual_file
from imgfeat.worker import Worker

DTYPES = ("float16", "float32")


@dataclass
class ExtractOptions:
    """Every setting of `imgfeat extract`; the CLI flags have the same names."""

    model: str = DEFAULT_MODEL
    weights: str = "pretrained"
    layer: str | None = None
    pool: str = "avg"
    l2: bool = False
    image_size: int | None = None
    crop_pct: float | None = None
    resize_mode: str | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    batch_size: int = 64
    devices: str = "auto"
    precision: str = "auto"
    dtype: str = "float16"
    shard_size: int = DEFAULT_SHARD_SIZE
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    threads: int | None = None
    overwrite: bool = False
    progress: str = "auto"  # auto | bar | lines | none

    def check(self) -> None:
        check_pool(self.pool)
        if self.dtype not in DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}; choose {', '.join(DTYPES)}")
        for name in ("batch_size", "shard_size", "image_size", "threads", "max_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def extract(sources: Iterable[str] | str, out: str, **options) -> Store:
    """Extract features of every image in `sources` into the output folder `out`.

    Options are those of `ExtractOptions` (model, weights, layer, pool, ...). Running the same
    call again resumes: committed shards are kept, the rest is done.
    """
    known = {f.name for f in fields(ExtractOptions)}
    if unknown := set(options) - known:
        raise UsageError(f"unknown option(s): {', '.join(sorted(unknown))}")
    opts = ExtractOptions(**options)
    opts.check()
    sources = check_sources([sources] if isinstance(sources, (str, Path)) else sources)
    extractor = _build_extractor(opts)
    layout = Layout(out)
    manifest = _open_output(layout, _identity(opts, sources, extractor), opts.overwrite)
    reporter = Reporter(opts.progress)
    worker = Worker(extractor, layout, batch_size=opts.batch_size,
                    threads=opts.threads or default_threads(), max_pixels=opts.max_pixels)
    try:
        _run(layout, manifest, sources, opts.shard_size, worker, reporter)
    finally:
        reporter.stop()
        worker.close()
    return Store(out)


def _build_extractor(opts: ExtractOptions) -> Extractor:
    device = resolve_device(opts.devices)
    precision = resolve_precision(opts.precision, device)
    model = load_model(opts.model, opts.weights)
    layer = resolve_layer(model, opts.layer)
    size = (opts.image_size, opts.image_size) if opts.image_size else None
    preprocess = model.preprocess.with_overrides(
        size=size, crop_pct=opts.crop_pct, mode=opts.resize_mode,
        interpolation=opts.interpolation,
        mean=tuple(opts.mean) if opts.mean else None, std=tuple(opts.std) if opts.std else None)
    return Extractor(model, layer, preprocess, device=device, precision=precision,
                     pool=opts.pool, l2=opts.l2, dtype=opts.dtype)


def _identity(opts: ExtractOptions, sources: list[str], extractor: Extractor) -> dict:
    return {
        "sources": [str(Path(s).resolve()) for s in sources],
        "model": {"spec": extractor.spec},
        "weights": extractor.weights,
        "layer": extractor.layer,
        "pool": opts.pool,
        "l2": opts.l2,
        "preprocess": extractor.preprocess.to_dict(),
        "precision": extractor.precision,
        "dtype": opts.dtype,
        "feature_shape": list(extractor.feature_shape),
        "shard_size": opts.shard_size,
    }


def _open_output(layout: Layout, identity: dict, overwrite: bool) -> dict:
    """The manifest to continue under: the recorded one if it agrees, else a fresh one."""
    if layout.root.exists() and not layout.root.is_dir():
        raise UsageError(f"output {layout.root} exists and is not a folder")
    recorded = None if overwrite else read_manifest(layout)
    if recorded is not None:
        if conflicts := identity_conflicts(recorded, identity):
            raise UsageError(
                f"{layout.root} already holds different features ({'; '.join(conflicts)}); "
                "use --overwrite to replace them, or choose another output folder")
        return recorded
    if overwrite:
        _remove_own(layout)
    elif layout.root.is_dir() and any(layout.root.iterdir()):
        raise UsageError(f"output folder {layout.root} is not empty and holds no imgfeat store; "
                         "choose a new or empty folder")
    manifest = {"format": FORMAT, **identity, "software": software_versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "plan": {"complete": False, "shards": []}}
    write_manifest(layout, manifest)
    return manifest


def _remove_own(layout: Layout) -> None:
    for path in layout.own_paths():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _run(layout: Layout, manifest: dict, sources: list[str], shard_size: int,
         worker: Worker, reporter: Reporter) -> None:
    plan = manifest["plan"]
    committed = layout.committed()
    if plan["complete"]:
        shards: Iterator[Shard] = iter([Shard(i, n) for i, n in enumerate(plan["shards"])])
        total = sum(plan["shards"])
    else:
        layout.plan_dir.mkdir(parents=True, exist_ok=True)
        recorded = recorded_shards(layout)
        shards = _in_background(plan_shards(iter_items(sources), layout, shard_size, recorded))
        total = None
    counts: list[int] = []
    started = time.monotonic()
    reporter.start(total, already_done=_count_committed(layout, committed))
    for shard in shards:
        counts.append(shard.count)
        if shard.index not in committed:
            items = read_shard_items(layout, shard.index)
            worker.run_shard(shard.index, items, reporter.advance)
    if not plan["complete"]:
        manifest["plan"] = {"complete": True, "items": sum(counts), "shards": counts}
        reporter.set_total(sum(counts))
    _finish(layout, manifest, reporter, time.monotonic() - started)


def _count_committed(layout: Layout, committed: set[int]) -> int:
    return sum(len(read_shard_items(layout, i)) for i in committed) if committed else 0


def _finish(layout: Layout, manifest: dict, reporter: Reporter, elapsed: float) -> None:
    committed = sorted(layout.committed())
    manifest["committed"] = committed
    write_manifest(layout, manifest)
    build_virtual_file(layout, committed, tuple(manifest["feature_shape"]), manifest["dtype"])
    done = reporter.rows + reporter.errors
    resumed = f", {reporter.already_done:,} done before" if reporter.already_done else ""
    reporter.summary(
        f"done: {done:,} images in {elapsed:.1f}s ({done / max(elapsed, 1e-9):,.1f} img/s): "
        f"{reporter.rows:,} rows, {reporter.errors:,} errors{resumed} -> {layout.root}")


def _in_background(generator: Iterator[Shard]) -> Iterator[Shard]:
    """Plan on a thread so extraction starts before a large source is fully listed."""
    results: queue.Queue = queue.Queue()
    done = object()

    def produce() -> None:
        try:
            for shard in generator:
                results.put(shard)
            results.put(done)
        except BaseException as exc:  # handed to the consuming thread, raised there
            results.put(exc)

    threading.Thread(target=produce, name="imgfeat-plan", daemon=True).start()
    while (value := results.get()) is not done:
        if isinstance(value, BaseException):
            raise value
        yield value
