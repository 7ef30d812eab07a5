"""Several processes sharing one output folder (`--num-nodes`, or one per task of srun or
torchrun): which one this is, and its part of the plan, every N-th shard."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from imgfeat.errors import UsageError
from imgfeat.options import ExtractOptions
from imgfeat.plan.shards import Shard


@dataclass(frozen=True)
class Node:
    """This machine's place among several that share one output folder."""

    count: int = 1
    rank: int = 0
    run: str = ""  # the run's id, shared by its nodes: see `run_id`

    @classmethod
    def of(cls, opts: ExtractOptions) -> Node:
        """From --num-nodes/--node-rank, else from the launcher that started this process."""
        count, rank = _from_launcher(os.environ)
        count = opts.num_nodes or count
        rank = opts.node_rank if opts.node_rank is not None else (rank if count > 1 else 0)
        if not 0 <= rank < count:
            raise UsageError(f"--node-rank must be in 0..{count - 1}, got {rank}")
        return cls(count, rank, run_id(os.environ, count))


def run_id(env, count: int) -> str:
    """What the nodes of one run share, so that their leases (store/lease.py) never refuse
    each other: the scheduler's job and step, torchrun's run id, or for nodes started by hand
    (--num-nodes) their number. A run of one process is its own."""
    if "SLURM_JOB_ID" in env:
        return f"slurm-{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', 'batch')}"
    if "TORCHELASTIC_RUN_ID" in env:
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    if count > 1:
        return f"nodes-{count}"
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# (size, rank) variables of the launchers that start one imgfeat per task. srun sets
# SLURM_STEP_NUM_TASKS for the tasks of a step only: in an sbatch script with no srun there is
# one imgfeat, even though SLURM_NTASKS and SLURM_NNODES describe the whole allocation.
LAUNCHERS = (("SLURM_STEP_NUM_TASKS", "SLURM_PROCID"), ("WORLD_SIZE", "RANK"))


def _from_launcher(env) -> tuple[int, int]:
    for size, rank in LAUNCHERS:
        if size in env and rank in env:
            try:
                return int(env[size]), int(env[rank])
            except ValueError:
                raise UsageError(f"{size}={env[size]!r} and {rank}={env[rank]!r} are not "
                                 "task numbers; pass --num-nodes and --node-rank") from None
    return 1, 0


class NodeSlice:
    """This node's part of a stream when several machines share one plan: every N-th shard."""

    def __init__(self, stream, num_nodes: int, rank: int):
        self._stream, self._num_nodes, self._rank = stream, num_nodes, rank

    @property
    def finished(self) -> bool:
        return self._stream.finished

    @property
    def shards(self) -> list[Shard]:
        return self._stream.shards

    def poll(self) -> list[Shard]:
        return [s for s in self._stream.poll() if s.index % self._num_nodes == self._rank]
