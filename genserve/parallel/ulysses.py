"""Ulysses sequence-parallel attention over an explicit process group.

Each rank holds a contiguous shard of the sequence for all heads.  An all-to-all turns sequence
shards into head shards (every rank sees the whole sequence for heads/k heads), attention runs
locally, and a second all-to-all turns the result back into sequence shards.  Communication per
layer and rank: 4 x (k-1)/k^2 of the activations (q, k, v, out), which is what the latency model
charges.

- Sequences whose length is not a multiple of k are padded to equal shards; padded keys are masked
  out, padded query rows are dropped by the caller (`shard`/`unshard` below do both ends).
- When the head count is not a multiple of k, Ulysses cannot split heads evenly: the fallback
  all-gathers K and V along the sequence and each rank attends with its own query shard (correct,
  more bytes).  gloo (CPU) and NCCL both support `all_to_all_single` and `all_gather`.
- The group is always passed in: no module-level process groups, so the same process can serve
  different degrees step by step (groups are made by their members on first use, see `GroupCache`).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F


def shard(x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous shard of `x` along `dim`, zero-padded to ceil(n / world)."""
    n = x.shape[dim]
    per = math.ceil(n / world)
    pad = per * world - n
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    return x.narrow(dim, rank * per, per).contiguous()


def unshard(local: torch.Tensor, dim: int, n: int, group) -> torch.Tensor:
    """Gather equal shards from every rank of `group` and drop the padding: length `n` along dim."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=dim).narrow(dim, 0, n)


def _key_mask(n_valid: int, per: int, world: int, device) -> torch.Tensor | None:
    """Boolean mask over the gathered key axis (world x per): True where a key is real."""
    if per * world == n_valid:
        return None
    pos = torch.arange(per * world, device=device)
    return pos < n_valid  # shards are contiguous, so padding sits at the very end


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(B, H, per, D) sequence shard -> (B, H/w, w*per, D): all tokens, this rank's heads."""
    world = dist.get_world_size(group)
    b, h, per, d = x.shape
    x = x.reshape(b, world, h // world, per, d).permute(1, 0, 2, 3, 4).contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out.permute(1, 2, 0, 3, 4).reshape(b, h // world, world * per, d)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, H/w, w*per, D) -> (B, H, per, D): the inverse of `_seq_to_heads`."""
    world = dist.get_world_size(group)
    b, hl, n, d = x.shape
    per = n // world
    x = x.reshape(b, hl, world, per, d).permute(2, 0, 1, 3, 4).contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out.permute(1, 0, 2, 3, 4).reshape(b, hl * world, per, d)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_valid: int, group,
                      scale: float | None = None) -> torch.Tensor:
    """Attention over the full sequence from sequence-sharded inputs.

    q, k, v: (B, H, n_local, D) with n_local = ceil(n_valid / world) on every rank (the shard of
    this rank, zero-padded).  Returns (B, H, n_local, D), this rank's query shard.
    """
    world = dist.get_world_size(group)
    if world == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    h, per = q.shape[1], q.shape[2]
    mask = _key_mask(n_valid, per, world, q.device)
    if h % world:
        return _allgather_kv_attention(q, k, v, mask, group, scale)
    qh, kh, vh = (_seq_to_heads(t, group) for t in (q, k, v))
    attn_mask = None if mask is None else mask.view(1, 1, 1, -1)
    oh = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, scale=scale)
    return _heads_to_seq(oh, group)


