"""Model presets: tiny random-weight models built from config (tests, CI, demo) and real checkpoints
loaded from a local diffusers directory (`local_files_only`: nothing is downloaded).

Tiny weights come from a fixed seed, so two processes that build the same preset hold the same
model bit for bit (the cross-process resume tests rely on it).  Tokenizers are built in code from
in-memory vocabularies.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from ..model_paths import model_dir
from .base import DiffusionAdapter, ModelLoadError
from .tiny import clip_config, clip_tokenizer, image_vae, quiet, t5_config, t5_tokenizer
from .families import FluxAdapter, SD3Adapter, WanAdapter



def tiny_t2i(device="cpu") -> SD3Adapter:
    """SD3-style: 2 joint blocks, CLIP x2 + T5 text encoders, a 2-level VAE (2x down)."""
    quiet()
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer(32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        te1 = CLIPTextModelWithProjection(clip_config(clip_tok))
        te2 = CLIPTextModelWithProjection(clip_config(clip_tok))
        te3 = T5EncoderModel(t5_config(t5_tok))
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
            pooled_projection_dim=64, out_channels=4)
        vae = image_vae()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=te1, tokenizer=clip_tok, text_encoder_2=te2, tokenizer_2=clip_tok,
        text_encoder_3=te3, tokenizer_3=t5_tok)
    pipe.set_progress_bar_config(disable=True)
    return SD3Adapter(pipe.to(device), "tiny-t2i", device, max_sequence_length=32)


def tiny_flux(device="cpu") -> FluxAdapter:
    """FLUX-style: 1 double + 1 single block, guidance embedding, CLIP + T5 text encoders."""
    quiet()
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer(32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        te1 = CLIPTextModel(clip_config(clip_tok))
        te2 = T5EncoderModel(t5_config(t5_tok))
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
        vae = image_vae()
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                            max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=te1, tokenizer=clip_tok,
                        text_encoder_2=te2, tokenizer_2=t5_tok, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return FluxAdapter(pipe.to(device), "tiny-flux", device, max_sequence_length=32)


def tiny_t2v(device="cpu") -> WanAdapter:
    """Wan2.1-style: 2 blocks, a umT5 text encoder, the Wan VAE at its smallest width."""
    quiet()
    from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline,
                           WanTransformer3DModel)
    from transformers import UMT5EncoderModel

    tok = t5_tokenizer(32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        te = UMT5EncoderModel(t5_config(tok, "UMT5Config"))
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
            out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                    num_train_timesteps=1000, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tok, text_encoder=te, transformer=transformer, vae=vae,
                       scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return WanAdapter(pipe.to(device), "tiny-t2v", device, max_sequence_length=32)


# Real presets: name -> family; a family is (diffusers pipeline class, adapter factory).  Families
# of other modules register below.
REAL = {"sd3-medium": "sd3", "flux-dev": "flux", "wan2.1-1.3b": "wan", "wan2.1-14b": "wan"}
FAMILIES: dict[str, tuple[str, Callable[..., DiffusionAdapter]]] = {
    "sd3": ("StableDiffusion3Pipeline", SD3Adapter), "flux": ("FluxPipeline", FluxAdapter),
    "wan": ("WanPipeline", WanAdapter)}
# Tiny presets: name -> builder(device).
TINY_BUILDERS: dict[str, Callable[..., DiffusionAdapter]] = {
    "tiny-t2i": tiny_t2i, "tiny-t2v": tiny_t2v, "tiny-flux": tiny_flux}


def load_local(preset: str, path: str | os.PathLike, device="cpu",
               dtype: torch.dtype = torch.bfloat16) -> DiffusionAdapter:
    """A real preset from a local diffusers directory (model_index.json and its folders)."""
    quiet()
    p = Path(path)
    if not p.is_dir():
        raise ModelLoadError(f"model_path={str(path)!r}: not a directory")
    if not (p / "model_index.json").is_file():
        raise ModelLoadError(f"model_path={str(path)!r}: no model_index.json; expected a "
                             f"diffusers checkpoint directory for {preset}")
    pipe_name, factory = FAMILIES[REAL[preset]]
    try:
        import diffusers

        pipe = getattr(diffusers, pipe_name).from_pretrained(p, local_files_only=True,
                                                             dtype=dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"model_path={str(path)!r}: cannot load {preset}: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    return factory(pipe, preset, device)


def load_preset(name: str, model_path: str | None = None, device="cpu") -> DiffusionAdapter:
    build = TINY_BUILDERS.get(name)
    if build is not None:
        return build(device)
    if name in REAL:
        try:
            path = model_dir(name, model_path)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        return load_local(name, path, device)
    raise ModelLoadError(f"model={name!r}: unknown preset; known: {', '.join(PRESETS)}")


# ----- families in their own modules (each adds its tiny builders, real presets, family) -----
# (one block per family below this line)

# Wan2.1 image-to-video: the first frame from an input image.
from .i2v import load_wan_i2v, tiny_i2v  # noqa: E402

REAL["wan2.1-i2v-14b"] = "wan-i2v"
FAMILIES["wan-i2v"] = ("WanImageToVideoPipeline", load_wan_i2v)
TINY_BUILDERS["tiny-i2v"] = tiny_i2v

# Wan2.2 text-to-video: A14B (two experts) and TI2V-5B (per-token timesteps), one adapter.
from .wan22 import Wan22Adapter, tiny_ti2v, tiny_wan22  # noqa: E402

REAL["wan2.2-a14b"] = "wan22"
REAL["wan2.2-ti2v-5b"] = "wan22"
FAMILIES["wan22"] = ("WanPipeline", Wan22Adapter)
TINY_BUILDERS["tiny-wan22"] = tiny_wan22
TINY_BUILDERS["tiny-ti2v"] = tiny_ti2v

# Qwen-Image text-to-image (MMDiT, Qwen2.5-VL text encoder, true CFG).
from .qwen import QwenImageAdapter, tiny_qwen  # noqa: E402

REAL["qwen-image"] = "qwen"
FAMILIES["qwen"] = ("QwenImagePipeline", QwenImageAdapter)
TINY_BUILDERS["tiny-qwen"] = tiny_qwen


TINY = tuple(TINY_BUILDERS)
PRESETS = TINY + tuple(REAL)
