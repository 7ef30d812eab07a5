"""One extraction run: check what a user could get wrong before any work, start one worker per
device, open (or resume) the output folder, plan while extracting, and finish the store."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path

from imgfeat.engine.local import LocalEngine, Outcome
from imgfeat.engine.placement import parse_devices, place_workers
from imgfeat.errors import ImgfeatError, UsageError
from imgfeat.options import ExtractOptions
from imgfeat.plan.nodes import Node, NodeSlice
from imgfeat.plan.shard_stream import FixedStream, FollowerStream, PlannerStream
from imgfeat.plan.shards import Shard, plan_shards, recorded_shards
from imgfeat.report.progress import Reporter
from imgfeat.report.stage_times import StageTimes
from imgfeat.sources import check_sources, iter_items
from imgfeat.store.layout import Layout, remove_temps_of
from imgfeat.store.manifest import (
    FORMAT,
    identity_conflicts,
    read_manifest,
    software_versions,
    write_manifest,
)
from imgfeat.store.reader import Store
from imgfeat.store.virtual import build_virtual_file

NODE_WAIT_S = float(os.environ.get("IMGFEAT_NODE_WAIT_S", "600"))


class RunIncomplete(ImgfeatError):
    """Some shards could not be extracted; what was committed is kept."""


def extract(sources: Iterable[str] | str, out: str, **options) -> Store:
    """Extract features of every image in `sources` into the output folder `out`.

    Options are those of `ExtractOptions` (model, weights, layer, pool, devices, ...). Running
    the same call again resumes: committed shards are kept, the rest is done.
    """
    known = {f.name for f in fields(ExtractOptions)}
    if unknown := set(options) - known:
        raise UsageError(f"unknown option(s): {', '.join(sorted(unknown))}")
    opts = ExtractOptions(**options)
    opts.check()
    sources = check_sources([sources] if isinstance(sources, (str, Path)) else sources)
    node = Node.of(opts)
    if node.count > 1 and opts.incremental:
        raise UsageError("--incremental runs on one node; drop --num-nodes for it")
    layout = Layout(Path(out).resolve())
    engine = _engine(opts, str(layout.root))
    reporter = Reporter(opts.progress)
    finished = False
    try:
        identity = {"sources": [str(Path(s).resolve()) for s in sources],
                    **engine.start(), "shard_size": opts.shard_size}
        manifest = _open_output(layout, identity, opts, node)
        outcome = _extract(engine, layout, manifest, sources, opts, node, reporter)
        finished = True
    finally:
        reporter.stop()
        engine.stop(graceful=finished)
    _finish(layout, manifest, node, reporter, outcome)
    return Store(out)


def _engine(opts: ExtractOptions, out: str):
    if opts.engine == "ray":
        from imgfeat.engine.ray_engine import RayEngine, ray_placements

        return RayEngine(lambda ray: ray_placements(ray, opts.devices, opts.threads), opts,
                         out, opts.ray_address)
    return LocalEngine(place_workers(parse_devices(opts.devices), opts.threads), opts, out)


def _open_output(layout: Layout, identity: dict, opts: ExtractOptions, node: Node) -> dict:
    """The manifest to continue under: the recorded one if it agrees, else a fresh one."""
    if layout.root.exists() and not layout.root.is_dir():
        raise UsageError(f"output {layout.root} exists and is not a folder")
    if node.rank > 0:
        return _wait_for_manifest(layout, identity, opts.overwrite)
    recorded = None if opts.overwrite else read_manifest(layout)
    if recorded is not None:
        if conflicts := identity_conflicts(recorded, identity):
            raise UsageError(
                f"{layout.root} already holds different features ({'; '.join(conflicts)}); "
                "use --overwrite to replace them, or choose another output folder")
        remove_temps_of(layout)
        return recorded
    if opts.overwrite:
        layout.remove_own()
    elif layout.root.is_dir() and any(layout.root.iterdir()):
        raise UsageError(f"output folder {layout.root} is not empty and holds no imgfeat store; "
                         "choose a new or empty folder")
    manifest = {"format": FORMAT, **identity, "software": software_versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "plan": {"complete": False, "shards": []}}
    write_manifest(layout, manifest)
    return manifest


def _wait_for_manifest(layout: Layout, identity: dict, overwrite: bool) -> dict:
    """Nodes other than the first wait for the first to create (or replace) the store."""
    deadline = time.monotonic() + NODE_WAIT_S
    while True:
        recorded = read_manifest(layout) if layout.manifest.exists() else None
        conflicts = identity_conflicts(recorded, identity) if recorded else ["none yet"]
        if not conflicts:
            return recorded
        if recorded and not overwrite:
            raise UsageError(f"{layout.root} already holds different features "
                             f"({'; '.join(conflicts)}); node 0 decides on --overwrite")
        if time.monotonic() > deadline:
            raise UsageError(f"no store for this run appeared in {layout.root} within "
                             f"{NODE_WAIT_S:.0f}s: start node 0 (--node-rank 0) too")
        time.sleep(0.5)


def _extract(engine: LocalEngine, layout: Layout, manifest: dict, sources: list[str],
             opts: ExtractOptions, node: Node, reporter: Reporter) -> Outcome:
    plan = manifest["plan"]
    committed = layout.committed()
    if plan["complete"] and not opts.incremental:
        stream = FixedStream([Shard(i, n) for i, n in enumerate(plan["shards"])])
    elif node.rank > 0:
        stream = FollowerStream(layout)
    else:
        layout.plan_dir.mkdir(parents=True, exist_ok=True)
        recorded = recorded_shards(layout)
        planner = plan_shards(iter_items(sources), layout, opts.shard_size,
                              recorded, skip_known=plan["complete"])
        stream = PlannerStream(planner, known=recorded)  # the planner yields only new shards
    watched = _Watched(NodeSlice(stream, node.count, node.rank), committed, reporter,
                       lambda shards: _plan_complete(layout, manifest, shards, node))
    reporter.start(total=None)
    try:
        return engine.run(watched, reporter, committed)
    finally:
        if isinstance(stream, PlannerStream):
            stream.stop()


class _Watched:
    """A stream that tells the reporter about skipped shards and the total, and records the
    plan as complete the moment the planner finishes."""

    def __init__(self, stream: NodeSlice, committed: set[int], reporter: Reporter, on_complete):
        self._stream, self._committed, self._reporter = stream, committed, reporter
        self._on_complete = on_complete
        self._mine = 0
        self.finished = False

    def poll(self) -> list[Shard]:
        shards = self._stream.poll()
        for shard in shards:
            self._mine += shard.count
            if shard.index in self._committed:
                self._reporter.skip(shard.count)
        if self._stream.finished and not self.finished:
            self.finished = True
            self._reporter.set_total(self._mine)
            self._on_complete(self._stream.shards)
        return shards


def _plan_complete(layout: Layout, manifest: dict, shards: list[Shard], node: Node) -> None:
    counts = [s.count for s in shards]
    if manifest["plan"].get("shards") == counts and manifest["plan"]["complete"]:
        return
    manifest["plan"] = {"complete": True, "items": sum(counts), "shards": counts}
    if node.rank == 0:
        write_manifest(layout, manifest)


def _finish(layout: Layout, manifest: dict, node: Node, reporter: Reporter,
            outcome: Outcome) -> None:
    committed = sorted(layout.committed())
    planned = len(manifest["plan"]["shards"])
    complete = len(committed) >= planned and not outcome.failed
    if complete:
        build_virtual_file(layout, committed, manifest["layers"], manifest["dtype"])
    done = reporter.rows + reporter.errors
    elapsed = reporter.elapsed()
    before = f", {reporter.already_done:,} done before" if reporter.already_done else ""
    reporter.summary(
        f"done: {done:,} images in {elapsed:.1f}s ({done / max(elapsed, 1e-9):,.1f} img/s): "
        f"{reporter.rows:,} rows, {reporter.errors:,} errors{before} -> {layout.root}"
        + ("" if complete or outcome.failed else
           f"\nnode {node.rank} finished its part; {planned - len(committed)} shards of other "
           "nodes are still to come ('imgfeat info' shows which)"))
    if outcome.stage_times:
        times = StageTimes()
        for seconds in outcome.stage_times.values():
            times.add(seconds)
        reporter.summary("profile (all workers):\n" + times.table(done, elapsed))
    if outcome.failed:
        reasons = "; ".join(f"shard {i}: {why}" for i, why in sorted(outcome.failed.items()))
        raise RunIncomplete(f"{len(outcome.failed)} shard(s) failed ({reasons}); committed "
                            "shards are kept: run the same command again to retry")
