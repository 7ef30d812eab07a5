"""What `search` and `dedup` write: result tables (table, csv, json), the groups table
(parquet or csv), the keep-list, and summaries."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from imgfeat.errors import UsageError
from imgfeat.search.keys import keys_of
from imgfeat.store.layout import commit, temp_path

FORMATS = ("table", "csv", "json")


def format_hits(results, fmt: str) -> str:
    """`results`: [(query label, [Hit])] as one text."""
    if fmt == "json":
        return json.dumps([{"query": label, "results": [
            {"rank": rank, "key": hit.key, "score": round(hit.score, 6)}
            for rank, hit in enumerate(hits, 1)]} for label, hits in results], indent=1)
    rows = [(label, rank, hit.key, f"{hit.score:.4f}")
            for label, hits in results for rank, hit in enumerate(hits, 1)]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["query", "rank", "key", "score"])
        writer.writerows(rows)
        return buffer.getvalue().rstrip("\n")
    lines = []
    for label, hits in results:
        lines.append(f"# {label}")
        lines.extend(f"{rank:>4}  {hit.score:7.4f}  {hit.key}" for rank, hit in enumerate(hits, 1))
    return "\n".join(lines)


def write_groups(groups, store, path: str) -> None:
    """group, key, similarity: parquet, or csv for a .csv name; written atomically."""
    import pyarrow as pa

    final = Path(path)
    if not final.parent.is_dir():
        raise UsageError(f"folder of {path} does not exist")
    table = pa.table({"group": groups.group, "key": keys_of(store, groups.row),
                      "similarity": groups.similarity})
    temp = temp_path(final)
    try:
        if final.suffix.lower() == ".csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, temp)
        else:
            import pyarrow.parquet as pq

            pq.write_table(table, temp)
        commit(temp, final)
    finally:
        temp.unlink(missing_ok=True)


def write_keep_list(groups, store, path: str) -> int:
    """Every key outside the groups and each group's representative, one a line, in store
    order; returns how many."""
    import numpy as np

    drop = np.zeros(len(store), dtype=bool)
    drop[groups.row] = True
    drop[groups.representatives()] = False
    final = Path(path)
    temp = temp_path(final)
    kept = 0
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            for key, dropped in zip(store.keys, drop.tolist()):
                if not dropped:
                    handle.write(key + "\n")
                    kept += 1
        commit(temp, final)
    finally:
        temp.unlink(missing_ok=True)
    return kept


def summary(groups, rows: int, threshold: float) -> str:
    members = len(groups.row)
    return (f"{groups.count:,} groups of near-duplicates (cosine >= {threshold}) holding "
            f"{members:,} of {rows:,} images; keeping one per group drops "
            f"{members - groups.count:,}")
