"""Wan2.2 text-to-video on diffusers' `WanPipeline`: A14B (two denoising experts) and TI2V-5B.

A14B: two transformers of Wan2.1-14B's architecture.  The pipeline runs the high-noise expert
(`transformer`) on the steps whose timestep t >= boundary_ratio x num_train_timesteps and the
low-noise one (`transformer_2`) on the rest.  Here the rule is applied per batch row, on the
row's own timestep: a batch of requests at different step positions may straddle the boundary,
and then each expert runs its own rows (CFG's doubled rows included) and the outputs are put back
in batch order.  Every row sees exactly the model and timestep it would see alone, so a batch
equals its requests run alone up to the float differences of batching.

The pipeline's `guidance_scale_2` (the low-noise expert's guidance) is its `guidance_scale` by
default; a request carries one guidance, used by both experts.

TI2V-5B in text-to-video mode: one transformer, its own VAE (48 latent channels, 16x spatial) and
`expand_timesteps`: the timestep is given per patch token, (batch, tokens), as the pipeline builds
it, so the time embedding has a sequence dimension (sequence parallelism cuts it like the tokens).

One adapter covers both: the pipeline's config says which features are on (a checkpoint's
model_index.json sets `boundary_ratio` or `expand_timesteps`).
"""

from __future__ import annotations

import torch

from .base import ModelLoadError, StepState
from .families import WanAdapter


class Wan22Adapter(WanAdapter):
    """WanPipeline with Wan2.2's options: two experts (`boundary_ratio`) and per-token timesteps
    (`expand_timesteps`).  With neither it is Wan2.1's adapter."""

    def __init__(self, pipe, name: str, device="cpu", max_sequence_length: int = 512):
        super().__init__(pipe, name, device, max_sequence_length)
        self.transformer_2 = getattr(pipe, "transformer_2", None)
        ratio = pipe.config.get("boundary_ratio", None)
        if ratio is not None and self.transformer_2 is None:
            raise ModelLoadError(f"{name}: boundary_ratio {ratio} needs a low-noise expert "
                                 "(transformer_2), and the pipeline has none")
        # The pipeline ignores transformer_2 when no boundary is set; so do we.
        self.boundary: float | None = (
            None if ratio is None else ratio * pipe.scheduler.config.num_train_timesteps)
        self.expand_timesteps = bool(pipe.config.get("expand_timesteps", False))

    @property
    def transformers(self) -> tuple:
        """Every transformer a step may run (sequence parallelism is installed on each)."""
        if self.boundary is None:
            return (self.transformer,)
        return (self.transformer, self.transformer_2)

    def expert_of(self, state: StepState) -> int:
        """0: the high-noise expert runs the state's next step; 1: the low-noise one."""
        if self.boundary is None:
            return 0
        t = self._live_scheduler(state).timesteps[state.step_index]
        return 0 if t >= self.boundary else 1

    def switch_step(self, steps: int) -> int:
        """The first step index of a `steps`-step request run by the low-noise expert (`steps`
        if none): the step at which its weights change.  From the scheduler's own schedule."""
        if self.boundary is None:
            return steps
        sched = type(self._scheduler_template).from_config(self._scheduler_template.config)
        sched.set_timesteps(steps, device="cpu")
        return int((sched.timesteps >= self.boundary).sum())

    def _forward(self, latents, timesteps, embeds, states):
        text = embeds["encoder_hidden_states"]
        if self.boundary is None:
            return self._expert(self.transformer, latents, timesteps, text)
        high = timesteps >= self.boundary
        if bool(high.all()):
            return self._expert(self.transformer, latents, timesteps, text)
        if not bool(high.any()):
            return self._expert(self.transformer_2, latents, timesteps, text)
        out = torch.empty(latents.shape, dtype=torch.float32, device=latents.device)
        for rows, model in ((high, self.transformer), (~high, self.transformer_2)):
            out[rows] = self._expert(model, latents[rows], timesteps[rows], text[rows])
        return out

    def _expert(self, model, latents: torch.Tensor, timesteps: torch.Tensor,
                text: torch.Tensor) -> torch.Tensor:
        return model(hidden_states=latents.to(self.dtype),
                     timestep=self._timestep(latents, timesteps), encoder_hidden_states=text,
                     return_dict=False)[0].float()

    def _timestep(self, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(batch,), or with `expand_timesteps` (batch, tokens): the pipeline's per-token
        timestep, one value per 2x2 latent patch of every latent frame (float32, as it builds
        it from a float mask)."""
        if not self.expand_timesteps:
            return timesteps
        f, h, w = latents.shape[2:]
        tokens = f * ((h + 1) // 2) * ((w + 1) // 2)
        return timesteps.float()[:, None].expand(-1, tokens)


def _tiny_wan_transformer(in_channels: int):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=in_channels, out_channels=in_channels, text_dim=32, freq_dim=256, ffn_dim=32,
        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def _tiny_scheduler():
    from diffusers import UniPCMultistepScheduler

    # flow_shift 3: at 6 steps the boundary (t >= 875) falls after step 2, at 8 after step 3.
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=1000, flow_shift=3.0)


def _tiny_pipe(device, tok, te, vae, transformer, **kwargs):
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=tok, text_encoder=te, transformer=transformer, vae=vae,
                       scheduler=_tiny_scheduler(), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def tiny_wan22(device="cpu") -> Wan22Adapter:
    """Wan2.2-A14B-style: two tiny experts (Wan2.1 geometry, 2 blocks each) switched at
    boundary_ratio 0.875, a umT5 text encoder, the Wan2.1 VAE at its smallest width."""
    from .tiny import quiet, t5_config, t5_tokenizer

    quiet()
    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel

    tok = t5_tokenizer(32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        te = UMT5EncoderModel(t5_config(tok, "UMT5Config"))
        high, low = _tiny_wan_transformer(16), _tiny_wan_transformer(16)
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    pipe = _tiny_pipe(device, tok, te, vae, high, transformer_2=low, boundary_ratio=0.875)
    return Wan22Adapter(pipe, "tiny-wan22", device, max_sequence_length=32)


# The tiny Wan2.2 VAE's latent statistics: arbitrary but not trivial, so that decoding's
# de-normalisation is exercised per channel.
_TI2V_MEAN = [round(0.1 * (i % 7 - 3), 2) for i in range(48)]
_TI2V_STD = [round(1.0 + 0.25 * (i % 5), 2) for i in range(48)]


def tiny_ti2v(device="cpu") -> Wan22Adapter:
    """Wan2.2-TI2V-5B-style (text-to-video): one transformer on 48 latent channels with
    per-token timesteps, the Wan2.2 VAE (residual, 2x2 patchified: 16x spatial, 4x temporal)."""
    from .tiny import quiet, t5_config, t5_tokenizer

    quiet()
    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel

    tok = t5_tokenizer(32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        te = UMT5EncoderModel(t5_config(tok, "UMT5Config"))
        transformer = _tiny_wan_transformer(48)
        vae = AutoencoderKLWan(base_dim=4, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], is_residual=True,
                               in_channels=12, out_channels=12, patch_size=2,
                               scale_factor_spatial=16, latents_mean=_TI2V_MEAN,
                               latents_std=_TI2V_STD)
    pipe = _tiny_pipe(device, tok, te, vae, transformer, expand_timesteps=True)
    return Wan22Adapter(pipe, "tiny-ti2v", device, max_sequence_length=32)
