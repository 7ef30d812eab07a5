"""Run in a spawned process by test_device_workers: the local engine's worker entry point, with
a stand-in for the device worker that reports what the process sees and stops."""

import os

from imgfeat.engine import worker_process
from imgfeat.errors import UsageError


def report_view(placement, results, count_devices: bool) -> None:
    class Recorder:
        def __init__(self, placement, _opts, _out):
            count = None
            if count_devices:
                import torch

                count = torch.cuda.device_count()
            results.put(("view", os.environ.get("CUDA_VISIBLE_DEVICES"), placement.device,
                         count))
            raise UsageError("seen")

    worker_process.DeviceWorker = Recorder
    worker_process.worker_process_main(0, placement, None, "", None, results, None)


def lock_then_exit(results) -> None:
    """Make a named semaphore (as the decode pool's queues do), then end as a worker ends."""
    import multiprocessing

    lock = multiprocessing.get_context("spawn").Lock()
    results.put(lock._semlock.name)
    worker_process._exit_now(results)
