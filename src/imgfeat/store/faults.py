"""Test-only fault injection: stop a run, or pause it, at the N-th durable write of a kind.

Crash tests must hit exact instants, not hope a sleep lands in the right place. Every durable
write of an output folder passes a fault point, and `IMGFEAT_TEST_FAULTS` says what to do at
which one, as comma-separated rules `KIND:N=ACTION`:

    plan:3=kill            SIGKILL the whole run after the 3rd plan file is committed
    manifest-temp:1=int    SIGINT (a terminal's Ctrl-C) with the first manifest written to its
                           temporary name, not yet renamed
    plan:2=wait-shards:2   pause after the 2nd plan file until 2 shard files are committed

Kinds: manifest, plan, keys (the key index's commit), shard, counts (a node's record of its
shards' counts), features; `KIND-temp` fires before the rename that makes a file visible.
Counts are per process. Signals go to the run's process group, which must be a session of its
own (a test starts the run with start_new_session), so that the workers die with it, as they
do when a terminal or a scheduler stops a job.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

WAIT_LIMIT_S = 120.0
_SIGNALS = {"kill": signal.SIGKILL, "int": signal.SIGINT}


def _parse(spec: str) -> dict[tuple[str, int], list[str]]:
    rules: dict[tuple[str, int], list[str]] = {}
    for rule in filter(None, (part.strip() for part in spec.split(","))):
        where, _, action = rule.partition("=")
        kind, _, count = where.partition(":")
        rules.setdefault((kind, int(count)), []).append(action)
    return rules


_RULES = _parse(os.environ.get("IMGFEAT_TEST_FAULTS", ""))
_counts: Counter = Counter()
_lock = threading.Lock()


def point(kind: str, root: Path) -> None:
    """Count one durable write of `kind` in the output folder `root`; act if a rule says so."""
    if not _RULES:
        return
    with _lock:
        _counts[kind] += 1
        actions = _RULES.get((kind, _counts[kind]), [])
    for action in actions:
        _act(action, root)


def kind_of(final: Path) -> str:
    """The kind of a file an output folder commits, from where it lives."""
    if final.name in ("manifest.json", "features.h5"):
        return final.stem
    if final.name == "skipped.json":
        return "tally"
    if final.parent.name == "plan":
        return "plan"
    if final.parent.name == "shards":
        return "shard" if final.suffix == ".h5" else "counts"  # store/shard_counts.py
    return "file"


def root_of(final: Path) -> Path:
    return final.parent if final.name in ("manifest.json", "features.h5") else final.parent.parent


def _act(action: str, root: Path) -> None:
    name, _, argument = action.partition(":")
    if name in _SIGNALS:
        if os.getpgrp() != os.getsid(0):
            raise RuntimeError("IMGFEAT_TEST_FAULTS signals the run's process group, which "
                               "must be a session of its own (start_new_session)")
        os.killpg(os.getpgrp(), _SIGNALS[name])
    elif name == "wait-shards":
        _wait_for_shards(root, int(argument))
    else:
        raise ValueError(f"unknown fault action {action!r}")


def _wait_for_shards(root: Path, count: int) -> None:
    from imgfeat.store.layout import Layout

    deadline = time.monotonic() + WAIT_LIMIT_S
    while len(Layout(root).committed()) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fault point waited {WAIT_LIMIT_S:.0f}s for {count} shards")
        time.sleep(0.01)
