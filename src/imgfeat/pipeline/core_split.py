"""How a CPU worker splits its cores between the model and the decode threads."""

from __future__ import annotations

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
    low priority in the model's gaps (see ShardPipeline's `yield_to_model`)."""
    return cores - model_threads if model_threads < cores else cores
