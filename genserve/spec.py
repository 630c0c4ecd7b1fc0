"""What to generate: one torch-free spec held by the HTTP job, the scheduler's request and the
model adapters.

`GenSpec` is the whole description of one output (model, size, frames, steps, guidance, seed,
prompts); nothing else repeats its fields.  `JobSpec` (the server's job) holds one with the job's
count and SLO, `Request` (the scheduler's unit) holds one with its id, arrival and deadline, and
an adapter encodes a `GenRequest`: a spec with the request id its states carry.  The batch key is
the spec's, so the policy plans a batch exactly when the adapters would run it as one forward
(classifier-free guidance on or off included).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .catalog import batch_key


@dataclass(frozen=True)
class GenSpec:
    """One output: `frames` is 1 for an image; `seed` fixes the initial noise."""

    model: str
    height: int
    width: int
    frames: int = 1
    steps: int = 28
    guidance: float = 5.0
    seed: int = 0
    prompt: str = ""
    negative_prompt: str = ""
    # Image-to-video: the input image as a base64 PNG of exactly width x height
    # (`genserve.input_image`); "" for none.  It travels with the spec wherever the spec goes
    # (job store, traces, the worker that encodes it).  Left out of repr: logs never carry it.
    image: str = field(default="", repr=False)

    @property
    def batch_key(self) -> tuple:
        """Specs with equal keys can share one batched forward (`catalog.batch_key`)."""
        return batch_key(self.model, self.height, self.width, self.frames, self.guidance)


@dataclass(frozen=True)
class GenRequest:
    """A spec to run, with the request id that its step states carry."""

    id: str
    spec: GenSpec
