"""The part every model's Ulysses sequence parallelism shares (`sequence.py`, `sequence_qwen.py`):
the process group active for the forwards inside `use(group)`, and this rank's token shard."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from .ulysses import shard


def refuse_reinstall(transformer) -> None:
    if getattr(transformer, "_genserve_sp", None) is not None:
        raise ValueError("sequence parallelism is already installed on this transformer")


class SequenceParallel:
    """Shared part: the active group and the token shards."""

    def __init__(self, transformer):
        refuse_reinstall(transformer)
        self.group = None
        self.n_valid = 0
        transformer._genserve_sp = self

    @contextmanager
    def use(self, group):
        """Run the forwards inside the block sharded over `group` (None: unsharded)."""
        if group is not None and dist.get_world_size(group) == 1:
            group = None
        self.group = group
        try:
            yield self
        finally:
            self.group = None
            self._reset()

    def _reset(self) -> None:
        pass

    def _shards(self, x: torch.Tensor) -> torch.Tensor:
        return shard(x, 1, dist.get_rank(self.group), dist.get_world_size(self.group))
