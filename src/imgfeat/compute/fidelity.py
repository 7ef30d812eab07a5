"""The check of bf16 against fp32 before a CPU worker's first image: weights that users bring
are not random, and some lose their meaning in bf16's 8-bit mantissa.

The worker runs one batch in bf16, exactly as the run will (frozen graph included), and the
same batch eagerly in fp32, and compares what would be stored (after the head and whitening,
before the stored dtype) image by image. Below `THRESHOLD` for any image, `auto` runs fp32
for the whole run and says so in one line; a forced bf16 runs on and says how far it is.

The batch is made here rather than taken from the run's images: the workers report what
they compute before the run opens its store and plans its shards, and every worker of a run
must reach the same decision from the same batch. So the batch is synthetic but photo-like:
correlated colour fields whose amplitude spectrum falls as 1/f^1.6, which gives them the
contrast and smoothness of photos at model input sizes (neighbouring pixels differ by 0.1 to
0.2 of the spread of values, as in the test photos), so they drive a network's activations
as photos do; uniform noise, with most of its energy at the highest frequencies, does not.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch

THRESHOLD = 0.999
CHECK_IMAGES = 8
_SEED = 18
_SPECTRUM = 1.6  # amplitude ~ 1/f^this
_CONTRAST = 64.0  # standard deviation of the pixel values, out of 255


def check_batch(size: tuple[int, int], count: int = CHECK_IMAGES) -> torch.Tensor:
    """`count` photo-like uint8 images (N, H, W, 3), the same on every machine."""
    rng = np.random.default_rng(_SEED)
    height, width = size
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    falloff = np.maximum(np.hypot(fy, fx), 1.0 / max(height, width)) ** -_SPECTRUM
    images = np.empty((count, height, width, 3), dtype=np.uint8)
    for n in range(count):
        phases = np.exp(2j * np.pi * rng.random((3, *falloff.shape)))
        fields = np.fft.irfft2(falloff * phases, s=(height, width))
        mixing = np.eye(3) * 0.4 + 0.6  # colour channels of photos are mostly correlated
        fields = np.tensordot(mixing, fields, axes=1)
        fields = (fields - fields.mean()) / (fields.std() + 1e-12)
        images[n] = np.clip(128 + _CONTRAST * fields.transpose(1, 2, 0)
                            + rng.normal(0, 3, (height, width, 3)), 0, 255)
    return torch.from_numpy(images)


def agreement(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """The lowest cosine between corresponding images' features over every layer; an image
    whose features are zero in both agrees, in one only does not."""
    lowest = 1.0
    for layer, expected in want.items():
        a = np.asarray(got[layer], np.float64).reshape(len(expected), -1)
        b = np.asarray(expected, np.float64).reshape(len(expected), -1)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        both_zero = (np.abs(a).max(axis=1) == 0) & (np.abs(b).max(axis=1) == 0)
        cosine = np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-300), 0.0)
        lowest = min(lowest, float(np.where(both_zero, 1.0, cosine).min()))
    return lowest


def guard(extractor, may_fall_back: bool, requested: str) -> dict:
    """Check the extractor's bf16 against fp32; fall back to fp32 if allowed and needed.
    Returns the record the manifest keeps (and sets it on the extractor)."""
    batch = check_batch(extractor.preprocess.size)
    # A compiled model side would compile for this batch's size only to compile again for
    # the run's: the check measures its eager bf16, which the compiler reproduces.
    with extractor.eagerly() if extractor.compiled else contextlib.nullcontext():
        got = extractor.float_features(batch)
    want = extractor.float_features(batch, fp32=True)
    score = agreement(got, want)
    passed = score >= THRESHOLD
    record = {"requested": requested, "tried": "bf16", "agreement": round(score, 6),
              "threshold": THRESHOLD, "images": len(batch),
              "used": "bf16" if passed or not may_fall_back else "fp32"}
    if not passed:
        action = "running fp32 for the whole run" if may_fall_back else \
            "kept because --precision bf16 forces it"
        print(f"imgfeat: bf16 features agree with fp32 only to cosine {score:.5f} (under "
              f"{THRESHOLD}) on the start-up check; {action}", file=sys.stderr, flush=True)
    if record["used"] == "fp32":
        extractor.use_precision("fp32")
    extractor.precision_check = record
    return record