def joint_ulysses_attention(q, k, v, tq, tk, tv, n_valid: int, group,
                            text_mask: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """MMDiT joint attention: image tokens sharded (q, k, v: (B, H, per, D)), text tokens
    replicated on every rank (tq, tk, tv: (B, H, T, D)); keys are [image..., text...].
    `text_mask` (B, T), True for real text tokens: prompts of different lengths padded in a batch.

    Returns (this rank's image output (B, H, per, D), the full text output (B, H, T, D)).  The
    text needs no communication in: each rank uses its own head slice, and one all-gather over
    heads gives every rank the whole text output.
    """
    world = dist.get_world_size(group)
    h, per = q.shape[1], q.shape[2]
    img_mask = _key_mask(n_valid, per, world, q.device)
    if h % world:
        ks = [torch.empty_like(k) for _ in range(world)]
        vs = [torch.empty_like(v) for _ in range(world)]
        dist.all_gather(ks, k.contiguous(), group=group)
        dist.all_gather(vs, v.contiguous(), group=group)
        keys = torch.cat(ks + [tk], dim=2)
        vals = torch.cat(vs + [tv], dim=2)
        mask = _joint_mask(img_mask, per * world, tk.shape[2], text_mask)
        img = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
        txt = F.scaled_dot_product_attention(tq, keys, vals, attn_mask=mask)
        return img, txt
    rank, hl = dist.get_rank(group), h // world
    heads = slice(rank * hl, (rank + 1) * hl)
    qh, kh, vh = (_seq_to_heads(t, group) for t in (q, k, v))
    out = F.scaled_dot_product_attention(
        torch.cat([qh, tq[:, heads]], dim=2), torch.cat([kh, tk[:, heads]], dim=2),
        torch.cat([vh, tv[:, heads]], dim=2),
        attn_mask=_joint_mask(img_mask, per * world, tk.shape[2], text_mask))
    n_img = qh.shape[2]
    img = _heads_to_seq(out[:, :, :n_img].contiguous(), group)
    parts = [torch.empty_like(out[:, :, n_img:]) for _ in range(world)]
    dist.all_gather(parts, out[:, :, n_img:].contiguous(), group=group)
    return img, torch.cat(parts, dim=1)


def _joint_mask(img_mask: torch.Tensor | None, n_img: int, n_text: int,
                text_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The key mask over [image (gathered, padded to n_img)..., text...]; None if all are real."""
    if text_mask is None:
        if img_mask is None:
            return None
        return torch.cat([img_mask, img_mask.new_ones(n_text)]).view(1, 1, 1, -1)
    b = text_mask.shape[0]
    if img_mask is None:
        img_mask = torch.ones(n_img, dtype=torch.bool, device=text_mask.device)
    return torch.cat([img_mask.expand(b, -1), text_mask.to(torch.bool)], dim=1).view(b, 1, 1, -1)


def _allgather_kv_attention(q, k, v, mask, group, scale):
    """Fallback for heads % world != 0: every rank gets all keys/values, keeps its query shard."""
    world = dist.get_world_size(group)
    ks = [torch.empty_like(k) for _ in range(world)]
    vs = [torch.empty_like(v) for _ in range(world)]
    dist.all_gather(ks, k.contiguous(), group=group)
    dist.all_gather(vs, v.contiguous(), group=group)
    attn_mask = None if mask is None else mask.view(1, 1, 1, -1)
    return F.scaled_dot_product_attention(q, torch.cat(ks, dim=2), torch.cat(vs, dim=2),
                                          attn_mask=attn_mask, scale=scale)


class GroupCache:
    """Process groups of GPU sets, keyed by global rank tuples, made when a set is first used.

    Making every set the scheduler might use up front is slow (255 sets for 8 GPUs, far more on a
    cluster of several nodes) and would be redone each time the world is re-formed after a loss.
    So the driver asks for a set just before its first job (`WorkerPool` sends a "group" job to
    every member of the world, in one order): `new_group` must be called by all world ranks in the
    same order, but non-members return at once and only the members connect.  (Member-only
    creation, `use_local_synchronization`, names a group after how many groups each process made
    before, which differs between members that served different sets: they would never meet.)

    `members` are the global ranks (GPU indices) of the current world in world-rank order: after a
    node is lost the world is re-formed from the survivors, whose world ranks shift while their
    global ranks, which jobs and the scheduler use, stay.
    """

    def __init__(self, members: Iterable[int], backend: str | None = None):
        self.members = tuple(members)
        self._world_rank = {g: i for i, g in enumerate(self.members)}
        self.backend = backend
        self.groups: dict[tuple[int, ...], object] = {}

    def world_rank(self, rank: int) -> int:
        try:
            return self._world_rank[rank]
        except KeyError:
            raise ValueError(f"rank {rank} is not in the current world {self.members}") from None

    def make(self, ranks: Iterable[int]) -> None:
        """Collective over the world: every member calls it for the same sets in the same order."""
        ranks = tuple(sorted(ranks))
        if ranks in self.groups:
            return
        missing = [g for g in ranks if g not in self._world_rank]
        if missing:
            raise ValueError(f"no process group for ranks {ranks}: {missing} not in the "
                             f"current world {self.members}")
        if len(ranks) == len(self.members):
            self.groups[ranks] = dist.group.WORLD
        else:
            self.groups[ranks] = dist.new_group([self._world_rank[g] for g in ranks],
                                                backend=self.backend)

    def get(self, ranks: Iterable[int]):
        ranks = tuple(sorted(ranks))
        try:
            return self.groups[ranks]
        except KeyError:
            raise ValueError(f"no process group for ranks {ranks} in the world {self.members}; "
                             f"made so far: {sorted(self.groups)}") from None
