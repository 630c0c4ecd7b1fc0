"""Model presets: tiny random-weight models built from config (tests, CI, demo) and real checkpoints
loaded from a local diffusers directory (`local_files_only`: nothing is downloaded).

Tiny weights come from a fixed seed, so two processes that build the same preset hold the same
model bit for bit (the cross-process resume tests rely on it).  Tokenizers are built in code from
in-memory vocabularies.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import torch

from .base import DiffusionAdapter, ModelLoadError
from .families import FluxAdapter, SD3Adapter, WanAdapter



def _clip_tokenizer():
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = sorted(set(bytes_to_unicode().values()))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for tok in ("<|startoftext|>", "<|endoftext|>"):
        vocab[tok] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer(max_len: int):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789 .,!?\u2581"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_len)


def _clip_config(tok):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
                          num_attention_heads=4, num_hidden_layers=2, pad_token_id=1,
                          vocab_size=len(tok), hidden_act="gelu", projection_dim=32)


def _t5_config(tok, cls_name: str = "T5Config"):
    import transformers

    return getattr(transformers, cls_name)(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37,
                                           num_layers=2, num_heads=4, decoder_start_token_id=0)


def _image_vae():
    """A 2-level AutoencoderKL (2x down), 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8),
                         layers_per_block=1, latent_channels=4, norm_num_groups=1,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                         scaling_factor=1.5035)


def _quiet():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def tiny_t2i(device="cpu") -> SD3Adapter:
    """SD3-style: 2 joint blocks, CLIP x2 + T5 text encoders, a 2-level VAE (2x down)."""
    _quiet()
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer(32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        te1 = CLIPTextModelWithProjection(_clip_config(clip_tok))
        te2 = CLIPTextModelWithProjection(_clip_config(clip_tok))
        te3 = T5EncoderModel(_t5_config(t5_tok))
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
            pooled_projection_dim=64, out_channels=4)
        vae = _image_vae()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=te1, tokenizer=clip_tok, text_encoder_2=te2, tokenizer_2=clip_tok,
        text_encoder_3=te3, tokenizer_3=t5_tok)
    pipe.set_progress_bar_config(disable=True)
    return SD3Adapter(pipe.to(device), "tiny-t2i", device, max_sequence_length=32)


def tiny_flux(device="cpu") -> FluxAdapter:
    """FLUX-style: 1 double + 1 single block, guidance embedding, CLIP + T5 text encoders."""
    _quiet()
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer(32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        te1 = CLIPTextModel(_clip_config(clip_tok))
        te2 = T5EncoderModel(_t5_config(t5_tok))
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
        vae = _image_vae()
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                            max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=te1, tokenizer=clip_tok,
                        text_encoder_2=te2, tokenizer_2=t5_tok, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return FluxAdapter(pipe.to(device), "tiny-flux", device, max_sequence_length=32)


def tiny_t2v(device="cpu") -> WanAdapter:
    """Wan2.1-style: 2 blocks, a umT5 text encoder, the Wan VAE at its smallest width."""
    _quiet()
    from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline,
                           WanTransformer3DModel)
    from transformers import UMT5EncoderModel

    tok = _t5_tokenizer(32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        te = UMT5EncoderModel(_t5_config(tok, "UMT5Config"))
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
    _quiet()
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
        if model_path is None:
            raise ModelLoadError(f"model={name!r} needs --model-path DIR (a local diffusers "
                                 f"checkpoint; nothing is downloaded)")
        return load_local(name, model_path, device)
    raise ModelLoadError(f"model={name!r}: unknown preset; known: {', '.join(PRESETS)}")


# ----- families in their own modules (each adds its tiny builders, real presets, family) -----
# (one block per family below this line)


TINY = tuple(TINY_BUILDERS)
PRESETS = TINY + tuple(REAL)
