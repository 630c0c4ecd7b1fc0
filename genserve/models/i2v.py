"""Wan2.1 image-to-video (diffusers' `WanImageToVideoPipeline`): the first frame from an image.

The image conditions every step in two ways, both computed once, at encode time, from the
request's `GenSpec.image` (a PNG already at the request's size, see `genserve.input_image`):
- image tokens: the CLIP vision encoder's penultimate hidden states, which each block's
  cross-attention (attn2) reads through its own added key/value projections, next to the text;
- the condition: the VAE latents of [image, black frames...] plus a mask marking the first frame
  as given, concatenated to the noisy latents on the channel axis before every forward
  (16 + 4 + 16 = 36 input channels).

Both are per-branch transformer inputs like the text embeddings (the pipeline gives the
unconditional branch the same image tokens and condition), so they live in the state's `cond` and
`uncond` dicts.  Batching, CFG (batch doubling or split), pause/resume, moves and checkpoints then
carry them with no change to the base machinery, and a resumed request steps with exactly what it
was encoded with.  Both dicts hold the same tensors, stored once in a CPU state's bytes; a state
moved to a GPU gets a copy per dict (about 6 MB more at 480p, 81 frames, bf16: the condition is
kept in the transformer's dtype, which the forward casts it to anyway).

Everything else is Wan2.1's (`WanAdapter`): UniPC, the VAE decode.  The diffusers attention
processor finds the image tokens as the first `len - 512` context tokens, so the text is always
padded to 512 tokens here.  Under Ulysses (`parallel/sequence.py`) attn2 needs nothing: its
queries are the local shard of patch tokens, its keys (text and image tokens) are replicated.
"""

from __future__ import annotations

import torch

from ..catalog import uses_cfg
from ..input_image import InputImageError, decode
from ..spec import GenSpec
from .base import ModelInputError, ModelLoadError
from .families import WanAdapter

# diffusers' WanAttnProcessor splits [image tokens, text tokens] at `len - 512`.
TEXT_TOKENS = 512
IMAGE_KEY, CONDITION_KEY = "encoder_hidden_states_image", "condition"


class WanI2VAdapter(WanAdapter):
    """WanImageToVideoPipeline (Wan2.1 I2V): WanAdapter plus the image's tokens and condition."""

    def __init__(self, pipe, name: str, device="cpu", max_sequence_length: int = TEXT_TOKENS):
        if getattr(pipe, "transformer_2", None) is not None or pipe.config.get(
                "expand_timesteps", False):
            raise ModelLoadError(f"{name}: only Wan2.1 I2V (one transformer, condition on the "
                                 "channel axis) is supported, not Wan2.2's two experts or "
                                 "per-token timesteps")
        if max_sequence_length != TEXT_TOKENS:
            raise ModelLoadError(f"{name}: the I2V attention expects {TEXT_TOKENS} text tokens, "
                                 f"not {max_sequence_length}")
        super().__init__(pipe, name, device, max_sequence_length)

    def validate(self, spec: GenSpec) -> None:
        super().validate(spec)
        if not spec.image:
            raise ModelInputError("input_reference", f"{self.name} makes a video from an "
                                  "image: an input image is required (`input_reference` in "
                                  "the API, --image on the command line)")

    def _encode(self, r: GenSpec):
        cfg = uses_cfg(self.name, r.guidance)
        cond = {"encoder_hidden_states": self._text(r.prompt)}
        uncond = {"encoder_hidden_states": self._text(r.negative_prompt)} if cfg else None
        try:
            image = decode(r.image, r.width, r.height)
        except InputImageError as e:
            raise ModelInputError("input_reference", str(e)) from None
        shared = {CONDITION_KEY: self._condition(image, r)}
        if self.transformer.config.image_dim is not None:
            shared[IMAGE_KEY] = self.pipe.encode_image(image, self.device).to(self.dtype)
        cond.update(shared)
        if uncond is not None:
            uncond.update(shared)
        return cond, uncond

    def _text(self, prompt: str) -> torch.Tensor:
        """umT5 embeddings padded to 512 tokens.  WanPipeline's code (the I2V pipeline's is a
        copy of it that calls ftfy even where ftfy is not installed)."""
        from diffusers import WanPipeline

        return WanPipeline._get_t5_prompt_embeds(self.pipe, prompt, 1, self.max_sequence_length,
                                                 self.device)

    def _condition(self, image, r: GenSpec) -> torch.Tensor:
        """[mask (vae temporal factor channels), VAE latents of the image then black frames],
        from the pipeline's own `prepare_latents` (its noise is not used: ours comes from the
        request's generator in `_init_latents`, as the pipeline draws it).  Kept in the
        transformer's dtype: the pipeline casts the concatenated input to it anyway."""
        pixels = self.pipe.video_processor.preprocess(image, height=r.height, width=r.width)
        shape = self._latent_shape(r)
        _, condition = self.pipe.prepare_latents(
            pixels.to(self.device, torch.float32), 1, shape[1], r.height, r.width, r.frames,
            torch.float32, self.device, None, torch.zeros(shape, device=self.device))
        return condition.to(self.dtype)

    def _latent_shape(self, r: GenSpec) -> tuple[int, ...]:
        s = self.pipe.vae_scale_factor_spatial
        return (1, self.pipe.vae.config.z_dim, (r.frames - 1) // self.temporal_factor + 1,
                r.height // s, r.width // s)

    def _init_latents(self, r: GenSpec, gen: torch.Generator) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(self._latent_shape(r), generator=gen, device=self.device,
                            dtype=torch.float32)

    def _forward(self, latents, timesteps, embeds, states):
        x = torch.cat([latents, embeds[CONDITION_KEY].to(latents.dtype)], dim=1)
        return self.transformer(hidden_states=x.to(self.dtype), timestep=timesteps,
                                encoder_hidden_states=embeds["encoder_hidden_states"],
                                encoder_hidden_states_image=embeds.get(IMAGE_KEY),
                                return_dict=False)[0].float()


def load_wan_i2v(pipe, name: str, device="cpu") -> WanI2VAdapter:
    """The real preset's factory: the VAE and the image encoder in float32, as diffusers' I2V
    example loads them (the first frame's latents and tokens are computed once per request)."""
    pipe.vae.to(torch.float32)
    if pipe.image_encoder is not None:
        pipe.image_encoder.to(torch.float32)
    return WanI2VAdapter(pipe, name, device)


def tiny_i2v(device="cpu") -> WanI2VAdapter:
    """Wan2.1-I2V-style: tiny-t2v's shapes with 36 input channels, image cross-attention and a
    2-layer CLIP vision encoder (32 px, 8 px patches: 17 image tokens) with its processor."""
    from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline,
                           WanTransformer3DModel)
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5EncoderModel

    import transformers

    from .tiny import quiet, t5_config, t5_tokenizer

    quiet()
    tok = t5_tokenizer(TEXT_TOKENS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        te = UMT5EncoderModel(t5_config(tok, "UMT5Config"))
        image_encoder = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            image_size=32, patch_size=8, projection_dim=32, layer_norm_eps=1e-5))
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36,
            out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
            image_dim=32, added_kv_proj_dim=24)
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    # The Pillow backend by name where transformers has one (the default one wants torchvision).
    processor_cls = (getattr(transformers, "CLIPImageProcessorPil", None)
                     or transformers.CLIPImageProcessor)
    processor = processor_cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                    num_train_timesteps=1000, flow_shift=3.0)
    pipe = WanImageToVideoPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=sched,
                                   image_processor=processor, image_encoder=image_encoder,
                                   transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return WanI2VAdapter(pipe.to(device), "tiny-i2v", device)
