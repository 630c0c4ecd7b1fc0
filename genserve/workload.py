"""Workloads: arrivals, model/size mixes, deadlines, and JSONL traces.

Deadline = arrival + SLO scale x the request's standalone latency on its model's default SP degree
(capped at the cluster), so SLO scale 1.0 means "as fast as it runs alone".  Everything is drawn
from one seeded numpy Generator: the same config gives the same trace, byte for byte.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .catalog import CANONICAL_MODELS, MODELS, get_model
from .latency import LatencyModel
from .request import Kind, Request
from .spec import GenSpec

ARRIVALS = ("poisson", "gamma")


@dataclass(frozen=True)
class MixItem:
    model: str
    width: int
    height: int
    frames: int
    weight: float

    @property
    def label(self) -> str:
        f = f"x{self.frames}" if get_model(self.model).kind is Kind.VIDEO else ""
        return f"{self.model}@{self.width}x{self.height}{f}"


_MIX_RE = re.compile(r"^([\w.\-]+)@(\d+)x(\d+)(?:x(\d+))?(?:=([0-9.eE+-]+))?$")


def parse_mix(text: str) -> list[MixItem]:
    """`MODEL@WxH[xFRAMES]=WEIGHT,...` (weight defaults to 1)."""
    items = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _MIX_RE.match(part)
        if not m:
            raise ValueError(f"--mix entry {part!r}: expected MODEL@WxH[xFRAMES]=WEIGHT")
        model, w, h, f, wt = m.groups()
        spec = get_model(model)
        frames = int(f) if f else (1 if spec.kind is Kind.IMAGE else 81)
        spec.validate_shape(int(h), int(w), frames)
        weight = float(wt) if wt else 1.0
        if not 0 < weight < math.inf:
            raise ValueError(f"--mix entry {part!r}: weight must be > 0 and finite")
        items.append(MixItem(model, int(w), int(h), frames, weight))
    if not items:
        raise ValueError("--mix is empty")
    return items


def default_mix(video_share: float, models: list[str] | None = None) -> list[MixItem]:
    """Each kind gets its share; inside a kind, models share equally, sizes equally per model."""
    names = models or list(CANONICAL_MODELS)
    items = []
    for kind, share in ((Kind.IMAGE, 1.0 - video_share), (Kind.VIDEO, video_share)):
        specs = [MODELS[n] for n in names if MODELS[n].kind is kind]
        if share <= 0 or not specs:
            continue
        for spec in specs:
            for (w, h, f) in spec.sizes:
                items.append(MixItem(spec.name, w, h, f, share / len(specs) / len(spec.sizes)))
    return items


@dataclass
class WorkloadConfig:
    rate: float = 0.1            # requests per second
    duration: float = 3600.0     # seconds of arrivals
    arrival: str = "gamma"
    cv: float = 2.0              # coefficient of variation of inter-arrival times (gamma)
    video_share: float = 0.2
    mix: str | None = None       # overrides video_share
    slo_scale: float = 2.0
    seed: int = 0

    def validate(self) -> None:
        problems = []
        if not self.rate > 0:
            problems.append(f"rate must be > 0 requests/s, got {self.rate}")
        if not self.duration > 0:
            problems.append(f"duration must be > 0 s, got {self.duration}")
        if self.arrival not in ARRIVALS:
            problems.append(f"arrival must be one of {ARRIVALS}, got {self.arrival!r}")
        if self.arrival == "gamma" and not self.cv > 0:
            problems.append(f"cv must be > 0 for gamma arrivals, got {self.cv}")
        if not 0.0 <= self.video_share <= 1.0:
            problems.append(f"video_share must be in [0, 1], got {self.video_share}")
        if not self.slo_scale > 0:
            problems.append(f"slo_scale must be > 0, got {self.slo_scale}")
        if problems:
            raise ValueError("; ".join(problems))

    def items(self) -> list[MixItem]:
        return parse_mix(self.mix) if self.mix else default_mix(self.video_share)


def arrival_times(cfg: WorkloadConfig, rng: np.random.Generator) -> np.ndarray:
    """Arrival times in [0, duration): Poisson, or Gamma renewal with mean 1/rate and CV `cv`."""
    n_guess = int(cfg.rate * cfg.duration * 1.5 + 50)
    out: list[np.ndarray] = []
    t0 = 0.0
    while True:
        if cfg.arrival == "poisson":
            gaps = rng.exponential(1.0 / cfg.rate, n_guess)
        else:
            shape = 1.0 / cfg.cv**2
            gaps = rng.gamma(shape, 1.0 / (cfg.rate * shape), n_guess)
        times = t0 + np.cumsum(gaps)
        out.append(times[times < cfg.duration])
        if times[-1] >= cfg.duration:
            return np.concatenate(out)
        t0 = float(times[-1])


def standalone_sp(model: str, height: int, width: int, frames: int, latency: LatencyModel,
                  num_gpus: int) -> int:
    k = get_model(model).default_sp(height, width, frames, num_gpus)
    return max(d for d in latency.degrees(model) if d <= k)


def generate(cfg: WorkloadConfig, latency: LatencyModel, num_gpus: int) -> list[Request]:
    cfg.validate()
    items = cfg.items()
    rng = np.random.default_rng(cfg.seed)
    times = arrival_times(cfg, rng)
    weights = np.array([it.weight for it in items], dtype=float)
    picks = rng.choice(len(items), size=len(times), p=weights / weights.sum())
    seeds = rng.integers(0, 2**31 - 1, size=len(times))
    reqs = []
    standalone_cache: dict[MixItem, float] = {}
    for i, (t, p, s) in enumerate(zip(times, picks, seeds)):
        it = items[p]
        spec = get_model(it.model)
        r = Request(f"r{i:06d}", spec.kind,
                    GenSpec(it.model, it.height, it.width, frames=it.frames, steps=spec.steps,
                            guidance=5.0 if spec.cfg else 3.5, seed=int(s),
                            prompt=f"{it.label} #{i}"), arrival=float(t))
        if it not in standalone_cache:
            k = standalone_sp(it.model, it.height, it.width, it.frames, latency, num_gpus)
            standalone_cache[it] = latency.standalone(r, k)
        r.standalone = standalone_cache[it]
        r.deadline = r.arrival + cfg.slo_scale * r.standalone
        reqs.append(r)
    return reqs


def save_trace(path: str | Path, requests: list[Request], meta: dict | None = None) -> None:
    with open(path, "w") as f:
        f.write(json.dumps({"meta": meta or {}}) + "\n")
        for r in requests:
            f.write(json.dumps(r.to_trace()) + "\n")


def load_trace(path: str | Path) -> tuple[list[Request], dict]:
    meta: dict = {}
    reqs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(d, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(d).__name__}")
            if "meta" in d and len(d) == 1:
                meta = d["meta"]
                continue
            try:
                r = Request.from_trace(d)
                spec = get_model(r.model)
                if spec.kind is not r.kind:
                    raise ValueError(f"kind={r.kind.value!r}: {r.model} makes {spec.kind.value}s")
                spec.validate_shape(r.height, r.width, r.frames, r.steps)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: {e}") from None
            reqs.append(r)
    if len({r.id for r in reqs}) != len(reqs):
        raise ValueError(f"{path}: request ids are not unique")
    return reqs, meta


def config_dict(cfg: WorkloadConfig) -> dict:
    return asdict(cfg)
