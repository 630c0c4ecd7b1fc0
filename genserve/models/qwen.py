"""Qwen-Image (text-to-image): QwenImagePipeline on diffusers' own classes, and its tiny twin.

QwenImageTransformer2DModel is an MMDiT of double-stream blocks over packed 2x2 latents (8x VAE, 16
channels), with a Qwen2.5-VL text encoder whose prompt embeddings have the prompt's own length (the
pipeline keeps only the non-padding tokens after its system-prompt template).  Two things differ
from the SD3 / FLUX adapters:

- Prompts of different lengths share a batched forward (requests in one batch, and a request's
  negative and positive prompts under CFG): the embeddings are zero-padded to the longest and
  `encoder_hidden_states_mask` masks the padding, as diffusers does for a batch of prompts.
- "True CFG" renormalises the guided prediction to the conditional one's norm per token,
  `comb * (|cond| / |comb|)`, which `DiffusionAdapter`'s plain `u + g (c - u)` cannot express, so
  this adapter runs its own guidance step (`_step_group`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..catalog import uses_cfg
from ..kinds import Kind
from ..spec import GenSpec
from .base import CfgBranch, DiffusionAdapter, ModelInputError, StepState
from .families import shift_mu

_TEXT = "encoder_hidden_states"
_MASK = "encoder_hidden_states_mask"


def true_cfg(out_u: torch.Tensor, out_c: torch.Tensor, g: torch.Tensor | float) -> torch.Tensor:
    """QwenImagePipeline's guidance: the CFG combination rescaled, token by token (the last axis
    holds a token's packed channels), to the norm of the conditional prediction."""
    comb = out_u + g * (out_c - out_u)
    cond_norm = torch.norm(out_c, dim=-1, keepdim=True)
    noise_norm = torch.norm(comb, dim=-1, keepdim=True)
    return comb * (cond_norm / noise_norm)


