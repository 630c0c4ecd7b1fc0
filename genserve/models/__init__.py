"""Models: diffusers pipelines split into encode / prepare / step / decode (needs torch)."""

from ..spec import GenRequest, GenSpec
from .base import DiffusionAdapter, ModelInputError, ModelLoadError, StepState
from .presets import PRESETS, load_preset

__all__ = ["DiffusionAdapter", "GenRequest", "GenSpec", "ModelInputError", "ModelLoadError",
           "StepState", "PRESETS", "load_preset"]
