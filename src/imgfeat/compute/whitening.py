"""PCA whitening learned from a store: x -> P (x - m), with P = diag(s^-1/2) U^T over the top
`dim` eigenpairs (s, U) of the covariance of the learning features. Whitened learning features
have identity covariance on the kept dimensions.

A whitening file (.npz) holds the mean, the projection, and whether the features it was
learned from were L2-normalised (so the same normalisation is applied before projecting).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgfeat.errors import UsageError

EPS = 1e-12


@dataclass(frozen=True)
class Whitening:
    mean: np.ndarray        # (C,)
    projection: np.ndarray  # (D, C)
    input_l2: bool

    @property
    def dim(self) -> int:
        return self.projection.shape[0]

    def apply(self, features: np.ndarray, l2: bool = False) -> np.ndarray:
        """Whiten (N, C) float features; with `l2`, L2-normalise the result."""
        features = np.asarray(features, dtype=np.float64)
        if self.input_l2:
            features = _unit(features)
        whitened = (features - self.mean) @ self.projection.T
        return _unit(whitened) if l2 else whitened

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    def to_bytes(self) -> bytes:
        """The whitening as an .npz file's bytes (what `load` reads)."""
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, projection=self.projection,
                 input_l2=np.asarray(self.input_l2))
        return buffer.getvalue()

    def digest(self) -> str:
        sha = hashlib.sha256()
        for array in (self.mean, self.projection, np.asarray(self.input_l2)):
            sha.update(np.ascontiguousarray(array).tobytes())
        return sha.hexdigest()

    def describe(self) -> dict:
        return {"dim": self.dim, "sha256": self.digest(), "input_l2": self.input_l2}


def learn(features: np.ndarray, dim: int, input_l2: bool = False) -> Whitening:
    """PCA whitening of `features` (N, C), keeping the `dim` strongest directions."""
    return learn_batches([features], dim, input_l2)


def learn_batches(batches: Iterable[np.ndarray], dim: int, input_l2: bool = False
                  ) -> Whitening:
    """PCA whitening learned from (n, C) batches, streamed: memory is one batch and a C x C
    matrix, whatever the number of rows."""
    moments = Moments()
    for batch in batches:
        batch = np.asarray(batch, dtype=np.float64)
        if batch.ndim != 2:
            raise UsageError("whitening needs vector features; this store holds feature maps "
                             "(extract with --pool)")
        moments.add(_unit(batch) if input_l2 else batch)
    count, width = moments.count, moments.width
    if not 1 <= dim <= min(width, count - 1):
        raise UsageError(f"--dim must be between 1 and {min(width, count - 1)} for "
                         f"{count} features of {width} dimensions, got {dim}")
    values, vectors = np.linalg.eigh(moments.scatter / (count - 1))
    order = np.argsort(values)[::-1][:dim]
    values, vectors = values[order], vectors[:, order]
    if values[-1] <= EPS * max(values[0], EPS):
        raise UsageError(f"the features span fewer than {dim} dimensions; use a smaller --dim "
                         "or more images")
    return Whitening(moments.mean, (vectors / np.sqrt(values)).T, input_l2)


class Moments:
    """Count, mean and centred scatter matrix of rows seen so far, merged batch by batch
    (Chan et al.'s pairwise update): as exact as centring the whole matrix at once, which
    summing raw squares would not be for features far from the origin."""

    def __init__(self):
        self.count, self.mean, self.scatter = 0, np.zeros(0), np.zeros((0, 0))

    @property
    def width(self) -> int:
        return self.mean.shape[0]

    def add(self, batch: np.ndarray) -> None:
        if len(batch) == 0:
            return
        mean = batch.mean(axis=0)
        centred = batch - mean
        scatter = centred.T @ centred
        if self.count == 0:
            self.count, self.mean, self.scatter = len(batch), mean, scatter
            return
        total = self.count + len(batch)
        delta = mean - self.mean
        self.scatter = self.scatter + scatter + np.outer(delta, delta) * (
            self.count * len(batch) / total)
        self.mean = self.mean + delta * (len(batch) / total)
        self.count = total


def load(path: str | Path, storage_options: dict | None = None) -> Whitening:
    """A whitening file written by `imgfeat whiten`: a path, or a URL (s3://...)."""
    from imgfeat.store import storage

    try:
        source = io.BytesIO(storage.read_bytes(str(path), storage_options)) \
            if storage.is_url(str(path)) else path
        with np.load(source) as data:
            return Whitening(data["mean"], data["projection"], bool(data["input_l2"]))
    except (OSError, KeyError, ValueError) as exc:
        raise UsageError(f"cannot read whitening file {path}: {storage.reason(exc)}") from None


def _unit(features: np.ndarray) -> np.ndarray:
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), EPS)
