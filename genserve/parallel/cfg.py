"""The layout of a CFG-parallel job (`Run.cfg_split`): which ranks run which branch of
classifier-free guidance, and which process groups that needs.

A set of 2k sorted ranks splits into halves: the lower half runs the unconditional branch, the
upper half the conditional one, each with Ulysses degree k over its own half.  After each forward,
rank j of one half and rank j of the other (partners) swap their noise predictions, over the
whole set's group, so that both apply the same guidance and scheduler step and the state stays
identical, and resident, on all 2k ranks.

The driver (`PoolBase.submit`, before a set's first job) and every worker (running the job) read
the same layout, so the groups the workers look up are the ones the driver had them make.  No torch
here: the driver imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class CfgLayout:
    """The halves of a sorted rank set of even size."""

    uncond: tuple[int, ...]
    cond: tuple[int, ...]

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        """(rank j of the unconditional half, rank j of the conditional half), for each j."""
        return tuple(zip(self.uncond, self.cond))

    def groups(self) -> tuple[tuple[int, ...], ...]:
        """Every process group the job needs besides the whole set's (over which partners swap
        predictions), in the order every world member makes them (`new_group` is collective
        over the world): the halves, each a Ulysses group.  A half of one rank needs none."""
        return tuple(h for h in (self.uncond, self.cond) if len(h) > 1)

    def is_cond(self, rank: int) -> bool:
        """Whether `rank` runs the conditional branch."""
        self._check(rank)
        return rank in self.cond

    def half(self, rank: int) -> tuple[int, ...]:
        """The ranks of `rank`'s branch: its Ulysses group."""
        return self.cond if self.is_cond(rank) else self.uncond

    def pair(self, rank: int) -> tuple[int, int]:
        """`rank` and the rank of the other half at its position: who swap predictions."""
        half = self.half(rank)
        return self.pairs[half.index(rank)]

    def partner(self, rank: int) -> int:
        """The rank `rank` swaps predictions with."""
        a, b = self.pair(rank)
        return b if rank == a else a

    def _check(self, rank: int) -> None:
        if rank not in self.uncond and rank not in self.cond:
            raise ValueError(f"rank {rank} is not in the CFG-parallel set "
                             f"{self.uncond + self.cond}")


def cfg_layout(ranks: Iterable[int]) -> CfgLayout:
    """The layout of `ranks` (sorted here); a ValueError for a set that cannot be split in two."""
    ranks = tuple(sorted(ranks))
    if len(ranks) < 2 or len(ranks) % 2:
        raise ValueError(f"cfg_split needs an even number of ranks (two halves of equal Ulysses "
                         f"degree), got {len(ranks)}: {ranks}")
    k = len(ranks) // 2
    return CfgLayout(ranks[:k], ranks[k:])
