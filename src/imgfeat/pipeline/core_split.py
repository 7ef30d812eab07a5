"""How a CPU worker splits its cores between the model and the decode threads."""

from __future__ import annotations

# Decode + preprocess rate of one core on ImageNet-sized JPEGs (measured here: ~720 img/s
# for 500x375 at 224 px, bicubic, with simplejpeg and torch's resize; ~490 with Pillow
# alone); a conservative figure, used only to split a CPU worker's cores.
DECODE_PER_CORE = 650.0


def cpu_model_threads(extractor, batch_size: int, cores: int,
                      decode_rate: float = DECODE_PER_CORE) -> int:
    """How many of a CPU worker's cores the model gets; the rest decode in parallel. The
    model's rate is measured as it will run (precision, frozen graph), so a model that bf16
    makes faster gets the split its new speed calls for."""
    import time

    import torch

    if cores < 2:
        return cores
    batch = torch.zeros((batch_size, *extractor.preprocess.size, 3), dtype=torch.uint8)
    extractor(batch)  # warm up
    began = time.perf_counter()
    extractor(batch)
    model_rate = batch_size / max(time.perf_counter() - began, 1e-9)
    return cores - decode_cores(model_rate, decode_rate, cores)


def decode_cores(model_rate: float, decode_rate: float, cores: int) -> int:
    """The cores to give decoding alone, 0 to cores - 1.

    Decoding and the model share the cores. When the model is light, giving it every core
    makes both stages fight (190 img/s for MobileNetV3 on 2 cores) where a core each runs
    them as a pipeline (318 img/s; both before freezing and the allocator setting). Balance
    d * r = (cores - d) * M / cores, with M the model's measured rate on all cores and r the
    decode rate of one core, and round. Measured again for bf16 on 2 cores (AVX512-BF16):
    MobileNetV3 ran 400-440 img/s as a pipeline against 160-340 sharing both cores, in fp32
    and bf16 alike, and ResNet-50 in bf16 42 img/s sharing against 24 as a pipeline; the
    rounding picks the faster of each.
    """
    balanced = cores * model_rate / (cores * decode_rate + model_rate)
    return min(cores - 1, round(balanced))


def cpu_decode_threads(model_threads: int, cores: int) -> int:
    """Decode threads of a CPU worker: one per core the model leaves free (more would only
    take turns on the model's cores); with the model on every core, one per core, running at
    low priority in the model's gaps (see ShardPipeline's `yield_to_model`)."""
    return cores - model_threads if model_threads < cores else cores
