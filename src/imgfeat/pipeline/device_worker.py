"""A device's worker, what both engines run: pinned to its device and cores, it loads the
model once, sizes batches and decode threads, and then runs one shard task at a time."""

from __future__ import annotations

import os
from dataclasses import dataclass

from imgfeat.engine.placement import Placement
from imgfeat.plan.shards import read_shard_items
from imgfeat.sources import Item
from imgfeat.store.remote import open_layout


@dataclass(frozen=True)
class Task:
    """One shard to extract. `careful`: decode one image at a time and say which; `excluded`:
    positions already known to kill workers, recorded as errors instead of decoded."""

    index: int
    careful: bool = False
    excluded: tuple[tuple[int, str], ...] = ()


# With --decode gpu the decode threads only read files and parse headers, and each takes turns
# on the GIL with the thread that drives nvJPEG: on an H200 machine with ResNet-50, 16 threads
# ran 2,235 img/s, 8 ran 2,747 and 4 ran 3,051 (docs/benchmarks.md).
GPU_DECODE_THREADS = 4


class DeviceWorker:
    """One worker's model and pipeline, pinned to its device: what both engines run."""

    def __init__(self, placement: Placement, opts, out: str):
        import torch  # here, not at the top: the coordinator imports this module too

        from imgfeat.compute.build import build_extractor
        from imgfeat.compute.device import tune_backends
        from imgfeat.pipeline.batch_size import auto_batch
        from imgfeat.pipeline.core_split import cpu_decode_threads, cpu_model_threads
        from imgfeat.pipeline.gpu_decode import decode_memory, resolve_decode
        from imgfeat.pipeline.host_memory import keep_freed_memory
        from imgfeat.pipeline.shard_pipeline import ShardPipeline

        keep_freed_memory()
        if placement.cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, placement.cpus)
        torch.set_num_threads(placement.torch_threads)
        if placement.device.startswith("cuda"):
            torch.cuda.set_device(placement.device)
        self.layout = open_layout(out, getattr(opts, "storage_options", None), pulled=False)
        self.extractor = build_extractor(opts, placement.device, self._recorded(opts))
        decode = resolve_decode(opts.decode, self.extractor.device)
        reserve = (0, 0) if decode == "cpu" else decode_memory(self.extractor.preprocess)
        batch_size = opts.batch_size or auto_batch(self.extractor, reserve)
        # After the probe, whose peaks must not include cuDNN's trial workspaces.
        tune_backends(self.extractor.device, opts.precision)
        threads, shares_cores = placement.decode_threads, False
        if decode == "gpu" and not opts.threads:
            threads = min(threads, GPU_DECODE_THREADS)
        if placement.device == "cpu":
            model_threads = cpu_model_threads(self.extractor, batch_size,
                                              placement.torch_threads)
            torch.set_num_threads(model_threads)
            threads = opts.threads or cpu_decode_threads(model_threads, placement.torch_threads)
            # Decoding yields only where it would take the model's cores: on cores of its own
            # (a pipeline), low priority only starved it behind any other process.
            shares_cores = model_threads + threads > placement.torch_threads
        self.pipeline = ShardPipeline(self.extractor, self.layout, batch_size=batch_size,
                             threads=threads, max_pixels=opts.max_pixels,
                             profile=opts.profile, yield_to_model=shares_cores,
                             decode=decode,
                             storage_options=getattr(opts, "storage_options", None))

    def identity(self) -> dict:
        return self.extractor.identity()

    def _recorded(self, opts) -> dict | None:
        """The manifest of the store this run continues: its precision is the run's."""
        from imgfeat.errors import UsageError
        from imgfeat.store.manifest import read_manifest

        if opts.overwrite:
            return None
        try:
            return read_manifest(self.layout)
        except UsageError:
            return None  # the coordinator refuses an unreadable store in one line

    def run(self, task: Task, progress, current=None) -> tuple:
        """(index, rows, errors, seconds per stage or None, float16 overflow rows, the
        store's record entry) of one committed shard."""
        items = _with_exclusions(read_shard_items(self.layout, task.index), task.excluded)
        result = self.pipeline.run_shard(task.index, items, progress,
                                       current=current if task.careful else None)
        return (result.index, result.rows, result.errors,
                getattr(self.pipeline.times, "seconds", None), result.overflow_rows,
                result.entry)

    def close(self) -> None:
        self.pipeline.close()


def _with_exclusions(items: list[Item], excluded) -> list[Item]:
    for position, reason in excluded:
        items[position] = items[position].failed(reason)
    return items
