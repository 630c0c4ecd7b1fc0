"""Models: diffusers pipelines split into encode / prepare / step / decode (needs torch).

The names load on first use, so that `genserve.models.output` (PNG / MP4 files) imports without
torch: the driver and the emulated workers use it."""

from ..spec import GenRequest, GenSpec

__all__ = ["DiffusionAdapter", "GenRequest", "GenSpec", "ModelInputError", "ModelLoadError",
           "StepState", "PRESETS", "load_preset"]
_BASE = ("DiffusionAdapter", "ModelInputError", "ModelLoadError", "StepState")


def __getattr__(name: str):
    if name in _BASE:
        from . import base

        return getattr(base, name)
    if name in ("PRESETS", "load_preset"):
        from . import presets

        return getattr(presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
