"""Step-level execution of diffusers pipelines: encode / prepare / step / decode.

A diffusion request is a loop of identical denoising steps.  The adapter splits a diffusers pipeline
into phases so that every step boundary is a place where a request can stop, be serialised, move to
another process or device, be batched with other requests (at any step positions), and go on with
no change to its output.

Everything a request needs to resume lives in its `StepState`: latents, its own scheduler (diffusers
schedulers are stateful, and multistep ones such as UniPC keep a history: we snapshot the whole
`__dict__`, never share one scheduler between requests), prompt embeddings, guidance, and the
generator state.  Classifier-free guidance is batch doubling: [uncond..., cond...]; or, with a
`CfgBranch` (CFG parallelism), this process runs one branch's half of that batch and swaps its
noise prediction with the process that runs the other one.
"""

from __future__ import annotations

import copy
import io
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..catalog import batch_key
from ..kinds import Kind
from ..spec import GenRequest, GenSpec


class ModelInputError(ValueError):
    """A request the model cannot run; `field` names the offending input."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class ModelLoadError(RuntimeError):
    """A preset or checkpoint that cannot be loaded (unknown name, missing or unreadable path)."""


@dataclass
class StepState:
    """Everything needed to resume one request at step `step_index` on any device."""

    request_id: str
    model: str
    height: int
    width: int
    frames: int
    steps: int
    guidance: float
    step_index: int
    latents: torch.Tensor
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None
    scheduler_state: dict[str, Any]
    generator_state: torch.Tensor
    # The live scheduler; rebuilt from `scheduler_state` after a move.  Never serialised.
    scheduler: Any = field(default=None, repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self.step_index >= self.steps

    @property
    def cfg(self) -> bool:
        return self.uncond is not None

    @property
    def shape_key(self) -> tuple:
        """States with equal keys can share one batched step."""
        return batch_key(self.model, self.height, self.width, self.frames, self.guidance)

    def to_bytes(self) -> bytes:
        """Serialise (tensors on CPU); loadable with torch.load(weights_only=True)."""
        payload = {k: getattr(self, k) for k in (
            "request_id", "model", "height", "width", "frames", "steps", "guidance", "step_index")}
        payload.update(latents=self.latents.cpu(), cond=_cpu(self.cond), uncond=_cpu(self.uncond),
                       scheduler_state=_cpu(self.snapshot_scheduler()),
                       generator_state=self.generator_state.cpu())
        buf = io.BytesIO()
        torch.save(payload, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "StepState":
        payload = torch.load(io.BytesIO(data), weights_only=True)
        return cls(**payload)

    def snapshot_scheduler(self) -> dict[str, Any]:
        if self.scheduler is not None:
            self.scheduler_state = {k: v for k, v in self.scheduler.__dict__.items()
                                    if k != "_internal_dict"}
        return self.scheduler_state

    def to(self, device: torch.device | str) -> "StepState":
        """Move the state's tensors (the scheduler is rebuilt on the next step)."""
        self.snapshot_scheduler()
        self.latents = self.latents.to(device)
        self.cond = _to(self.cond, device)
        self.uncond = _to(self.uncond, device)
        self.scheduler_state = _to(self.scheduler_state, device)
        self.scheduler = None
        return self


@dataclass(frozen=True)
class CfgBranch:
    """This process's part of a CFG-parallel step: it runs only the conditional (`cond`) or only
    the unconditional branch, and `exchange` hands its noise prediction (full, already gathered
    over its Ulysses group) to the process that runs the other branch and returns that one's.
    Both then apply the same guidance and scheduler step, so their states stay identical."""

    cond: bool
    exchange: Callable[[torch.Tensor], torch.Tensor]

    @property
    def name(self) -> str:
        return "cond" if self.cond else "uncond"


