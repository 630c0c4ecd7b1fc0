"""Sequence parallelism: Ulysses attention over explicit process groups (needs torch)."""

from .ulysses import GroupCache, shard, ulysses_attention, unshard

__all__ = ["GroupCache", "shard", "ulysses_attention", "unshard"]
