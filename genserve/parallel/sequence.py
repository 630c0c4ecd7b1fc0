"""Ulysses sequence parallelism for diffusers' Wan, SD3 and FLUX transformers, degree chosen per call.

Our own hooks and processor rather than diffusers' `enable_parallelism`: that one keeps the degree
in private module state (`_cp_plan`, `_parallel_config`) that must be torn down to change it, while
GenServe changes a request's degree between any two steps.  Here the group is an argument of
`use(group)`; with no group the model runs exactly as before.

How the forward is split: a pre-hook on the first block cuts the patch tokens into contiguous
shards (zero-padded to equal length) and a hook on the last block gathers them and drops the
padding, so embeddings before and norm_out / proj_out / unpatchify after see the full sequence on
every rank.  Text tokens stay replicated.
- Wan: every block's rotary embedding is cut like the tokens; self-attention runs through
  `ulysses_attention` (padded keys masked); cross-attention needs nothing: its queries are the
  local tokens and its keys replicated (the text, and Wan2.1 I2V's image tokens, which attn2
  reads through its added key/value projections).
- SD3 (MMDiT joint attention): `joint_ulysses_attention`, image tokens sharded, text replicated.
- FLUX: the same joint attention in both block kinds.  Double-stream blocks get text and image
  apart; single-stream blocks concatenate [text, local image shard] themselves, so the processor
  splits at the text length.  The rotary embedding is computed once from [text ids, image ids]:
  its text rows stay whole, its image rows are cut like the image tokens.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from diffusers.models.embeddings import apply_rotary_emb

from .sequence_base import JointSequenceParallel, SequenceParallel, refuse_reinstall
from .ulysses import joint_ulysses_attention, shard, ulysses_attention, unshard


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


class WanSequenceParallel(SequenceParallel):
    """Installed once per transformer; `with sp.use(group): transformer(...)` runs one forward
    sharded over `group` (None or a 1-rank group: unsharded)."""

    def __init__(self, transformer):
        blocks = transformer.blocks
        # Our self-attention processor has no image context; I2V's is in attn2 (cross-attention,
        # diffusers' own processor, which sharding does not touch).
        if any(getattr(b.attn1, "add_k_proj", None) is not None for b in blocks):
            raise ValueError("Wan self-attention with image key/value projections is not "
                             "supported")
        super().__init__(transformer)
        self._rot: tuple | None = None
        self._temb: torch.Tensor | None = None
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(self._shard_first if i == 0 else self._shard_rotary)
            block.attn1.set_processor(_SelfAttn(self))
        blocks[-1].register_forward_hook(self._gather)

    def _reset(self) -> None:
        self._rot = None
        self._temb = None

    def _shard_first(self, module, args):
        if self.group is None:
            return None
        hidden, text, temb, rotary = args
        self.n_valid = hidden.shape[1]
        self._rot = tuple(self._shards(r) for r in rotary)
        # Wan2.2 TI2V (expand_timesteps): one time embedding per token, (B, N, 6, D): cut like
        # the tokens.  Otherwise (B, 6, D), shared by all tokens.
        self._temb = self._shards(temb) if temb.ndim == 4 else temb
        return (self._shards(hidden), text, self._temb, self._rot)

    def _shard_rotary(self, module, args):
        if self.group is None:
            return None
        hidden, text, _, _ = args
        return (hidden, text, self._temb, self._rot)

    def _gather(self, module, args, output):
        if self.group is None:
            return None
        return unshard(output, 1, self.n_valid, self.group)


class _JointAttn:
    """SD3 joint attention (the math of diffusers' JointAttnProcessor2_0), Ulysses when active."""

    def __init__(self, sp: "SD3SequenceParallel"):
        self.sp = sp

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        b, h = hidden_states.shape[0], attn.heads

        def heads(x):
            return x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(
            attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        tq = heads(attn.add_q_proj(encoder_hidden_states))
        tk = heads(attn.add_k_proj(encoder_hidden_states))
        tv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        if self.sp.group is not None:
            img, txt = joint_ulysses_attention(q, k, v, tq, tk, tv, self.sp.n_valid, self.sp.group)
        else:
            n = q.shape[2]
            out = F.scaled_dot_product_attention(torch.cat([q, tq], 2), torch.cat([k, tk], 2),
                                                 torch.cat([v, tv], 2))
            img, txt = out[:, :, :n], out[:, :, n:]
        img = img.transpose(1, 2).reshape(b, -1, h * img.shape[-1]).to(q.dtype)
        txt = txt.transpose(1, 2).reshape(b, -1, h * txt.shape[-1]).to(q.dtype)
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return attn.to_out[1](attn.to_out[0](img)), txt


class SD3SequenceParallel(JointSequenceParallel):
    def __init__(self, transformer):
        blocks = transformer.transformer_blocks
        if any(getattr(b, "use_dual_attention", False) for b in blocks):
            raise ValueError("SD3.5 dual attention layers are not supported")
        super().__init__(transformer)
        for block in blocks:
            block.attn.set_processor(_JointAttn(self))
        blocks[0].register_forward_pre_hook(self._shard_first, with_kwargs=True)
        blocks[-1].register_forward_hook(self._gather)



def _flux_qkv(attn, x: torch.Tensor, added: bool) -> tuple[torch.Tensor, ...]:
    """FLUX q, k, v of `x` as (B, S, H, D), q and k normed (diffusers' `_get_qkv_projections` and
    the reshape and norms of FluxAttnProcessor); `added`: the text stream's projections."""
    if added:
        fused, proj = getattr(attn, "to_added_qkv", None), (attn.add_q_proj, attn.add_k_proj,
                                                           attn.add_v_proj)
        norm_q, norm_k = attn.norm_added_q, attn.norm_added_k
    else:
        fused, proj = getattr(attn, "to_qkv", None), (attn.to_q, attn.to_k, attn.to_v)
        norm_q, norm_k = attn.norm_q, attn.norm_k
    if attn.fused_projections and fused is not None:
        q, k, v = fused(x).chunk(3, dim=-1)
    else:
        q, k, v = (p(x) for p in proj)
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
    return norm_q(q), norm_k(k), v


def _rope(x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE on (B, S, H, D), as FluxAttnProcessor applies it (elementwise per token, so text and
    image parts can be rotated apart)."""
    return apply_rotary_emb(x, rot, sequence_dim=1)


class _FluxAttn:
    """FLUX attention for both block kinds: diffusers' own processor when no group is active, so
    the unsharded model is unchanged; else RoPE on the local tokens and joint Ulysses attention
    (image keys sharded, text keys replicated; key order does not change the softmax)."""

    def __init__(self, sp: "FluxSequenceParallel", inner):
        self.sp = sp
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        sp = self.sp
        if sp.group is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask,
                              image_rotary_emb)
        if attention_mask is not None:
            raise ValueError("FLUX sequence parallelism takes no attention mask")
        single = encoder_hidden_states is None  # single-stream: hidden is [text, local image]
        q, k, v = _flux_qkv(attn, hidden_states, added=False)
        if single:
            t = sp.n_text
            (tq, q), (tk, k), (tv, v) = (x.split_with_sizes([t, x.shape[1] - t], dim=1)
                                         for x in (q, k, v))
        else:
            tq, tk, tv = _flux_qkv(attn, encoder_hidden_states, added=True)
        q, k = _rope(q, sp.rot_img), _rope(k, sp.rot_img)
        tq, tk = _rope(tq, sp.rot_txt), _rope(tk, sp.rot_txt)
        img, txt = joint_ulysses_attention(*(x.transpose(1, 2) for x in (q, k, v, tq, tk, tv)),
                                           sp.n_valid, sp.group)
        img, txt = (x.transpose(1, 2).flatten(2, 3).to(q.dtype) for x in (img, txt))
        if single:  # pre-only: the block's proj_out follows
            return torch.cat([txt, img], dim=1)
        return attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(txt)


class FluxSequenceParallel(JointSequenceParallel):
    """Both block lists run sharded: the first block (double- or single-stream) gets the image
    shard, the last one's image output is gathered."""

    def __init__(self, transformer):
        refuse_reinstall(transformer)  # before the processor check: ours are not diffusers'
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        for b in blocks:
            if type(b.attn.processor).__name__ != "FluxAttnProcessor":
                raise ValueError(f"FLUX attention processor {type(b.attn.processor).__name__} "
                                 "is not supported (only diffusers' FluxAttnProcessor)")
        super().__init__(transformer)
        self.n_text = 0
        self.rot_txt: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rot_img: tuple[torch.Tensor, torch.Tensor] | None = None
        for b in blocks:
            b.attn.set_processor(_FluxAttn(self, b.attn.processor))
        transformer.register_forward_pre_hook(self._refuse_controlnet, with_kwargs=True)
        blocks[0].register_forward_pre_hook(self._shard_first, with_kwargs=True)
        blocks[-1].register_forward_hook(self._gather)

    def _reset(self) -> None:
        self.rot_txt = self.rot_img = None

    def _refuse_controlnet(self, module, args, kwargs):
        if self.group is not None and (kwargs.get("controlnet_block_samples") is not None
                                       or kwargs.get("controlnet_single_block_samples") is not None):
            raise ValueError("FLUX sequence parallelism does not shard ControlNet residuals")

    def _shard_first(self, module, args, kwargs):
        if self.group is None:
            return None
        hidden, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        self.n_valid, self.n_text = hidden.shape[1], text.shape[1]
        rot = kwargs["image_rotary_emb"]  # rows: [text ids..., image ids...]
        self.rot_txt = tuple(r[:self.n_text] for r in rot)
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.rot_img = tuple(shard(r[self.n_text:], 0, rank, world) for r in rot)
        return args, {**kwargs, "hidden_states": self._shards(hidden)}



def install(transformer) -> SequenceParallel:
    """Sequence parallelism for a supported diffusers transformer."""
    name = type(transformer).__name__
    if name == "WanTransformer3DModel":
        return WanSequenceParallel(transformer)
    if name == "SD3Transformer2DModel":
        return SD3SequenceParallel(transformer)
    if name == "FluxTransformer2DModel":
        return FluxSequenceParallel(transformer)
    if name == "QwenImageTransformer2DModel":
        from .sequence_qwen import QwenSequenceParallel

        return QwenSequenceParallel(transformer)
    raise ValueError(f"no sequence parallelism for {name} (supported: Wan, SD3, FLUX, "
                     "Qwen-Image)")


class _Together:
    """Several transformers of one model (Wan2.2 A14B's two experts) behind one handle: inside
    `use(group)` whichever of them runs is sharded over `group`."""

    def __init__(self, sps: list[SequenceParallel]):
        self.sps = sps

    @contextmanager
    def use(self, group):
        with ExitStack() as stack:
            for sp in self.sps:
                stack.enter_context(sp.use(group))
            yield self


def install_model(adapter) -> SequenceParallel | _Together:
    """Sequence parallelism for every transformer a model adapter may run (its `transformers`
    when it has several, else its `transformer`), under one `use`."""
    sps = [install(t) for t in getattr(adapter, "transformers", (adapter.transformer,))]
    return sps[0] if len(sps) == 1 else _Together(sps)
