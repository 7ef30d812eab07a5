"""One extraction run: check what a user could get wrong before any work, start one worker per
device, open (or resume) the output folder, plan while extracting, and finish the store."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path

from imgfeat.engine.local import LocalEngine, Outcome
from imgfeat.engine.placement import LocalTask, parse_devices, place_workers
from imgfeat.errors import ImgfeatError, UsageError
from imgfeat.options import ExtractOptions
from imgfeat.plan.early_walk import AHEAD_SHARDS, EarlyWalk
from imgfeat.plan.nodes import Node, NodeSlice
from imgfeat.plan.shard_stream import FixedStream, FollowerStream, PlannerStream
from imgfeat.plan.shards import (
    Shard,
    last_planned_key,
    plan_shards,
    recorded_shards,
    recorded_skipped,
)
from imgfeat.report.progress import Reporter
from imgfeat.report.stage_times import StageTimes
from imgfeat.sources import check_sources, iter_items
from imgfeat.sources.stream import SourceOptions, Tally, can_resume_after, expand
from imgfeat.sources.tables import TableOptions
from imgfeat.store.layout import TEMP_MARK, Layout, remove_temps_of
from imgfeat.store.lease import STALE_S, live_holders
from imgfeat.store.manifest import (
    FORMAT,
    identity_conflicts,
    read_manifest,
    software_versions,
    write_manifest,
)
from imgfeat.store.reader import Store
from imgfeat.store.remote import (
    log_name,
    open_for_reading,
    open_layout,
    pull_log,
    push_log,
    refresh,
)
from imgfeat.store.run_lock import RunLock
from imgfeat.store.shard_counts import CountsRecord
from imgfeat.store.storage import is_url
from imgfeat.store.virtual import build_virtual_file

NODE_WAIT_S = float(os.environ.get("IMGFEAT_NODE_WAIT_S", "600"))
SETTLE_S = float(os.environ.get("IMGFEAT_SETTLE_S", "90"))
SETTLE_POLL_S = 3.0
REMOTE_TEMP_AGE_S = max(STALE_S, 3600.0)  # a slow shard's temporary file is still written


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
    given = [sources] if isinstance(sources, (str, Path)) else list(sources)
    engine = _early_engine(opts, str(out), given)
    try:
        _checked_run(given, out, opts, engine)
    except BaseException:
        if engine is not None:
            engine.abandon()  # no worker outlives a refused or failed run (after stop: no-op)
        raise
    return Store(open_for_reading(out, opts.storage_options))


def _checked_run(given: list, out: str, opts: ExtractOptions,
                 engine: LocalEngine | None) -> None:
    """Check the sources and the output, then run under the node's run lock."""
    sources = check_sources(given, source_options(opts))
    node = Node.of(opts)
    if node.count > 1 and opts.incremental:
        raise UsageError("--incremental runs on one node; drop --num-nodes for it")
    layout = open_layout(out, opts.storage_options)
    _check_folder(layout, opts, node)
    pull_log(layout, log_name(node.rank))  # on object storage: the log of earlier runs
    lock = RunLock(layout, node.rank, node.run)
    walk = None
    try:
        if node.rank == 0 and layout.manifest.exists():  # refuse a busy store before the
            lock.acquire(overwrite=opts.overwrite)        # model is in use
        walk = _early_walk(layout, sources, opts, node)
        manifest, outcome, reporter = _run(layout, sources, opts, node, lock, engine, walk)
        _finish(layout, manifest, node, reporter, outcome)
    finally:
        if walk is not None:
            walk.close()
        push_log(layout, log_name(node.rank))  # done or failed, the bucket's log says so
        lock.release()


def _early_engine(opts: ExtractOptions, out: str, sources: list) -> LocalEngine | None:
    """The local engine, started first: its workers load the model (seconds) while the
    sources and the store are checked (on object storage, seconds too). Not for Ray, which
    connects to a cluster that a refused run should not wait for, nor for an output on
    object storage: a worker reads the store's manifest as it starts (its precision), which
    must be the bucket's, pulled by open_layout first. Those start in _run."""
    if opts.engine != "local" or is_url(out):
        return None
    location = str(Path(out).resolve())  # Layout.location
    return _engine(opts, location, _remote_samples([str(s) for s in sources], location))


def _early_walk(layout: Layout, sources: list[str], opts: ExtractOptions,
                node: Node) -> EarlyWalk | None:
    """The plan's walk, begun while the model loads, where the plan starts from nothing: a
    new store, or one that --overwrite replaces, on the node that plans."""
    if node.rank > 0 or (layout.manifest.exists() and not opts.overwrite):
        return None
    tally = Tally()
    return EarlyWalk(iter_items(sources, source_options(opts), tally), tally,
                     AHEAD_SHARDS * opts.shard_size)


