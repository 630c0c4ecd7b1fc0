"""Models: diffusers pipelines split into encode / prepare / step / decode (needs torch)."""

from .base import DiffusionAdapter, GenRequest, ModelInputError, ModelLoadError, StepState
from .presets import PRESETS, load_preset

__all__ = ["DiffusionAdapter", "GenRequest", "ModelInputError", "ModelLoadError", "StepState",
           "PRESETS", "load_preset"]
