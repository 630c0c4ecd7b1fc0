"""Served models: latent geometry, step counts, CFG, allowed sequence-parallel degrees.

Geometry follows the diffusers implementations: an 8x spatial VAE, 2x2 patches, and for Wan a 4x
temporal VAE (frames = 4k+1).  Tokens are the transformer's image/video sequence length; text tokens
are not sharded by Ulysses and are left out, as in the profile files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .kinds import Kind


class ShapeError(ValueError):
    """A request shape the model cannot serve; the message names the field."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: Kind
    steps: int
    cfg: bool
    heads: int
    hidden: int
    layers: int
    # (width, height, frames) shapes served by default (used by the workload's default mixes).
    sizes: tuple[tuple[int, int, int], ...]
    # Default SP degree by size: first (max_tokens, degree) whose bound covers the request.
    default_sp_rule: tuple[tuple[float, int], ...] = ((math.inf, 1),)
    sp_degrees: tuple[int, ...] = (1, 2, 4, 8)
    vae_spatial: int = 8
    vae_temporal: int = 1
    patch: int = 2
    latent_channels: int = 16
    text_tokens: int = 512
    text_dim: int = 4096
    min_side: int = 128
    max_side: int = 2048
    max_frames: int = 1
    # Tiny random-weight presets (tests, CPU): in the catalog so traces and profiles can name them,
    # left out of the default workload mixes.
    tiny: bool = False
    # Mixture of denoising experts (Wan2.2 A14B): the high-noise transformer runs the steps whose
    # timestep is >= boundary_ratio x 1000, the low-noise one the rest.  0: one transformer.
    boundary_ratio: float = 0.0
    # Takes an input image (image-to-video: the first frame), required or optional.
    image_input: str = "none"  # "none" | "required" | "optional"
    # No profile rows of its own: step times derived from this measured model of the same kind,
    # scaled by per-token transformer FLOPs (`latency.py`); an estimate until measured.
    estimate_from: str = ""

    def latent_frames(self, frames: int) -> int:
        return 1 if self.kind is Kind.IMAGE else (frames - 1) // self.vae_temporal + 1

    def tokens(self, height: int, width: int, frames: int = 1) -> int:
        g = self.vae_spatial * self.patch
        return (height // g) * (width // g) * self.latent_frames(frames)

    @property
    def cfg_factor(self) -> int:
        return 2 if self.cfg else 1

    def validate_shape(self, height: int, width: int, frames: int = 1, steps: int | None = None) -> None:
        g = self.vae_spatial * self.patch
        for field_name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v < self.min_side or v > self.max_side or v % g:
                raise ShapeError(f"{field_name}={v!r}: {self.name} needs a multiple of {g} "
                                 f"in [{self.min_side}, {self.max_side}]")
        if self.kind is Kind.IMAGE:
            if frames != 1:
                raise ShapeError(f"frames={frames!r}: {self.name} makes images (frames must be 1)")
        elif (not isinstance(frames, int) or frames < 1 or frames > self.max_frames
              or (frames - 1) % self.vae_temporal):
            raise ShapeError(f"frames={frames!r}: {self.name} needs {self.vae_temporal}k+1 frames "
                             f"in [1, {self.max_frames}]")
        if steps is not None and (not isinstance(steps, int) or steps < 1 or steps > 1000):
            raise ShapeError(f"steps={steps!r}: must be an integer in [1, 1000]")

    def default_sp(self, height: int, width: int, frames: int, max_gpus: int) -> int:
        t = self.tokens(height, width, frames)
        k = next(deg for bound, deg in self.default_sp_rule if t <= bound)
        return max(d for d in self.sp_degrees if d <= max(1, min(k, max_gpus)))

    def state_bytes(self, height: int, width: int, frames: int) -> int:
        """Bytes of one request's step state: fp32 latents plus bf16 prompt embeddings."""
        lat = (self.latent_channels * self.latent_frames(frames)
               * (height // self.vae_spatial) * (width // self.vae_spatial) * 4)
        return lat + self.cfg_factor * self.text_tokens * self.text_dim * 2


_WAN_480P_33 = (832, 480, 33)
_WAN_480P_81 = (832, 480, 81)
_WAN_720P_81 = (1280, 720, 81)

MODELS: dict[str, ModelSpec] = {m.name: m for m in (
    ModelSpec("sd3-medium", Kind.IMAGE, steps=28, cfg=True, heads=24, hidden=1536, layers=24,
              sizes=((512, 512, 1), (768, 768, 1), (1024, 1024, 1)), text_tokens=333),
    ModelSpec("flux-dev", Kind.IMAGE, steps=28, cfg=False, heads=24, hidden=3072, layers=57,
              sizes=((1024, 1024, 1),)),
    # 12 heads: Ulysses degrees must divide the head count, so no 8.
    ModelSpec("wan2.1-1.3b", Kind.VIDEO, steps=50, cfg=True, heads=12, hidden=1536, layers=30,
              sizes=(_WAN_480P_33, _WAN_480P_81), default_sp_rule=((14040, 1), (math.inf, 2)),
              sp_degrees=(1, 2, 4), vae_temporal=4, max_frames=161, max_side=1280),
    ModelSpec("wan2.1-14b", Kind.VIDEO, steps=50, cfg=True, heads=40, hidden=5120, layers=40,
              sizes=(_WAN_480P_81, _WAN_720P_81), default_sp_rule=((32760, 4), (math.inf, 8)),
              vae_temporal=4, max_frames=161, max_side=1280),
    # Estimated step times until measured (`estimate_from`, see latency.py).  Qwen-Image: a 20B
    # MMDiT of 60 double-stream blocks, Qwen2.5-VL text (3584 wide), true CFG.
    ModelSpec("qwen-image", Kind.IMAGE, steps=50, cfg=True, heads=24, hidden=3072, layers=60,
              sizes=((1024, 1024, 1), (1328, 1328, 1)), text_tokens=256, text_dim=3584,
              estimate_from="flux-dev"),
    # Wan2.2 A14B: two 14B experts of Wan2.1-14B's architecture, switched at boundary_ratio.
    ModelSpec("wan2.2-a14b", Kind.VIDEO, steps=40, cfg=True, heads=40, hidden=5120, layers=40,
              sizes=(_WAN_480P_81, _WAN_720P_81), default_sp_rule=((32760, 4), (math.inf, 8)),
              vae_temporal=4, max_frames=161, max_side=1280, boundary_ratio=0.875,
              estimate_from="wan2.1-14b"),
    # Wan2.2 TI2V-5B: its own VAE (16x spatial, 48 channels), 720p at 24 fps.  Served as
    # text-to-video: its image mode is not (an image sent would be ignored, so it is refused).
    ModelSpec("wan2.2-ti2v-5b", Kind.VIDEO, steps=50, cfg=True, heads=24, hidden=3072,
              layers=30, sizes=((1280, 704, 121),), default_sp_rule=((math.inf, 2),),
              vae_spatial=16, latent_channels=48, vae_temporal=4, max_frames=241,
              max_side=1280, estimate_from="wan2.1-14b"),
    # Wan2.1 I2V 14B (480p): the first frame from an image (CLIP image tokens and its latents).
    ModelSpec("wan2.1-i2v-14b", Kind.VIDEO, steps=40, cfg=True, heads=40, hidden=5120,
              layers=40, sizes=(_WAN_480P_81,), default_sp_rule=((math.inf, 4),),
              vae_temporal=4, max_frames=161, max_side=1280, image_input="required",
              estimate_from="wan2.1-14b"),
    # The tiny presets of genserve.models.presets (same geometry; steps as `generate` uses them).
    ModelSpec("tiny-t2i", Kind.IMAGE, steps=8, cfg=True, heads=4, hidden=32, layers=2,
              sizes=((64, 64, 1),), vae_spatial=2, latent_channels=4, text_tokens=109,
              # The tiny SD3 transformer's position embedding covers 96 patches: 384 px.
              text_dim=32, min_side=16, max_side=384, tiny=True),
    ModelSpec("tiny-flux", Kind.IMAGE, steps=8, cfg=False, heads=2, hidden=32, layers=2,
              sizes=((64, 64, 1),), vae_spatial=2, latent_channels=4, text_tokens=32,
              text_dim=32, min_side=16, max_side=512, tiny=True),
    ModelSpec("tiny-t2v", Kind.VIDEO, steps=8, cfg=True, heads=2, hidden=24, layers=2,
              sizes=((32, 32, 9),), sp_degrees=(1, 2), vae_temporal=4, text_tokens=32,
              text_dim=32, min_side=16, max_side=512, max_frames=33, tiny=True),
    # Wan2.1 I2V's twin (genserve.models.i2v): tiny-t2v's geometry, an image in; its text is
    # padded to 512 tokens (the I2V attention finds the image tokens by that length).
    ModelSpec("tiny-i2v", Kind.VIDEO, steps=8, cfg=True, heads=2, hidden=24, layers=2,
              sizes=((32, 32, 9),), sp_degrees=(1, 2), vae_temporal=4, text_tokens=512,
              text_dim=32, min_side=16, max_side=512, max_frames=33, tiny=True,
              image_input="required"),
    # Qwen-Image's twin (genserve.models.qwen): its 8x VAE, 16 channels and 2x2 patches; text
    # tokens are the prompt's bytes plus the template's tail (13).
    ModelSpec("tiny-qwen", Kind.IMAGE, steps=8, cfg=True, heads=4, hidden=32, layers=2,
              sizes=((64, 64, 1),), text_tokens=32, text_dim=32, min_side=16, max_side=512,
              tiny=True),
    # Wan2.2 twins (genserve.models.wan22): tiny-t2v's geometry with two experts; and TI2V's
    # 16x VAE with 48 channels (32 px per token side).
    ModelSpec("tiny-wan22", Kind.VIDEO, steps=8, cfg=True, heads=2, hidden=24, layers=2,
              sizes=((32, 32, 9),), sp_degrees=(1, 2), vae_temporal=4, text_tokens=32,
              text_dim=32, min_side=16, max_side=512, max_frames=33, tiny=True,
              boundary_ratio=0.875),
    ModelSpec("tiny-ti2v", Kind.VIDEO, steps=8, cfg=True, heads=2, hidden=24, layers=2,
              sizes=((64, 64, 9),), sp_degrees=(1, 2), vae_spatial=16, latent_channels=48,
              vae_temporal=4, text_tokens=32, text_dim=32, min_side=32, max_side=512,
              max_frames=33, tiny=True),
)}


# The evaluation protocol's models (DESIGN.md): the default workload mix.  Others join a workload
# through `--mix`.
CANONICAL_MODELS = ("sd3-medium", "flux-dev", "wan2.1-1.3b", "wan2.1-14b")


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ShapeError(f"model={name!r}: unknown; served models are {', '.join(MODELS)}") from None


def uses_cfg(model: str, guidance: float) -> bool:
    """Whether a step of `model` at `guidance` also runs the unconditional branch
    (classifier-free guidance): only for a model trained with it, and only above 1.  FLUX-dev is
    guidance-distilled, so never.  The adapters encode with this and the batch key splits on it."""
    spec = MODELS.get(model)
    return guidance > 1.0 and (spec is None or spec.cfg)


def batch_key(model: str, height: int, width: int, frames: int, guidance: float) -> tuple:
    """Requests (and step states) with equal keys can share one batched forward: the policy
    batches on it (`Request.shape`), the adapters group states on it (`StepState.shape_key`)."""
    return (model, height, width, frames, uses_cfg(model, guidance))


# Shape and steps a request gets when it names none: (height, width, frames, steps) per preset
# (`genserve generate`, the HTTP API).
GENERATE_DEFAULTS = {"tiny-t2i": (64, 64, 1, 8), "tiny-flux": (64, 64, 1, 8),
                     "tiny-t2v": (32, 32, 9, 8), "tiny-i2v": (32, 32, 9, 8),
                     "tiny-wan22": (32, 32, 9, 8), "tiny-ti2v": (64, 64, 9, 8),
                     "tiny-qwen": (64, 64, 1, 8),
                     "sd3-medium": (1024, 1024, 1, 28), "flux-dev": (1024, 1024, 1, 28),
                     "wan2.1-1.3b": (480, 832, 81, 50), "wan2.1-14b": (480, 832, 81, 50),
                     "qwen-image": (1328, 1328, 1, 50), "wan2.2-a14b": (480, 832, 81, 40),
                     "wan2.2-ti2v-5b": (704, 1280, 121, 50), "wan2.1-i2v-14b": (480, 832, 81, 40)}