def _run(layout: Layout, sources: list[str], opts: ExtractOptions, node: Node,
         lock: RunLock, engine: LocalEngine | None = None,
         walk: EarlyWalk | None = None) -> tuple[dict, Outcome, Reporter]:
    """Start the workers (unless started already), open the store under the run lock, and
    extract every shard."""
    engine = engine or _engine(opts, layout.location, _remote_samples(sources, layout.location))
    reporter = Reporter(opts.progress, log=layout.log)
    finished = False
    try:
        identity = {"sources": [s if is_url(s) else str(Path(s).resolve()) for s in sources],
                    **engine.start(), "shard_size": opts.shard_size}
        manifest = _open_locked(layout, identity, opts, node, lock)
        reporter.append_log(f"start: run {node.run}, node {node.rank} of {node.count}, "
                            f"{socket.gethostname()} pid {os.getpid()}: {', '.join(sources)} "
                            f"-> {layout.location} ({identity['model']['spec']})")
        outcome = _extract(engine, layout, manifest, sources, opts, node, reporter, walk)
        finished = True
    except ImgfeatError as exc:
        if layout.manifest.exists():  # a store of ours: its log says why the run stopped
            reporter.append_log(f"error: {exc}")
        raise
    finally:
        reporter.stop()
        engine.stop(graceful=finished)
    return manifest, outcome, reporter


def _remote_samples(sources: list[str], out: str) -> tuple[str, ...]:
    """A URL on each remote file system that the workers will read or write (one per scheme:
    the storage options are the same for all)."""
    samples: dict[str, str] = {}
    for url in [expand(source)[0] for source in sources] + [out]:
        if is_url(url):
            samples.setdefault(url.split("://", 1)[0], url)
    return tuple(samples.values())


def _engine(opts: ExtractOptions, out: str, remote: tuple[str, ...] = ()):
    if opts.engine == "ray":
        from imgfeat.engine.ray_engine import RayEngine, ray_placements

        return RayEngine(lambda ray: ray_placements(ray, opts.devices, opts.threads), opts,
                         out, opts.ray_address)
    local = LocalTask.of()  # several tasks per machine: each its share of GPUs and cores
    devices = local.devices(parse_devices(opts.devices), opts.devices)
    return LocalEngine(place_workers(devices, opts.threads, local), opts, out, remote)


def _open_locked(layout: Layout, identity: dict, opts: ExtractOptions, node: Node,
                 lock: RunLock) -> dict:
    """Take this node's run lock (if not yet held) and open the store. A follower locks once
    the store is there, so that it does not hold up the --overwrite of the node that makes it."""
    if node.rank == 0:
        lock.acquire(overwrite=opts.overwrite)
    manifest = _open_output(layout, identity, opts, node)
    if node.rank > 0:
        lock.acquire()
    return manifest


def _check_folder(layout: Layout, opts: ExtractOptions, node: Node) -> None:
    """Refuse an output folder that is not ours to write, before writing anything in it."""
    if layout.remote is not None:
        if node.rank == 0 and not opts.overwrite and not layout.manifest.exists() \
                and layout.remote.holds_foreign():
            raise UsageError(f"output {layout.location} is not empty and holds no imgfeat "
                             "store; choose a new or empty prefix")
        return
    if layout.root.exists() and not layout.root.is_dir():
        raise UsageError(f"output {layout.root} exists and is not a folder")
    if node.rank == 0 and not opts.overwrite and not layout.manifest.exists() \
            and _holds_anything(layout):
        raise UsageError(f"output folder {layout.root} is not empty and holds no imgfeat store; "
                         "choose a new or empty folder")


def _open_output(layout: Layout, identity: dict, opts: ExtractOptions, node: Node) -> dict:
    """The manifest to continue under: the recorded one if it agrees, else a fresh one."""
    if node.rank > 0:
        return _wait_for_manifest(layout, identity, opts.overwrite)
    recorded = None if opts.overwrite else read_manifest(layout)
    if recorded is not None:
        if conflicts := identity_conflicts(recorded, identity):
            raise UsageError(
                f"{layout.root} already holds different features ({'; '.join(conflicts)}); "
                "use --overwrite to replace them, or choose another output folder")
        # Other hosts' leftovers go too, once old and their host holds no live lease.
        remove_temps_of(layout, remote_after_s=REMOTE_TEMP_AGE_S,
                        busy_hosts={holder.host for holder in live_holders(layout)})
        return recorded
    if opts.overwrite:
        layout.remove_own()
    manifest = {"format": FORMAT, **identity, "software": software_versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "plan": {"complete": False, "shards": []}}
    write_manifest(layout, manifest)
    return manifest


