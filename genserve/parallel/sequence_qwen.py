"""Ulysses sequence parallelism for diffusers' QwenImageTransformer2DModel (Qwen-Image).

The pattern of `SD3SequenceParallel` / `FluxSequenceParallel` (sequence.py): a pre-hook on the
first double-stream block cuts the image tokens into contiguous shards (zero-padded to equal
length), a hook on the last block gathers them and drops the padding, so `img_in`, `txt_in`,
`norm_out` and `proj_out` see the whole sequence on every rank.  Text tokens stay replicated.

Qwen-Image specifics:
- The rotary embedding is one module call per forward (`pos_embed` returns (image freqs, text
  freqs)); a hook on it cuts the image rows like the image tokens, so every block receives this
  rank's rows and the text rows whole.
- Prompts of different lengths are batched with a text padding mask (`encoder_hidden_states_mask`,
  (B, T)); the joint attention masks padded text keys per sample as well as padded image keys.
  Without a text mask it is `joint_ulysses_attention` itself.
- With no group active, every attention call goes to diffusers' own processor: the model runs
  exactly as without sequence parallelism.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from .sequence_base import JointSequenceParallel, refuse_reinstall
from .ulysses import joint_ulysses_attention, shard


def _qkv(attn, x: torch.Tensor, added: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of one stream as (B, S, H, D), q and k normed (the projections, reshape and norms of
    diffusers' QwenDoubleStreamAttnProcessor2_0); `added`: the text stream's."""
    if added:
        proj = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        norm_q, norm_k = attn.norm_added_q, attn.norm_added_k
    else:
        proj = (attn.to_q, attn.to_k, attn.to_v)
        norm_q, norm_k = attn.norm_q, attn.norm_k
    head_dim = attn.inner_dim // attn.heads
    q, k, v = (p(x).unflatten(-1, (-1, head_dim)) for p in proj)
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k, v


def _rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Qwen's complex RoPE on (B, S, H, D), per token (so the image shard is rotated by its own
    rows of the frequencies)."""
    return apply_rotary_emb_qwen(x, freqs, use_real=False)


class _QwenAttn:
    """Qwen-Image joint attention: diffusers' own processor when no group is active; else RoPE on
    the local image shard and the whole text, and joint Ulysses attention."""

    def __init__(self, sp: "QwenSequenceParallel", inner):
        self.sp = sp
        self.inner = inner

    # The parameter names matter: diffusers' Attention passes only the keyword arguments that
    # the processor's signature names.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None,
                 encoder_hidden_states_mask=None, attention_mask=None, image_rotary_emb=None):
        sp = self.sp
        if sp.group is None:
            return self.inner(attn, hidden_states, encoder_hidden_states,
                              encoder_hidden_states_mask, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError("Qwen-Image sequence parallelism takes no attention mask (only "
                             "encoder_hidden_states_mask)")
        q, k, v = _qkv(attn, hidden_states, added=False)
        tq, tk, tv = _qkv(attn, encoder_hidden_states, added=True)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb  # image rows: this rank's (see `_shard_rope`)
            q, k = _rope(q, img_freqs), _rope(k, img_freqs)
            tq, tk = _rope(tq, txt_freqs), _rope(tk, txt_freqs)
        img, txt = joint_ulysses_attention(
            *(x.transpose(1, 2) for x in (q, k, v, tq, tk, tv)), sp.n_valid, sp.group,
            text_mask=encoder_hidden_states_mask)
        img, txt = (x.transpose(1, 2).flatten(2, 3).to(q.dtype) for x in (img, txt))
        img = attn.to_out[0](img.contiguous())
        if len(attn.to_out) > 1:
            img = attn.to_out[1](img)
        return img, attn.to_add_out(txt.contiguous())


class QwenSequenceParallel(JointSequenceParallel):
    """Installed once per transformer; `with sp.use(group): transformer(...)` runs one forward
    sharded over `group` (None or a 1-rank group: unsharded)."""

    def __init__(self, transformer):
        refuse_reinstall(transformer)  # before the processor check: ours are not diffusers'
        cfg = transformer.config
        if cfg.zero_cond_t or cfg.use_layer3d_rope:
            raise ValueError("Qwen-Image sequence parallelism supports the text-to-image "
                             "transformer only (no zero_cond_t, no layered 3D RoPE)")
        blocks = transformer.transformer_blocks
        for b in blocks:
            name = type(b.attn.processor).__name__
            if name != "QwenDoubleStreamAttnProcessor2_0":
                raise ValueError(f"Qwen-Image attention processor {name} is not supported (only "
                                 "diffusers' QwenDoubleStreamAttnProcessor2_0)")
        super().__init__(transformer)
        for b in blocks:
            b.attn.set_processor(_QwenAttn(self, b.attn.processor))
        transformer.register_forward_pre_hook(self._refuse_controlnet, with_kwargs=True)
        transformer.pos_embed.register_forward_hook(self._shard_rope)
        blocks[0].register_forward_pre_hook(self._shard_first, with_kwargs=True)
        blocks[-1].register_forward_hook(self._gather)

    def _refuse_controlnet(self, module, args, kwargs):
        if self.group is not None and kwargs.get("controlnet_block_samples") is not None:
            raise ValueError("Qwen-Image sequence parallelism does not shard ControlNet residuals")

    def _shard_rope(self, module, args, output):
        if self.group is None:
            return None
        img_freqs, txt_freqs = output  # (image tokens, D/2) and (text tokens, D/2), complex
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        return shard(img_freqs, 0, rank, world), txt_freqs

