"""The part every model's Ulysses sequence parallelism shares (`sequence.py`, `sequence_qwen.py`):
the process group active for the forwards inside `use(group)`, and this rank's token shard."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from .ulysses import shard, unshard


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


class JointSequenceParallel(SequenceParallel):
    """MMDiT-style models (SD3, FLUX, Qwen-Image): the first block takes the image tokens as
    `hidden_states` (keyword) and gets this rank's shard; the last returns (text, image) and the
    image is gathered whole again."""

    def _shard_first(self, module, args, kwargs):
        if self.group is None:
            return None
        hidden = kwargs["hidden_states"]
        self.n_valid = hidden.shape[1]
        return args, {**kwargs, "hidden_states": self._shards(hidden)}

    def _gather(self, module, args, output):
        if self.group is None:
            return None
        text, hidden = output
        return text, unshard(hidden, 1, self.n_valid, self.group)