def _holds_anything(layout: Layout) -> bool:
    """Whether the folder holds anything but what a run killed before its first manifest left
    (temporary files of dead processes, which are removed)."""
    if not layout.root.is_dir():
        return False
    remove_temps_of(layout)
    return any(TEMP_MARK not in path.name and path not in (layout.locks_dir, layout.log)
               for path in layout.root.iterdir())


def _wait_for_manifest(layout: Layout, identity: dict, overwrite: bool) -> dict:
    """Nodes other than the first wait for the first to create (or replace) the store."""
    deadline = time.monotonic() + NODE_WAIT_S
    while True:
        refresh(layout)
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
             opts: ExtractOptions, node: Node, reporter: Reporter,
             walk: EarlyWalk | None = None) -> Outcome:
    tally = Tally()
    stream = _shard_stream(layout, manifest, sources, opts, node, tally, walk)
    walked = isinstance(stream, PlannerStream)
    committed = layout.committed()
    watched = _Watched(NodeSlice(stream, node.count, node.rank), committed, reporter,
                       lambda shards: _plan_complete(layout, manifest, shards, node,
                                                     tally.skipped if walked else None))
    reporter.start(total=None)
    # readers count shards from this record, not from every shard's header
    record = CountsRecord(layout, node.rank, warn=reporter.warn)
    try:
        return engine.run(watched, reporter, committed, record.add)
    finally:
        if isinstance(stream, PlannerStream):
            stream.stop()
        record.flush()  # done or stopped: what was committed is recorded


def _shard_stream(layout: Layout, manifest: dict, sources: list[str], opts: ExtractOptions,
                  node: Node, tally: Tally, walk: EarlyWalk | None = None):
    """Where the engine's shards come from. The plan files on disk are the truth: every one of
    them is scheduled (those committed are skipped by the engine), whatever the manifest's
    copy of the plan says, so a run killed at any instant of planning loses nothing."""
    if node.rank > 0:
        return FollowerStream(layout)
    plan = manifest["plan"]
    recorded = recorded_shards(layout, plan["shards"])
    if plan["complete"] and len(recorded) < len(plan["shards"]):
        raise UsageError(f"{layout.plan_dir} lacks the plan files of shards "
                         f"{len(recorded)}..{len(plan['shards']) - 1}: the store is damaged; "
                         "rerun with --overwrite to start it again")
    if plan["complete"] and not opts.incremental:
        return FixedStream(recorded)
    incremental = opts.incremental or plan.get("incremental", False)
    if incremental and plan["complete"]:
        # Until this walk ends, the store is not complete: a run killed during it resumes the
        # incremental walk, whichever command resumes it.
        manifest["plan"] = {**plan, "complete": False, "incremental": True}
        write_manifest(layout, manifest)
    layout.plan_dir.mkdir(parents=True, exist_ok=True)
    # A resumed walk starts after the last recorded key: what the plan holds is not walked
    # again (an incremental walk must see every key, old ones included).
    options = source_options(opts)
    after = None if incremental else last_planned_key(layout, recorded)
    skipped = recorded_skipped(layout, len(recorded)) if after is not None else None
    if skipped is None or not can_resume_after(sources, after, options):
        after = None  # walked again from the start, which also counts every skipped file
    else:
        tally.skipped = skipped  # those before `after`, which the walk will not see
    if walk is not None and after is None and not recorded:
        items = walk.items(tally)  # begun while the model loaded
    else:
        items = iter_items(sources, options, tally, after=after)
    planner = plan_shards(items, layout,
                          opts.shard_size, recorded, skip_known=incremental,
                          seeked=after is not None, tally=tally)
    return PlannerStream(planner, known=recorded)


def source_options(opts: ExtractOptions) -> SourceOptions:
    return SourceOptions(opts.storage_options, TableOptions(
        opts.image_column, opts.key_column, tuple(opts.meta_columns)))


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