def pad_text(embeds: list[torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """(1, T_i, D) prompt embeddings -> one (B, max T_i, D) batch, zero-padded, with a (B, T) bool
    mask of the real tokens; no mask when every prompt has the same length, so that a prompt alone
    runs exactly as in the pipeline (which drops an all-true mask)."""
    n = max(e.shape[1] for e in embeds)
    if all(e.shape[1] == n for e in embeds):
        return {_TEXT: torch.cat(embeds), _MASK: None}
    rows, masks = [], []
    for e in embeds:
        pad = n - e.shape[1]
        rows.append(torch.cat([e, e.new_zeros(1, pad, e.shape[2])], dim=1))
        masks.append(torch.arange(n, device=e.device) < e.shape[1])
    return {_TEXT: torch.cat(rows), _MASK: torch.stack(masks)}


class QwenImageAdapter(DiffusionAdapter):
    """QwenImagePipeline: QwenImageTransformer2DModel + FlowMatchEulerDiscreteScheduler (dynamic
    shift) + AutoencoderKLQwenImage.  CFG ("true CFG") runs above guidance 1 with the request's
    negative prompt, an empty one included, as the unconditional branch."""

    kind = Kind.IMAGE

    def __init__(self, pipe, name: str, device="cpu", max_sequence_length: int = 512):
        super().__init__(pipe, name, device, max_sequence_length)
        self.spatial_multiple = pipe.vae_scale_factor * 2

    def validate(self, spec: GenSpec) -> None:
        super().validate(spec)
        # Qwen-Image's schedule stretches its sigmas to end at `shift_terminal`: one step has no
        # span to stretch (0 / 0) and would give NaN latents.
        if self._scheduler_template.config.get("shift_terminal") and spec.steps < 2:
            raise ModelInputError("steps", f"{spec.steps!r}: {self.name} needs at least 2 steps")

    def _encode(self, r: GenSpec):
        cond = self._prompt(r.prompt)
        uncond = self._prompt(r.negative_prompt) if uses_cfg(self.name, r.guidance) else None
        return cond, uncond

    def _prompt(self, prompt: str) -> dict[str, torch.Tensor]:
        # One prompt alone keeps exactly its real tokens: its mask is all true (None).
        pe, _ = self.pipe.encode_prompt(prompt=prompt, device=self.device,
                                        max_sequence_length=self.max_sequence_length)
        return {_TEXT: pe}

    def _init_latents(self, r: GenSpec, gen: torch.Generator) -> torch.Tensor:
        return self.pipe.prepare_latents(1, self.transformer.config.in_channels // 4, r.height,
                                         r.width, torch.float32, self.device, gen)

    def _set_timesteps(self, sched, r: GenSpec) -> None:
        mu = shift_mu(sched, r, self.spatial_multiple, max_shift=1.15)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / r.steps, r.steps), device=self.device,
                            mu=mu)
        sched.set_begin_index(0)

    def _join_embeds(self, parts: list[dict]) -> dict[str, torch.Tensor | None]:
        """Padded to the longest prompt and masked: prompt lengths differ."""
        return pad_text([p[_TEXT].to(self.device) for p in parts])

    def _step_group(self, group: list[StepState], cfg: CfgBranch | None = None) -> None:
        """The base class's step with `true_cfg` in place of `u + g (c - u)` (batch doubling or
        one CFG-parallel branch alike); a group without CFG is the base class's step."""
        if not group[0].cfg:
            super()._step_group(group, cfg)
            return
        scheds = [self._live_scheduler(s) for s in group]
        lat = torch.cat([s.latents for s in group]).to(self.device)
        ts = torch.stack([sch.timesteps[s.step_index] for sch, s in zip(scheds, group)])
        ts = ts.to(self.device)
        if cfg is None:
            out = self._forward(torch.cat([lat, lat]), torch.cat([ts, ts]), self._embeds(group),
                                group + group)
            out_u, out_c = out.chunk(2)
        else:
            out_u, out_c = self._branch_forward(lat, ts, group, cfg)
        g = torch.tensor([s.guidance for s in group], dtype=out_u.dtype,
                         device=out_u.device).view((len(group),) + (1,) * (out_u.dim() - 1))
        noise = true_cfg(out_u, out_c, g)
        for i, (s, sch) in enumerate(zip(group, scheds)):
            s.latents = sch.step(noise[i:i + 1], ts[i], s.latents, return_dict=False)[0]
            s.step_index += 1

    def _forward(self, latents, timesteps, embeds, states):
        s0 = states[0]
        shape = (1, s0.height // self.spatial_multiple, s0.width // self.spatial_multiple)
        # No guidance input: Qwen-Image is not guidance-distilled (its timestep embedding takes
        # none).
        return self.transformer(hidden_states=latents.to(self.dtype), timestep=timesteps / 1000,
                                encoder_hidden_states=embeds[_TEXT],
                                encoder_hidden_states_mask=embeds[_MASK],
                                img_shapes=[[shape]] * latents.shape[0],
                                return_dict=False)[0].float()

    def _decode(self, latents, state) -> np.ndarray:
        vae = self.pipe.vae
        lat = self.pipe._unpack_latents(latents, state.height, state.width,
                                        self.pipe.vae_scale_factor).to(vae.dtype)
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(lat)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(lat)
        image = vae.decode(lat / inv_std + mean, return_dict=False)[0][:, :, 0]
        return self.pipe.image_processor.postprocess(image, output_type="np")[0]


# ----- the tiny preset -----

_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _qwen_tokenizer():
    """A byte-level Qwen2 tokenizer with no merges (one token per byte) and the chat template's
    special tokens."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = sorted(set(bytes_to_unicode().values()))
    vocab = {c: i for i, c in enumerate(chars)}
    for tok in _SPECIALS:
        vocab[tok] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=list(_SPECIALS[1:]),
                          model_max_length=2048)


def _qwen_vl(tok):
    """A 2-layer Qwen2.5-VL (32 wide, 4 heads; a 1-block vision tower the pipeline never runs)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    n = len(tok)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    text = dict(vocab_size=n, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                # Multimodal RoPE sections: their sum is half the head width (8).
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                  fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=n,
                              video_token_id=n + 1, vision_start_token_id=n + 2,
                              vision_end_token_id=n + 3)
    return Qwen2_5_VLForConditionalGeneration(config)


def tiny_qwen(device="cpu") -> QwenImageAdapter:
    """Qwen-Image-style: 2 double-stream blocks (4 heads of 8), a 2-layer Qwen2.5-VL text encoder,
    the Qwen-Image VAE at its smallest width (8x, 16 channels)."""
    from .tiny import quiet

    quiet()
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler,
                           QwenImagePipeline, QwenImageTransformer2DModel)

    tok = _qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        te = _qwen_vl(tok)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(2, 2, 4))
        vae = AutoencoderKLQwenImage(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1],
                                     num_res_blocks=1, temperal_downsample=[False, True, True])
    # Qwen-Image's own scheduler configuration.
    sched = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok,
                             transformer=transformer)
    # The pipeline drops the system part of its template by a token count of Qwen's own
    # tokenizer (34); ours splits the same text into one token per byte.
    prefix = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tok(prefix).input_ids)
    pipe.set_progress_bar_config(disable=True)
    return QwenImageAdapter(pipe.to(device), "tiny-qwen", device)
