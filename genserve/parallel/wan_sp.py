"""Ulysses sequence parallelism for diffusers' WanTransformer3DModel, degree chosen per call.

Our own hooks and processor rather than diffusers' `enable_parallelism`: that one keeps the degree
in private module state (`_cp_plan`, `_parallel_config`) that must be torn down to change it, while
GenServe changes a request's degree between any two steps.  Here the group is an argument of
`use(group)`; with no group the model runs exactly as before.

How the forward is split: a pre-hook on the first block cuts the patch tokens into contiguous
shards (zero-padded to equal length), every block's rotary embedding is cut the same way, self-
attention runs through `ulysses_attention` (padded keys masked), cross-attention needs nothing
(the text is replicated on every rank), and a hook on the last block gathers the shards and drops
the padding, so norm_out / proj_out / unpatchify see the full sequence on every rank.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .ulysses import shard, ulysses_attention, unshard


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs (the math of diffusers' WanAttnProcessor)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


class _SelfAttn:
    """Wan self-attention (T2V: no image context) with Ulysses when a group is active."""

    def __init__(self, sp: "WanSequenceParallel"):
        self.sp = sp

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
        if self.sp.group is not None:
            out = ulysses_attention(q, k, v, self.sp.n_valid, self.sp.group)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class WanSequenceParallel:
    """Installed once per transformer; `with sp.use(group): transformer(...)` runs one forward
    sharded over `group` (None or a 1-rank group: unsharded)."""

    def __init__(self, transformer):
        if getattr(transformer, "_genserve_sp", None) is not None:
            raise ValueError("sequence parallelism is already installed on this transformer")
        blocks = transformer.blocks
        if any(getattr(b.attn1, "add_k_proj", None) is not None for b in blocks):
            raise ValueError("image-conditioned Wan (I2V) attention is not supported")
        self.group = None
        self.n_valid = 0
        self._rot: tuple | None = None
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(self._shard_first if i == 0 else self._shard_rotary)
            block.attn1.set_processor(_SelfAttn(self))
        blocks[-1].register_forward_hook(self._gather)
        transformer._genserve_sp = self

    @contextmanager
    def use(self, group):
        if group is not None and dist.get_world_size(group) == 1:
            group = None
        self.group = group
        try:
            yield self
        finally:
            self.group, self._rot = None, None

    def _shards(self, x: torch.Tensor) -> torch.Tensor:
        return shard(x, 1, dist.get_rank(self.group), dist.get_world_size(self.group))

    def _shard_first(self, module, args):
        if self.group is None:
            return None
        hidden, text, temb, rotary = args
        self.n_valid = hidden.shape[1]
        self._rot = tuple(self._shards(r) for r in rotary)
        return (self._shards(hidden), text, temb, self._rot)

    def _shard_rotary(self, module, args):
        if self.group is None:
            return None
        hidden, text, temb, _ = args
        return (hidden, text, temb, self._rot)

    def _gather(self, module, args, output):
        if self.group is None:
            return None
        return unshard(output, 1, self.n_valid, self.group)