def _to(obj: Any, device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _cpu(obj: Any) -> Any:
    return _to(obj, "cpu")


class DiffusionAdapter(ABC):
    """One diffusers pipeline split into phases.  Subclasses fill in the family specifics."""

    kind: Kind
    # Latent geometry: spatial divisor of height/width (VAE x patch) and temporal VAE factor.
    spatial_multiple: int = 16
    temporal_factor: int = 1

    def __init__(self, pipe, name: str, device: str | torch.device = "cpu",
                 max_sequence_length: int = 256):
        # Random-weight models built from config start in training mode: dropout would make
        # every run differ.
        for comp in pipe.components.values():
            if isinstance(comp, torch.nn.Module):
                comp.eval()
        self.pipe = pipe
        self.name = name
        self.device = torch.device(device)
        self.max_sequence_length = max_sequence_length
        self.transformer = pipe.transformer
        self.dtype = self.transformer.dtype
        self._scheduler_template = copy.deepcopy(pipe.scheduler)
        self._emb_cache: tuple | None = None

    # ----- validation -----
    def validate(self, spec: GenSpec) -> None:
        """`spec.model` is not checked: one spec runs on any adapter of its architecture (a
        checkpoint or its tiny twin); the state's model is the adapter's name."""
        m = self.spatial_multiple
        for name, v in (("height", spec.height), ("width", spec.width)):
            if not isinstance(v, int) or isinstance(v, bool) or v < m or v % m:
                raise ModelInputError(name, f"{v!r} must be a positive multiple of {m} for "
                                            f"{self.name}")
        if self.kind is Kind.IMAGE:
            if spec.frames != 1:
                raise ModelInputError("frames", f"{spec.frames!r}: {self.name} makes images "
                                                "(frames must be 1)")
        elif (not isinstance(spec.frames, int) or spec.frames < 1
              or (spec.frames - 1) % self.temporal_factor):
            raise ModelInputError("frames", f"{spec.frames!r} must be of the form "
                                            f"{self.temporal_factor}k+1 for {self.name}")
        if not isinstance(spec.steps, int) or isinstance(spec.steps, bool) or spec.steps < 1:
            raise ModelInputError("steps", f"{spec.steps!r} must be an integer >= 1")
        if not isinstance(spec.guidance, (int, float)) or not np.isfinite(spec.guidance) or (
                spec.guidance < 0):
            raise ModelInputError("guidance", f"{spec.guidance!r} must be a finite number >= 0")
        if not isinstance(spec.prompt, str):
            raise ModelInputError("prompt", "must be a string")

    # ----- phases -----
    @torch.no_grad()
    def encode(self, reqs: list[GenRequest]) -> list[tuple[dict, dict | None]]:
        """Text encoders, once per request: (cond, uncond-or-None) embeddings."""
        for r in reqs:
            self.validate(r.spec)
        return [self._encode(r.spec) for r in reqs]

    @torch.no_grad()
    def prepare(self, reqs: list[GenRequest],
                encoded: list[tuple[dict, dict | None]] | None = None) -> list[StepState]:
        """Initial latents from each request's seed and its own timestep schedule."""
        encoded = encoded if encoded is not None else self.encode(reqs)
        states = []
        for r, (cond, uncond) in zip(reqs, encoded):
            s = r.spec
            gen = torch.Generator("cpu").manual_seed(int(s.seed))
            latents = self._init_latents(s, gen)
            sched = copy.deepcopy(self._scheduler_template)
            self._set_timesteps(sched, s)
            states.append(StepState(
                request_id=r.id, model=self.name, height=s.height, width=s.width, frames=s.frames,
                steps=s.steps, guidance=float(s.guidance), step_index=0, latents=latents,
                cond=cond, uncond=uncond, scheduler_state={}, generator_state=gen.get_state(),
                scheduler=sched))
        return states

    @torch.no_grad()
    def step(self, states: list[StepState], cfg: CfgBranch | None = None) -> None:
        """Advance every state by one denoising step; compatible states share one forward.

        States may be at different step positions: each brings its own timestep, and each
        request's scheduler update runs on its own slice of the batched output.  `cfg`: run one
        branch of classifier-free guidance here and swap predictions with the other branch's
        process (every state must use CFG: checked before any forward, so that a refusal never
        leaves the peer waiting in an exchange).
        """
        groups: dict[tuple, list[StepState]] = {}
        for s in states:
            if s.model != self.name:
                raise ModelInputError("model", f"state of {s.model} given to {self.name}")
            if s.done:
                raise ModelInputError("step_index", f"request {s.request_id} has no step left")
            if cfg is not None and not s.cfg:
                raise ModelInputError("cfg_split", f"request {s.request_id} has no "
                                      f"classifier-free guidance to split ({self.name} at "
                                      f"guidance {s.guidance:g}: guidance <= 1, or a "
                                      "guidance-distilled model such as FLUX)")
            groups.setdefault(s.shape_key, []).append(s)
        for group in groups.values():
            self._step_group(group, cfg)

    def _embeds(self, group: list[StepState], branch: str | None = None
                ) -> dict[str, torch.Tensor]:
        """Batched prompt embeddings ([uncond..., cond...] under CFG; one branch's alone with
        `branch` "uncond" / "cond"), reused while the batch composition and branch stay the same
        (they do not change between steps)."""
        key = (branch, tuple(id(s.cond) for s in group))
        if self._emb_cache is not None and self._emb_cache[0] == key:
            return self._emb_cache[1]
        if branch == "uncond":
            parts = [s.uncond for s in group]
        else:
            parts = [s.cond for s in group]
            if branch is None and group[0].cfg:
                parts = [s.uncond for s in group] + parts
        emb = self._join_embeds(parts)
        self._emb_cache = (key, emb, group)  # holding `group` keeps the ids in the key alive
        return emb

    def _join_embeds(self, parts: list[dict]) -> dict[str, torch.Tensor]:
        """One batch of the requests' embeddings, in order (a family whose prompts differ in
        length pads them here)."""
        return {k: torch.cat([p[k] for p in parts]).to(self.device) for k in parts[0]}

    def _step_group(self, group: list[StepState], cfg: CfgBranch | None = None) -> None:
        scheds = [self._live_scheduler(s) for s in group]
        lat = (group[0].latents if len(group) == 1
               else torch.cat([s.latents for s in group])).to(self.device)
        ts = torch.stack([sch.timesteps[s.step_index] for sch, s in zip(scheds, group)])
        ts = ts.to(self.device)
        if group[0].cfg:
            if cfg is None:
                emb = self._embeds(group)
                out = self._forward(torch.cat([lat, lat]), torch.cat([ts, ts]), emb,
                                    group + group)
                out_u, out_c = out.chunk(2)
            else:
                out_u, out_c = self._branch_forward(lat, ts, group, cfg)
            if len({s.guidance for s in group}) == 1:
                noise = out_u + group[0].guidance * (out_c - out_u)
            else:
                shape = (len(group),) + (1,) * (out_u.dim() - 1)
                g = torch.tensor([s.guidance for s in group], dtype=out_u.dtype,
                                 device=out_u.device).view(shape)
                noise = out_u + g * (out_c - out_u)
        else:
            noise = self._forward(lat, ts, self._embeds(group), group)
        for i, (s, sch) in enumerate(zip(group, scheds)):
            s.latents = sch.step(noise[i:i + 1], ts[i], s.latents, return_dict=False)[0]
            s.step_index += 1

    def _branch_forward(self, lat: torch.Tensor, ts: torch.Tensor, group: list[StepState],
                        cfg: CfgBranch) -> tuple[torch.Tensor, torch.Tensor]:
        """(unconditional, conditional) predictions: this branch's forward, the other's from the
        peer.  Both processes end with the same two tensors, so the same guidance result."""
        mine = self._forward(lat, ts, self._embeds(group, cfg.name), group)
        theirs = cfg.exchange(mine)
        return (theirs, mine) if cfg.cond else (mine, theirs)

    def _live_scheduler(self, s: StepState):
        if s.scheduler is None:
            sch = type(self._scheduler_template).from_config(self._scheduler_template.config)
            sch.__dict__.update(copy.deepcopy(s.scheduler_state))
            s.scheduler = sch
        return s.scheduler

    @torch.no_grad()
    def decode(self, states: list[StepState]) -> list[np.ndarray]:
        """VAE decode: uint8 arrays, (H, W, 3) for images and (F, H, W, 3) for videos."""
        outs = []
        for s in states:
            if not s.done:
                raise ModelInputError("step_index", f"request {s.request_id} is at step "
                                                    f"{s.step_index}/{s.steps}")
            arr = self._decode(s.latents.to(self.device), s)
            outs.append((np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8))
        return outs

    def generate(self, req: GenRequest, progress=None) -> np.ndarray:
        """Run one request start to finish (the CLI path); `progress(i, n)` after each step."""
        (state,) = self.prepare([req])
        while not state.done:
            self.step([state])
            if progress is not None:
                progress(state.step_index, state.steps)
        return self.decode([state])[0]

    # ----- family hooks -----
    @abstractmethod
    def _encode(self, r: GenSpec) -> tuple[dict, dict | None]: ...

    @abstractmethod
    def _init_latents(self, r: GenSpec, gen: torch.Generator) -> torch.Tensor: ...

    @abstractmethod
    def _set_timesteps(self, sched, r: GenSpec) -> None: ...

    @abstractmethod
    def _forward(self, latents: torch.Tensor, timesteps: torch.Tensor,
                 embeds: dict[str, torch.Tensor], states: list[StepState]) -> torch.Tensor:
        """One transformer forward; `states[i]` is the request behind batch row i."""

    @abstractmethod
    def _decode(self, latents: torch.Tensor, state: StepState) -> np.ndarray:
        """Float array in [0, 1]: (H, W, 3) or (F, H, W, 3)."""
