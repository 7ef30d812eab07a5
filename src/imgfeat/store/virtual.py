"""features.h5: HDF5 virtual datasets over every committed shard, so one file opens it all
without a copy. Source paths are relative, so the output folder can be moved.

HDF5 reads the file and dataset names of a virtual source as patterns ('%b' is a block number),
so a literal '%' there (an escaped layer name holds them) is written '%%'."""

from __future__ import annotations

import h5py
import numpy as np

from imgfeat.errors import UsageError
from imgfeat.store.layout import Layout, commit, feature_datasets, temp_path
from imgfeat.store.shard_cache import open_h5
from imgfeat.store.writer import STRING


def build_virtual_file(layout: Layout, shards: list[int], shapes: dict[str, tuple[int, ...]],
                       dtype: str) -> None:
    """`shapes`: {layer: feature shape}, as the manifest's "layers" records them."""
    names = feature_datasets(shapes)
    counts = {}
    for index in shards:
        with open_h5(layout.shard_file(index)) as shard:
            counts[index] = (shard["keys"].shape[0], shard["errors/keys"].shape[0])
    temp = temp_path(layout.features)
    try:
        with open_h5(temp, "w") as out:
            out.attrs["shards"] = np.asarray(shards, dtype=np.int64)
            for layer, shape in shapes.items():
                _virtual(out, names[layer], layout, counts, 0, tuple(shape), dtype,
                         names[layer])
                out[names[layer]].attrs["layer"] = layer
            _virtual(out, "keys", layout, counts, 0, (), STRING, "keys")
            _virtual(out, "errors/keys", layout, counts, 1, (), STRING, "errors/keys")
            _virtual(out, "errors/reasons", layout, counts, 1, (), STRING, "errors/reasons")
        commit(temp, layout.features)
    finally:
        temp.unlink(missing_ok=True)


def _virtual(out: h5py.File, name: str, layout: Layout, counts: dict, which: int,
             shape: tuple[int, ...], dtype, source_name: str) -> None:
    total = sum(c[which] for c in counts.values())
    if total == 0:  # HDF5 cannot map an empty virtual dataset
        out.create_dataset(name, shape=(0, *shape), dtype=dtype)
        return
    layout_ = h5py.VirtualLayout(shape=(total, *shape), dtype=dtype)
    start = 0
    for index, count in counts.items():
        rows = count[which]
        if rows:
            relative = layout.shard_file(index).relative_to(layout.root).as_posix()
            layout_[start:start + rows] = h5py.VirtualSource(
                _literal(relative), _literal(source_name), shape=(rows, *shape))
            start += rows
    out.create_virtual_dataset(name, layout_)


def _literal(name: str) -> str:
    return name.replace("%", "%%")


def finalize(store) -> None:
    """Write features.h5 of a complete store (`imgfeat finalize`); refuse one that is not."""
    if not store.complete:
        why = "; ".join(store.plan_problems) or (
            "its plan is not finished" if store.planned_shards is None else
            f"{len(store.missing_shards)} planned shards are not committed")
        raise UsageError(f"{store.layout.root} is not complete ({why}): run the same extract "
                         "command again to finish it")
    build_virtual_file(store.layout, store.shards, store.feature_shapes, store.dtype.name)