def _plan_complete(layout: Layout, manifest: dict, shards: list[Shard], node: Node,
                   skipped: int | None) -> None:
    """Record the finished plan in the manifest: the shards the stream gave, which are the plan
    files on disk, from 0 without a gap; and the files a walk skipped for their type (None:
    no walk this run, the recorded count stands)."""
    if [s.index for s in shards] != list(range(len(shards))):
        raise ImgfeatError("the plan's shards are not numbered 0..N-1; this is a bug in imgfeat")
    plan = {"complete": True, "items": sum(s.count for s in shards),
            "shards": [s.count for s in shards]}
    if skipped is None:
        skipped = manifest["plan"].get("skipped", 0)
    if skipped:
        plan["skipped"] = skipped
    if manifest["plan"] == plan:
        return
    manifest["plan"] = plan
    if node.rank == 0:
        write_manifest(layout, manifest)


def _finish(layout: Layout, manifest: dict, node: Node, reporter: Reporter,
            outcome: Outcome) -> None:
    planned = len(manifest["plan"]["shards"])
    committed = layout.committed()
    if node.count > 1 and len(committed) < planned and not outcome.failed:
        committed = _await_visible(layout, planned, node)
    missing = [i for i in range(planned) if i not in committed]
    lost = [i for i in missing if i % node.count == node.rank and i not in outcome.failed]
    if lost:  # this node handed out every shard of its part: one left undone is imgfeat's bug
        raise RunIncomplete(f"shards {', '.join(map(str, lost[:10]))} were planned but not "
                            "extracted; committed shards are kept: run the same command again")
    complete = not missing and layout.planned() == set(range(planned))
    if complete and layout.remote is None:  # elsewhere, readers stitch the shards themselves
        _build_features_file(layout, manifest)
    _summarise(layout, node, reporter, outcome, complete, len(missing))
    if skipped := manifest["plan"].get("skipped"):
        reporter.summary(f"skipped: {skipped:,} files of other types")
    if outcome.failed:
        reasons = "; ".join(f"shard {i}: {why}" for i, why in sorted(outcome.failed.items()))
        raise RunIncomplete(f"{len(outcome.failed)} shard(s) failed ({reasons}); committed "
                            "shards are kept: run the same command again to retry")


def _await_visible(layout: Layout, planned: int, node: Node) -> set[int]:
    """The committed shards, once every one is visible here or another node of this run is
    still at work (it will write features.h5 if it ends last). When every other node has
    ended, a shard still missing is one this host cannot see yet (NFS caches listings for
    up to a minute): wait up to SETTLE_S for it rather than leave features.h5 unwritten."""
    deadline = time.monotonic() + SETTLE_S
    committed = layout.committed()
    while len(committed) < planned and time.monotonic() < deadline:
        if any(h.run == node.run and h.node != node.rank for h in live_holders(layout)):
            break
        time.sleep(SETTLE_POLL_S)
        committed = layout.committed()
    return committed


def _build_features_file(layout: Layout, manifest: dict) -> None:
    """features.h5 over every shard; if that fails, the shards are all there and kept."""
    try:
        build_virtual_file(layout, sorted(layout.committed()), manifest["layers"],
                           manifest["dtype"])
    except (OSError, ValueError, RuntimeError) as exc:
        raise RunIncomplete(
            f"every shard is committed, but writing {layout.features.name} failed ("
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); the shards "
            f"are kept: run 'imgfeat finalize {layout.root}' to finish") from None


def _summarise(layout: Layout, node: Node, reporter: Reporter, outcome: Outcome,
               complete: bool, missing: int) -> None:
    """The closing lines. "done" means every planned item is a row or an error record."""
    done = reporter.rows + reporter.errors
    elapsed = reporter.elapsed()
    before = f", {reporter.already_done:,} done before" if reporter.already_done else ""
    counts = (f"{done:,} images in {elapsed:.1f}s ({done / max(elapsed, 1e-9):,.1f} img/s): "
              f"{reporter.rows:,} rows, {reporter.errors:,} errors{before} -> {layout.location}")
    if complete and not outcome.failed:
        reporter.summary(f"done: {counts}")
    elif outcome.failed:
        reporter.summary(f"stopped with failed shards: {counts}")
    else:
        reporter.summary(f"node {node.rank} finished its part: {counts}\n{missing} shards of "
                         "other nodes are still to come ('imgfeat info' shows which); the "
                         "node that ends last writes features.h5, else run 'imgfeat "
                         f"finalize {layout.root}'")
    if outcome.overflow_rows:
        reporter.summary(f"warning: {outcome.overflow_rows:,} rows exceeded float16's range "
                         "(65504) and hold inf; extract again with --dtype float32")
    if outcome.stage_times:
        times = StageTimes()
        for seconds in outcome.stage_times.values():
            times.add(seconds)
        reporter.summary("profile (all workers):\n" + times.table(done, elapsed))
