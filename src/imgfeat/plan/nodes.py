"""Several machines sharing one output folder (`--num-nodes`, or SLURM): which one this is,
and its part of the plan, every N-th shard."""

from __future__ import annotations

import os
from dataclasses import dataclass

from imgfeat.errors import UsageError
from imgfeat.options import ExtractOptions
from imgfeat.plan.shards import Shard


@dataclass(frozen=True)
class Node:
    """This machine's place among several that share one output folder."""

    count: int = 1
    rank: int = 0

    @classmethod
    def of(cls, opts: ExtractOptions) -> Node:
        env = os.environ
        count = opts.num_nodes or (int(env.get("SLURM_NNODES", 1)) if "SLURM_NODEID" in env
                                   else 1)
        rank = opts.node_rank if opts.node_rank is not None else \
            (int(env.get("SLURM_NODEID", 0)) if count > 1 else 0)
        if not 0 <= rank < count:
            raise UsageError(f"--node-rank must be in 0..{count - 1}, got {rank}")
        return cls(count, rank)


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
