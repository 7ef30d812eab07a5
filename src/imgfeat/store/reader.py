"""The reader: a whole output folder opened as one table, rows in plan order."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from functools import cached_property, partial

import h5py
import numpy as np

from imgfeat.errors import UsageError
from imgfeat.store.layout import Layout, feature_datasets
from imgfeat.store.manifest import identity_digest, read_manifest
from imgfeat.store.paused_collection import collection_paused, paused
from imgfeat.store.row_index import RowIndex
from imgfeat.store.shard_cache import ShardCache
from imgfeat.store.shard_counts import recorded


class Store:
    """An output folder: `len(store)`, `store.keys`, `store.features()`, `store.errors`,
    and `store[key]` for one image's features."""

    def __init__(self, path: str | os.PathLike | Layout):
        """`path`: a folder, or the `Layout` of a store on object storage (whose shards are
        read from the bucket: `imgfeat.open_store`, store/remote.py)."""
        self.layout = path if isinstance(path, Layout) else Layout(path)
        manifest = read_manifest(self.layout)
        if manifest is None:
            raise UsageError(f"{self.location} is not an imgfeat output folder (no manifest.json)")
        self.manifest = manifest
        self.shards = sorted(self.layout.committed())
        self._files = ShardCache(self.layout.open_shard)

    @property
    def location(self) -> str:
        """Where the store is, as a user names it: its folder or its URL."""
        return self.layout.location

    def __repr__(self) -> str:
        return (f"Store({self.location!r}, rows={len(self)}, errors={self.error_count}, "
                f"model={self.model!r}, layers={self.layers!r})")

    @property
    def model(self) -> str:
        return self.manifest["model"]["spec"]

    @property
    def layers(self) -> list[str]:
        return list(self.manifest["layers"])

    @property
    def layer(self) -> str:
        """The layer of a single-layer store."""
        return self._layer(None)

    @property
    def feature_shapes(self) -> dict[str, tuple[int, ...]]:
        return {layer: tuple(shape) for layer, shape in self.manifest["layers"].items()}

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The feature shape of a single-layer store."""
        return self.feature_shapes[self._layer(None)]

    def _layer(self, layer: str | None) -> str:
        if layer is None and len(self.layers) == 1:
            return self.layers[0]
        if layer in self.layers:
            return layer
        raise UsageError(f"this store holds layers {', '.join(self.layers)}; name one"
                         if layer is None else
                         f"no layer {layer!r} in this store (it holds {', '.join(self.layers)})")

    @cached_property
    def datasets(self) -> dict[str, str]:
        """{layer: the path of its features in features.h5 and in every shard}."""
        return feature_datasets(self.layers)

    def _dataset(self, index: int, layer: str) -> h5py.Dataset:
        return self._shard(index)[self.datasets[layer]]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def planned_shards(self) -> int | None:
        """Number of shards in the plan; None while the plan is still incomplete."""
        plan = self.manifest.get("plan", {})
        return len(self.plan_files) if plan.get("complete") else None

    @cached_property
    def plan_files(self) -> list[int]:
        """Indices of the shards whose plan file exists: the truth about what was planned."""
        return sorted(self.layout.planned())

    @property
    def plan_problems(self) -> list[str]:
        """Where the manifest's copy of the plan and the plan files disagree: a run that was
        stopped and has not been resumed yet, or a damaged folder."""
        problems = []
        files, plan = self.plan_files, self.manifest.get("plan", {})
        if files != list(range(len(files))):
            gaps = sorted(set(range(files[-1] + 1)) - set(files))
            problems.append(f"plan files of shards {ranges(gaps)} are missing")
        recorded = len(plan.get("shards", []))
        if plan.get("complete") and recorded != len(files):
            problems.append(f"the manifest records a plan of {recorded} shards, "
                            f"the plan folder holds {len(files)}")
        return problems

    @property
    def missing_shards(self) -> list[int]:
        """Planned shards with no committed file: work a rerun would still do."""
        done = set(self.shards)
        return [i for i in self.plan_files if i not in done]

    @property
    def complete(self) -> bool:
        return self.planned_shards is not None and not self.missing_shards \
            and not self.plan_problems

    def _shard(self, index: int) -> h5py.File:
        """Shard `index`, open; at most a few are open at once (store/shard_cache.py), so
        hold the file only as long as one read."""
        return self._files.get(index)

    @cached_property
    def _index(self) -> RowIndex:
        # Not bound to the store: a cycle through it would leave its open shards to the
        # cyclic collector (see Store.close).
        return RowIndex(self.layout.row_index, self.layout.shard_stamp, self._files.get,
                        partial(recorded, self.layout))

    @cached_property
    def _counts(self) -> dict[int, tuple[int, int]]:
        """{shard: (rows, errors)} from the index: no shard is read twice. A shard of other
        features (another run's identity digest) is refused."""
        counts = self._index.counts(self.shards)
        if foreign := self._index.foreign(self.shards, identity_digest(self.manifest)):
            raise UsageError(f"{self.location}: shards {ranges(foreign)} hold features of "
                             "another run (their identity differs from the manifest's); "
                             "remove them and run the same extract command again")
        return counts

    @cached_property
    def _offsets(self) -> np.ndarray:
        counts = [self._counts[i][0] for i in self.shards]
        return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def error_count(self) -> int:
        return sum(errors for _, errors in self._counts.values())

    @property
    def overflow_rows(self) -> int:
        """Rows whose float16 features hold inf where the model gave a finite value."""
        self._counts  # noqa: B018  (indexes every shard first)
        return self._index.overflow_rows(self.shards)

    @property
    def keys(self) -> Keys:
        """Every row's key, in row order, read on demand (a sequence, not a list in memory).
        Made anew each time: one kept here would make a cycle (see _index)."""
        return Keys(self)

    @cached_property
    def meta_names(self) -> list[str]:
        """Names of the text carried with rows (caption, json, a table's meta columns)."""
        names: set[str] = set()
        with collection_paused():
            for i in self.shards:
                names.update(self._shard(i).get("meta", {}).keys())
        return sorted(names)

    def metadata(self, name: str) -> list[str]:
        """The text `name` of every row, in row order ('' where a row has none)."""
        return list(self.iter_metadata(name))

    def iter_metadata(self, name: str) -> Iterator[str]:
        """`metadata(name)` streamed: one shard's column in memory at a time."""
        for i in self.shards:
            yield from self._metadata_of(i, name)

    @paused
    def _metadata_of(self, index: int, name: str) -> list[str]:
        shard = self._shard(index)
        column = shard.get("meta", {}).get(name)
        return [""] * shard["keys"].shape[0] if column is None else column.asstr()[:].tolist()

    @property
    def errors(self) -> list[tuple[str, str]]:
        """Every error record, in a list (`iter_errors` streams them)."""
        return list(self.iter_errors())

    def iter_errors(self) -> Iterator[tuple[str, str]]:
        for i in self.shards:
            if self._counts[i][1]:
                yield from self._errors_of(i)

    @paused
    def _errors_of(self, index: int) -> list[tuple[str, str]]:
        group = self._shard(index)["errors"]
        return list(zip(group["keys"].asstr()[:], group["reasons"].asstr()[:]))

    def iter_batches(self, batch_size: int = 65_536, layer: str | None = None
                     ) -> Iterator[tuple[list[str], np.ndarray]]:
        """(keys, features) of `batch_size` rows at a time (the last may be shorter), in plan
        order; memory is bounded by the batch, whatever the size of the store."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        layer = self._layer(layer)
        keys: list[str] = []
        parts: list[np.ndarray] = []
        for piece_keys, piece in self._pieces(batch_size, layer):
            keys.extend(piece_keys)
            parts.append(piece)
            while len(keys) >= batch_size:
                merged = np.concatenate(parts)
                yield keys[:batch_size], merged[:batch_size]
                keys, parts = keys[batch_size:], [merged[batch_size:]]
        if keys:
            yield keys, np.concatenate(parts)

    def _pieces(self, size: int, layer: str) -> Iterator[tuple[list[str], np.ndarray]]:
        for index in self.shards:
            rows = self._counts[index][0]
            for start in range(0, rows, size):  # the file is fetched again for each piece:
                end = min(rows, start + size)    # the consumer may have read other shards
                yield self._piece(index, layer, start, end)

    @paused
    def _piece(self, index: int, layer: str, start: int, end: int
               ) -> tuple[list[str], np.ndarray]:
        keys = self._shard(index)["keys"].asstr()[start:end].tolist()
        return keys, self._dataset(index, layer)[start:end]

    def features(self, layer: str | None = None) -> Features:
        """All features of `layer` (needed when the store holds several) as a lazy
        array-like `[n, ...]`: slicing reads only what it needs."""
        return Features(self, self._layer(layer))

    @cached_property
    def _position_of(self) -> dict[int, int]:
        return {shard: position for position, shard in enumerate(self.shards)}

    def _find(self, key: object) -> int | None:
        """The row of `key`, from the on-disk key index (built on the first lookup)."""
        if not isinstance(key, str):
            return None
        hit = self._index.find(key, self.shards)
        if hit is None or hit[0] not in self._position_of:
            return None
        return int(self._offsets[self._position_of[hit[0]]]) + hit[1]

    def index(self, key: str) -> int:
        row = self._find(key)
        if row is None:
            raise KeyError(f"no features for key {key!r}")
        return row

    def __contains__(self, key: object) -> bool:
        return self._find(key) is not None

    def __getitem__(self, key: str) -> np.ndarray | dict[str, np.ndarray]:
        """One image's features; {layer: features} when the store holds several layers."""
        row = self.index(key)
        if len(self.layers) == 1:
            return self.features()[row]
        return {layer: self.features(layer)[row] for layer in self.layers}

    def get(self, key: str, default=None):
        return self[key] if key in self else default

    def search(self, queries, k: int = 10, layer: str | None = None,
               text: list[str] | None = None) -> list[list[tuple[str, float]]]:
        """The k nearest rows, as (key, cosine), of each query: vectors, or keys, image
        files, folders and URLs embedded as this store was; `text` for CLIP stores. Uses the
        index of `imgfeat index` where built, else exact search (see imgfeat.search)."""
        from imgfeat.search.api import store_search

        return store_search(self, queries, k, layer, text)

    def neighbours(self, key: str, k: int = 10, layer: str | None = None
                   ) -> list[tuple[str, float]]:
        """The k nearest other rows of `key`, as (key, cosine)."""
        from imgfeat.search.api import store_neighbours

        return store_neighbours(self, key, k, layer)

    def close(self) -> None:
        self._files.close()
        if "_index" in self.__dict__:
            self.__dict__.pop("_index").close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Keys(Sequence):
    """The keys of a store's rows, read from the shards on demand; equal to any sequence of
    the same keys in the same order."""

    def __init__(self, store: Store):
        self._store = store

    def __len__(self) -> int:
        return len(self._store)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = int(index) + (len(self) if index < 0 else 0)
        if not 0 <= row < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        store = self._store
        position = int(np.searchsorted(store._offsets, row, side="right")) - 1
        local = row - int(store._offsets[position])
        with collection_paused():
            return store._shard(store.shards[position])["keys"].asstr()[local]

    def __iter__(self) -> Iterator[str]:
        store = self._store
        for index in store.shards:
            rows = store._counts[index][0]
            for start in range(0, rows, 65_536):
                with collection_paused():
                    keys = store._shard(index)["keys"].asstr()[start:start + 65_536].tolist()
                yield from keys

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"<{len(self)} keys of {self._store.location}>"


class Features:
    """Rows of every committed shard, in plan order, read on demand."""

    def __init__(self, store: Store, layer: str):
        self._store, self._layer = store, layer
        self.shape = (len(store), *store.feature_shapes[layer])
        self.dtype = store.dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[:]
        return array if dtype is None else array.astype(dtype)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, tuple):  # rows first, then the rest on the rows read
            first, rest = index[0], index[1:]
            rows = self[first]
            if isinstance(first, (int, np.integer)):
                return rows[rest]
            return rows[(slice(None), *rest)]
        if isinstance(index, (int, np.integer)):
            row = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= row < len(self):
                raise IndexError(f"row {index} out of range for {len(self)} rows")
            return self._rows(np.asarray([row]))[0]
        if isinstance(index, slice):
            return self._rows(np.arange(len(self))[index])
        selection = np.asarray(index)
        if selection.dtype == bool:
            return self._rows(np.flatnonzero(selection))
        return self._rows(np.where(selection < 0, selection + len(self), selection).ravel())

    @paused
    def _rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        if len(rows) == 0:
            return out
        store = self._store
        owner = np.searchsorted(store._offsets, rows, side="right") - 1
        for position in np.unique(owner):
            mask = owner == position
            local = rows[mask] - store._offsets[position]
            dataset = store._dataset(store.shards[position], self._layer)
            out[mask] = _read_rows(dataset, local)
        return out

    def __iter__(self) -> Iterator[np.ndarray]:
        for row in range(len(self)):
            yield self[row]


def _read_rows(dataset: h5py.Dataset, local: np.ndarray) -> np.ndarray:
    """h5py wants increasing unique indices; a contiguous run is read as one slice."""
    if len(local) and np.all(np.diff(local) == 1):
        return dataset[int(local[0]):int(local[-1]) + 1]
    unique, inverse = np.unique(local, return_inverse=True)
    return dataset[unique][inverse]


def ranges(indices: list[int]) -> str:
    """'0-3, 7, 9-10' for [0, 1, 2, 3, 7, 9, 10]."""
    spans, start = [], indices[0]
    for prev, cur in zip(indices, indices[1:] + [None]):
        if cur != prev + 1:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(spans)
