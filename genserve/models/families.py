"""The families on diffusers' own classes: SD3 and FLUX (text-to-image), Wan2.1 (text-to-video).

Both use the pipeline's own `encode_prompt`, `prepare_latents`, scheduler and VAE, so a real
checkpoint and a tiny random one run the same code; only the denoising loop is ours (batched over
requests, CFG as batch doubling, per-sample timesteps).
"""

from __future__ import annotations

import numpy as np
import torch

from ..catalog import uses_cfg
from ..kinds import Kind
from ..spec import GenSpec
from .base import DiffusionAdapter


def shift_mu(sched, r: GenSpec, multiple: int, max_shift: float) -> float:
    """The `mu` of a flow-matching schedule shifted by image size: the pipelines'
    `calculate_shift` (one function, copied between SD3, FLUX and Qwen-Image) over the scheduler's
    config, `max_shift` where the config names none (each pipeline's own default)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = sched.config
    seq = (r.height // multiple) * (r.width // multiple)
    return calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                           c.get("base_shift", 0.5), c.get("max_shift", max_shift))


class SD3Adapter(DiffusionAdapter):
    """StableDiffusion3Pipeline: SD3Transformer2DModel + FlowMatchEulerDiscreteScheduler."""

    kind = Kind.IMAGE

    def __init__(self, pipe, name: str, device="cpu", max_sequence_length: int = 256):
        super().__init__(pipe, name, device, max_sequence_length)
        self.spatial_multiple = pipe.vae_scale_factor * pipe.patch_size

    def _encode(self, r: GenSpec):
        cfg = uses_cfg(self.name, r.guidance)
        pe, npe, pooled, npooled = self.pipe.encode_prompt(
            prompt=r.prompt, prompt_2=r.prompt, prompt_3=r.prompt, device=self.device,
            do_classifier_free_guidance=cfg, negative_prompt=r.negative_prompt,
            negative_prompt_2=r.negative_prompt, negative_prompt_3=r.negative_prompt,
            max_sequence_length=self.max_sequence_length)
        cond = {"encoder_hidden_states": pe, "pooled_projections": pooled}
        uncond = {"encoder_hidden_states": npe, "pooled_projections": npooled} if cfg else None
        return cond, uncond

    def _init_latents(self, r: GenSpec, gen: torch.Generator) -> torch.Tensor:
        return self.pipe.prepare_latents(1, self.transformer.config.in_channels, r.height,
                                         r.width, torch.float32, self.device, gen)

    def _set_timesteps(self, sched, r: GenSpec) -> None:
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", None):
            kwargs["mu"] = shift_mu(sched, r, self.spatial_multiple, max_shift=1.16)
        sched.set_timesteps(r.steps, device=self.device, **kwargs)

    def _forward(self, latents, timesteps, embeds, states):
        return self.transformer(hidden_states=latents.to(self.dtype), timestep=timesteps,
                                encoder_hidden_states=embeds["encoder_hidden_states"],
                                pooled_projections=embeds["pooled_projections"],
                                return_dict=False)[0].float()

    def _decode(self, latents, state) -> np.ndarray:
        vae = self.pipe.vae
        lat = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(lat, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="np")[0]


class FluxAdapter(DiffusionAdapter):
    """FluxPipeline: FluxTransformer2DModel on packed 2x2 latents, guidance-distilled (no CFG:
    the guidance scale is an input of the transformer, per request)."""

    kind = Kind.IMAGE

    def __init__(self, pipe, name: str, device="cpu", max_sequence_length: int = 512):
        super().__init__(pipe, name, device, max_sequence_length)
        self.spatial_multiple = pipe.vae_scale_factor * 2

    def _encode(self, r: GenSpec):
        pe, pooled, _ = self.pipe.encode_prompt(prompt=r.prompt, prompt_2=r.prompt,
                                                device=self.device,
                                                max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": pe, "pooled_projections": pooled}, None

    def _init_latents(self, r: GenSpec, gen: torch.Generator) -> torch.Tensor:
        lat, _ = self.pipe.prepare_latents(1, self.transformer.config.in_channels // 4, r.height,
                                           r.width, torch.float32, self.device, gen)
        return lat

    def _set_timesteps(self, sched, r: GenSpec) -> None:
        mu = shift_mu(sched, r, self.spatial_multiple, max_shift=1.15)
        sigmas = None if sched.config.get("use_flow_sigmas") else np.linspace(
            1.0, 1 / r.steps, r.steps)
        sched.set_timesteps(r.steps, device=self.device, sigmas=sigmas, mu=mu)

    def _forward(self, latents, timesteps, embeds, states):
        s0 = states[0]
        h = 2 * (s0.height // self.spatial_multiple)
        w = 2 * (s0.width // self.spatial_multiple)
        img_ids = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, self.dtype)
        txt = embeds["encoder_hidden_states"]
        txt_ids = torch.zeros(txt.shape[1], 3, device=self.device, dtype=self.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.tensor([s.guidance for s in states], device=self.device,
                                    dtype=torch.float32)
        return self.transformer(hidden_states=latents.to(self.dtype), timestep=timesteps / 1000,
                                guidance=guidance, pooled_projections=embeds["pooled_projections"],
                                encoder_hidden_states=txt, txt_ids=txt_ids, img_ids=img_ids,
                                return_dict=False)[0].float()

    def _decode(self, latents, state) -> np.ndarray:
        vae = self.pipe.vae
        lat = self.pipe._unpack_latents(latents, state.height, state.width,
                                        self.pipe.vae_scale_factor)
        lat = lat.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(lat, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="np")[0]


class WanAdapter(DiffusionAdapter):
    """WanPipeline: WanTransformer3DModel + UniPC (flow prediction) + AutoencoderKLWan."""

    kind = Kind.VIDEO

    def __init__(self, pipe, name: str, device="cpu", max_sequence_length: int = 512):
        super().__init__(pipe, name, device, max_sequence_length)
        patch = pipe.transformer.config.patch_size[-1]
        self.spatial_multiple = pipe.vae_scale_factor_spatial * patch
        self.temporal_factor = pipe.vae_scale_factor_temporal

    def _encode(self, r: GenSpec):
        cfg = uses_cfg(self.name, r.guidance)
        pe, npe = self.pipe.encode_prompt(
            prompt=r.prompt, negative_prompt=r.negative_prompt, do_classifier_free_guidance=cfg,
            max_sequence_length=self.max_sequence_length, device=self.device)
        return {"encoder_hidden_states": pe}, ({"encoder_hidden_states": npe} if cfg else None)

    def _init_latents(self, r: GenSpec, gen: torch.Generator) -> torch.Tensor:
        return self.pipe.prepare_latents(1, self.transformer.config.in_channels, r.height,
                                         r.width, r.frames, torch.float32, self.device, gen)

    def _set_timesteps(self, sched, r: GenSpec) -> None:
        sched.set_timesteps(r.steps, device=self.device)
        sched.set_begin_index(0)

    def _forward(self, latents, timesteps, embeds, states):
        return self.transformer(hidden_states=latents.to(self.dtype), timestep=timesteps,
                                encoder_hidden_states=embeds["encoder_hidden_states"],
                                return_dict=False)[0].float()

    def _decode(self, latents, state) -> np.ndarray:
        vae = self.pipe.vae
        lat = latents.to(vae.dtype)
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(lat)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(lat)
        video = vae.decode(lat / inv_std + mean, return_dict=False)[0]
        return self.pipe.video_processor.postprocess_video(video, output_type="np")[0]
