"""The worker process: pinned to its device and cores, it loads the model once, then runs the
shards its engine sends until told to stop (or its parent dies)."""

from __future__ import annotations

import os
import queue
import signal
import sys
import traceback
from dataclasses import dataclass

from imgfeat.batching import auto_batch
from imgfeat.devices import Placement, resolve_device, resolve_precision
from imgfeat.errors import UsageError
from imgfeat.plan import read_shard_items
from imgfeat.sources import Item
from imgfeat.store.layout import Layout

PARENT_CHECK_S = 1.0


@dataclass(frozen=True)
class Task:
    """One shard to extract. `careful`: decode one image at a time and say which; `excluded`:
    positions already known to kill workers, recorded as errors instead of decoded."""

    index: int
    careful: bool = False
    excluded: tuple[tuple[int, str], ...] = ()


def build_extractor(opts, device: str):
    """The model on `device`, checked: unknown models, layers or weights raise UsageError."""
    from imgfeat.extractor import Extractor
    from imgfeat.models import load_model
    from imgfeat.models.layers import resolve_layers

    device_ = resolve_device(device)
    precision = resolve_precision(opts.precision, device_)
    model = load_model(opts.model, opts.weights)
    layers = resolve_layers(model, opts.layers)
    size = (opts.image_size, opts.image_size) if opts.image_size else None
    mean, std = _normalisation(opts)
    preprocess = model.preprocess.with_overrides(
        size=size, crop_pct=opts.crop_pct, mode=opts.resize_mode,
        interpolation=opts.interpolation, mean=mean, std=std, jpeg_draft=opts.jpeg_draft)
    whitening = None
    if opts.whiten:
        from imgfeat.whitening import load

        whitening = load(opts.whiten)
    return Extractor(model, layers, preprocess, device=device_, precision=precision,
                     pool=opts.pool, l2=opts.l2, dtype=opts.dtype, gem_p=opts.gem_p,
                     scales=tuple(opts.scales), whitening=whitening, freeze=opts.freeze,
                     compile=opts.compile)


def _normalisation(opts) -> tuple[tuple | None, tuple | None]:
    """--mean/--std (0-1 units), or Caffe-style --mean-pixel/--mean-file (0-255) and
    --input-scale; None leaves the model's own."""
    mean = tuple(opts.mean) if opts.mean else None
    std = tuple(opts.std) if opts.std else None
    pixel = opts.mean_pixel
    if opts.mean_file:
        from imgfeat.models.caffe import mean_from_file

        pixel = mean_from_file(opts.mean_file)
    if pixel:
        mean = tuple(value / 255.0 for value in pixel)
    if opts.input_scale:
        std = (1.0 / (255.0 * opts.input_scale),) * 3
    return mean, std


class ShardRunner:
    """One worker's model and pipeline, pinned to its device: what both engines run."""

    def __init__(self, placement: Placement, opts, out: str):
        import torch  # here, not at the top: the coordinator imports this module too

        from imgfeat.allocator import keep_freed_memory
        from imgfeat.device_decode import resolve_decode
        from imgfeat.worker import Worker

        keep_freed_memory()
        if placement.cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, placement.cpus)
        torch.set_num_threads(placement.torch_threads)
        if placement.device.startswith("cuda"):
            torch.cuda.set_device(placement.device)
        self.extractor = build_extractor(opts, placement.device)
        self.layout = Layout(out)
        batch_size = opts.batch_size or auto_batch(self.extractor)
        threads, shares_cores = placement.decode_threads, placement.device == "cpu"
        if shares_cores:
            model_threads = cpu_model_threads(self.extractor, batch_size,
                                              placement.torch_threads)
            torch.set_num_threads(model_threads)
            threads = opts.threads or cpu_decode_threads(model_threads, placement.torch_threads)
        self.worker = Worker(self.extractor, self.layout, batch_size=batch_size,
                             threads=threads, max_pixels=opts.max_pixels,
                             profile=opts.profile, yield_to_model=shares_cores,
                             decode=resolve_decode(opts.decode, self.extractor.device))

    def identity(self) -> dict:
        return self.extractor.identity()

    def run(self, task: Task, progress, current=None) -> tuple:
        """(index, rows, errors, seconds per stage or None) of one committed shard."""
        items = _with_exclusions(read_shard_items(self.layout, task.index), task.excluded)
        result = self.worker.run_shard(task.index, items, progress,
                                       current=current if task.careful else None)
        return (result.index, result.rows, result.errors,
                getattr(self.worker.times, "seconds", None))

    def close(self) -> None:
        self.worker.close()


# Decode + preprocess rate of one core on ImageNet-sized JPEGs (measured here: ~490 img/s
# for 500x375 at 224 px); a conservative figure, used only to split a CPU worker's cores.
DECODE_PER_CORE = 450.0


def cpu_model_threads(extractor, batch_size: int, cores: int) -> int:
    """How many of a CPU worker's cores the model gets; the rest decode in parallel.

    Decoding and the model share the cores. When the model is light, giving it every core
    makes both stages fight (190 img/s for MobileNetV3 on 2 cores) where a core each runs
    them as a pipeline (318 img/s; both before freezing and the allocator setting). Balance
    d * r = (cores - d) * M / cores, with M the model's measured rate on all cores and r the
    decode rate of one core.
    """
    import time

    import torch

    if cores < 2:
        return cores
    batch = torch.zeros((batch_size, *extractor.preprocess.size, 3), dtype=torch.uint8)
    extractor(batch)  # warm up
    began = time.perf_counter()
    extractor(batch)
    model_rate = batch_size / max(time.perf_counter() - began, 1e-9)
    decode_cores = cores * model_rate / (cores * DECODE_PER_CORE + model_rate)
    return max(1, cores - round(decode_cores))


def cpu_decode_threads(model_threads: int, cores: int) -> int:
    """Decode threads of a CPU worker: one per core the model leaves free (more would only
    take turns on the model's cores); with the model on every core, one per core, running at
    low priority in the model's gaps (see Worker's `yield_to_model`)."""
    return cores - model_threads if model_threads < cores else cores


def worker_main(slot: int, placement: Placement, opts, out: str, tasks, results,
                current) -> None:
    """Entry point of a spawned worker process of the local engine."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    try:
        runner = ShardRunner(placement, opts, out)
    except UsageError as exc:
        results.put(("fatal", slot, str(exc)))
        return
    results.put(("ready", slot, runner.identity()))
    parent = os.getppid()

    def progress(rows: int, errors: int) -> None:
        results.put(("progress", slot, rows, errors))

    while (task := _next_task(tasks, parent)) is not None:
        try:
            done = runner.run(task, progress, current)
        except BaseException:  # any failure here is the shard's: report it, let a new
            results.put(("failed", slot, task.index, _last_line(traceback.format_exc())))
            sys.exit(1)         # process retry it (a CUDA error leaves this one unusable)
        results.put(("done", slot, *done))
    runner.close()


def _next_task(tasks, parent: int) -> Task | None:
    while True:
        try:
            return tasks.get(timeout=PARENT_CHECK_S)
        except queue.Empty:
            if os.getppid() != parent:  # orphaned: the coordinator is gone
                return None


def _with_exclusions(items: list[Item], excluded) -> list[Item]:
    for position, reason in excluded:
        items[position] = Item(items[position].key, None, reason)
    return items


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (kill -9 of the coordinator)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "unknown error"
