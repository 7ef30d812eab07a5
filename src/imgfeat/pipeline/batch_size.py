"""How many images a forward pass takes when the user says `--batch-size auto` (the default).

CPU: 16, measured on a 2-core x86 machine (timm, fp32, 224 px): batch 16 gave 684 img/s for
MobileNetV3-small against 548 at 64, and ResNet-50 29 against 19.5, as large CPU batches spill
the caches. GPU: the largest batch whose pass fits in the memory the device has free, found
from the peak memory of two small probe passes, up to a cap past which GPUs gain nothing, less
what decoding on the device needs beside the model (pipeline.gpu_decode.decode_memory).
"""

from __future__ import annotations

import gc

CPU_BATCH = 16
GPU_BATCH_CAP = 1024
HEADROOM = 0.8  # of the free memory: the allocator's fragmentation, other processes
_PROBES = (8, 32)


def auto_batch(extractor, reserve: tuple[int, int] = (0, 0)) -> int:
    """The batch size for `extractor`: on CUDA the largest that fits beside `reserve` (bytes,
    bytes per batch row) of other device memory, else CPU_BATCH."""
    if extractor.device.type != "cuda":
        return CPU_BATCH
    import torch

    peaks = _probe_peaks(extractor)
    if len(peaks) < len(_PROBES):  # a huge model: the worker's halving takes over
        gc.collect()  # out of the handler, what the failed probe held can go
        torch.cuda.empty_cache()
        return max(peaks, default=1)
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(extractor.device)
    fixed, per_row = reserve
    return fit_batch(peaks, max(0, free - fixed), extra_per_image=per_row)


def _probe_peaks(extractor) -> dict[int, int]:
    """Peak device memory of a pass per probe size, up to the first that runs out."""
    import torch

    device, size = extractor.device, extractor.preprocess.size
    peaks = {}
    for count in _PROBES:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        try:
            with extractor.eagerly():  # compiled shapes are the real batches'
                extractor(torch.zeros((count, *size, 3), dtype=torch.uint8, device=device))
        except torch.cuda.OutOfMemoryError:
            break
        peaks[count] = torch.cuda.max_memory_allocated(device) - base
    return peaks


def fit_batch(peaks: dict[int, int], free: int, cap: int = GPU_BATCH_CAP,
              headroom: float = HEADROOM, extra_per_image: int = 0) -> int:
    """The largest batch, a multiple of 8 where it can be, whose peak memory (a line through
    the probes' peaks: fixed + per-image cost, plus `extra_per_image`) stays within `headroom`
    of `free`."""
    (small, small_peak), (large, large_peak) = sorted(peaks.items())[:2]
    per_image = max((large_peak - small_peak) / (large - small), 1.0)
    fixed = max(small_peak - per_image * small, 0.0)
    fits = int((free * headroom - fixed) // (per_image + extra_per_image))
    fits = min(cap, fits)
    return max(1, fits // 8 * 8 or fits)
