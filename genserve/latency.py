"""Latency model: seconds of one denoising step for (model, tokens, batch, SP degree).

Two measured files make one prediction (see DESIGN.md):
  step(T, B, k) = forward(T, B) * blocks(T, B, k) / blocks(T, B, 1) + alltoall(T, B, k)
`forward` is the real diffusers transformer forward at SP 1 (the level), `blocks` the per-rank block
compute for SP 1-8 (the scaling), and the all-to-all time is bytes x layers / link bandwidth.
B is the transformer batch: requests x 2 under classifier-free guidance.

Where the files have no point, we interpolate piecewise-linearly, in batch first, then in tokens.
Outside the measured range: more tokens extrapolate the last segment (attention grows
super-linearly, so a straight line is the conservative-but-not-absurd choice), fewer tokens clamp
(small shapes are launch-bound), more batch scales proportionally (compute-bound).  SP speed-ups and
the forward/blocks calibration clamp to the nearest measured point.

Text encoding, VAE decoding and the engine's cost per quantum are not in the shipped profiles:
they are configurable estimates (`CostEstimates`), documented in the README; a profile measured by
`genserve profile` carries them in its meta, and those measurements win.
"""

from __future__ import annotations

import bisect
import json
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .catalog import MODELS, ModelSpec, get_model
from .request import Kind, Request
from .spec import GenSpec

FORWARD_SUFFIX = "_diffusers_forward.json"
BLOCKS_SUFFIX = "_dit_blocks.json"


def _interp(xs: list[float], ys: list[float], x: float, below: str, above: str) -> float:
    """1-D piecewise-linear interpolation; `below`/`above` in clamp|prop|linear."""
    if x <= xs[0]:
        if x == xs[0] or below == "clamp":
            return ys[0]
        return ys[0] * x / xs[0]
    if x >= xs[-1]:
        if x == xs[-1] or above == "clamp":
            return ys[-1]
        if above == "linear" and len(xs) >= 2:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            return max(ys[-1] + slope * (x - xs[-1]), ys[-1])
        return ys[-1] * x / xs[-1]
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class Grid:
    """Values on a sparse (tokens, batch) grid: each measured token count has its own batch list."""

    def __init__(self, points: dict[tuple[int, int], float], *, tokens_above: str,
                 tokens_below: str, batch_above: str):
        if not points:
            raise ValueError("empty grid")
        by_t: dict[int, list[tuple[int, float]]] = {}
        for (t, b), v in points.items():
            by_t.setdefault(t, []).append((b, v))
        self.ts = sorted(by_t)
        self.rows = [sorted(by_t[t]) for t in self.ts]
        self.modes = (tokens_below, tokens_above, batch_above)

    def __call__(self, tokens: float, batch: float) -> float:
        tb, ta, ba = self.modes
        vals = [_interp([b for b, _ in row], [v for _, v in row], batch, "prop", ba)
                for row in self.rows]
        return _interp(self.ts, vals, tokens, tb, ta)


@dataclass
class CostEstimates:
    """Costs the profiles do not measure.  Estimates for an H100/H200-class GPU; override freely."""

    # Text encoders, seconds per request (CLIP+T5 for SD3/FLUX, umT5-XXL for Wan).
    encode_s: dict[str, float] = field(default_factory=lambda: {
        "sd3-medium": 0.020, "flux-dev": 0.015, "wan2.1-1.3b": 0.030, "wan2.1-14b": 0.030})
    default_encode_s: float = 0.020
    # VAE decode, seconds per million output pixels (frames x H x W).
    image_decode_s_per_mpix: float = 0.040
    video_decode_s_per_mpix: float = 0.060
    # Moving a paused request's state to another GPU set (or re-sharding it): a fixed set-up cost
    # plus bytes over the link.
    move_overhead_s: float = 0.005
    # The engine's fixed cost per quantum (job round trip driver <-> worker).  Not measured for the
    # shipped profile, so 0 there; `genserve profile --workers N` measures it on the setup used.
    dispatch_s: float = 0.0
    # And what each rank of a quantum beyond the first adds to it: on emulated GPUs, the first
    # rank's hand-off with each of the others (`emulate/calibrate.py` measures both); 0 for real
    # workers, whose ranks run in lockstep.
    dispatch_per_rank_s: float = 0.0
    # CFG parallelism: the two branches exchange their noise predictions every step, a collective
    # of two ranks (its latency; the bytes go over the link at its bandwidth).  An estimate.
    cfg_exchange_s: float = 30e-6

    def validate(self) -> None:
        bad = [k for k, v in self.encode_s.items() if v < 0]
        if bad or min(self.default_encode_s, self.image_decode_s_per_mpix,
                      self.video_decode_s_per_mpix, self.move_overhead_s, self.dispatch_s,
                      self.dispatch_per_rank_s, self.cfg_exchange_s) < 0:
            raise ValueError(f"cost estimates must be >= 0 (negative: {bad or 'a scalar field'})")


@dataclass
class Bandwidth:
    intra_node: float = 450e9  # bytes/s per GPU, NVLink all-to-all
    cross_node: float = 50e9   # bytes/s per GPU, InfiniBand/RoCE

    def validate(self) -> None:
        if self.intra_node <= 0 or self.cross_node <= 0:
            raise ValueError(f"bandwidths must be > 0, got intra={self.intra_node} "
                             f"cross={self.cross_node}")


class ModelProfile:
    """Interpolators for one model, built from the rows of the two profile files."""

    def __init__(self, spec: ModelSpec, fwd_rows: list[dict], blk_rows: list[dict]):
        self.spec = spec
        self.layers = blk_rows[0]["layers"]
        blocks: dict[int, dict[tuple[int, int], float]] = {}
        label_tokens: dict[str, int] = {}
        a2a_per_token: list[float] = []
        for r in blk_rows:
            blocks.setdefault(r["sp"], {})[(r["tokens"], r["batch"])] = r["step_ms"] / 1e3
            label_tokens[r["size"]] = r["tokens"]
            k, nbytes = r["sp"], r.get("alltoall_bytes_per_layer_per_rank", 0)
            if k > 1 and nbytes:
                a2a_per_token.append(nbytes / (r["tokens"] * r["batch"] * (k - 1) / k**2))
        if 1 not in blocks:
            raise ValueError(f"profile for {spec.name} has no SP-1 block rows")
        self.f1 = Grid(blocks[1], tokens_below="clamp", tokens_above="linear", batch_above="prop")
        self.speedup: dict[int, Grid] = {}
        for k, pts in blocks.items():
            if k == 1:
                continue
            ratio = {tb: blocks[1][tb] / v for tb, v in pts.items() if tb in blocks[1]}
            if ratio:
                self.speedup[k] = Grid(ratio, tokens_below="clamp", tokens_above="clamp",
                                       batch_above="clamp")
        calib = {}
        for r in fwd_rows:
            t = label_tokens.get(r["size"])
            if t is None:
                raise ValueError(f"forward row {spec.name}/{r['size']} has no block rows of that size")
            calib[(t, r["batch"])] = (r["forward_ms"] / 1e3) / self.f1(t, r["batch"])
        # No forward measurement: the blocks underestimate by 1.1-2x; 1.0 keeps it honest-if-optimistic.
        self.calib = (Grid(calib, tokens_below="clamp", tokens_above="clamp", batch_above="clamp")
                      if calib else (lambda t, b: 1.0))
        # Ulysses moves 4 activations (q, k, v, out) of hidden x bf16 per token; fit it from the file.
        self.a2a_bytes_per_token = (statistics.median(a2a_per_token) if a2a_per_token
                                    else 4 * spec.hidden * 2)
        self.degrees = tuple(sorted({1, *self.speedup}))

    def compute_s(self, tokens: int, batch: int, sp: int) -> float:
        base = self.f1(tokens, batch) * self.calib(tokens, batch)
        return base if sp == 1 else base / self.speedup[sp](tokens, batch)

    def alltoall_bytes(self, tokens: int, batch: int, sp: int) -> float:
        return self.a2a_bytes_per_token * tokens * batch * (sp - 1) / sp**2 * self.layers


def _estimated_rows(spec: ModelSpec, ref: ModelSpec, fwd_rows: list[dict], blk_rows: list[dict]
                    ) -> tuple[list[dict], list[dict]]:
    """Profile rows for `spec` from the measured rows of `ref`, a model of the same kind: the same
    shapes, times scaled by per-token transformer FLOPs (layers x hidden^2: projections and MLP,
    which dominate at these widths) and all-to-all bytes by the width.  An estimate: attention's
    share, text tokens and kernels of a different shape are not in it."""
    flops = (spec.layers * spec.hidden ** 2) / (ref.layers * ref.hidden ** 2)
    width = spec.hidden / ref.hidden
    blk = [{**r, "model": spec.name, "layers": spec.layers, "step_ms": r["step_ms"] * flops,
            "block_ms": r.get("block_ms", 0.0) * flops * ref.layers / spec.layers,
            "alltoall_bytes_per_layer_per_rank":
                r.get("alltoall_bytes_per_layer_per_rank", 0) * width,
            "estimated_from": ref.name} for r in blk_rows]
    fwd = [{**r, "model": spec.name, "forward_ms": r["forward_ms"] * flops,
            "estimated_from": ref.name} for r in fwd_rows]
    return fwd, blk


def _resolve_profile(profile: str | Path) -> tuple[Path | resources.abc.Traversable, str]:
    p = Path(profile)
    if p.is_dir():
        fw = sorted(p.glob("*" + FORWARD_SUFFIX))
        if not fw:
            raise ValueError(f"profile directory {p} has no *{FORWARD_SUFFIX}")
        return p, fw[0].name[: -len(FORWARD_SUFFIX)]
    pkg = resources.files("genserve") / "data" / "profiles"
    if (pkg / (str(profile) + FORWARD_SUFFIX)).is_file():
        return pkg, str(profile)
    raise ValueError(f"profile {profile!r}: not a directory holding *{FORWARD_SUFFIX} and "
                     f"*{BLOCKS_SUFFIX}, nor a shipped profile name (shipped: h200)")


class LatencyModel:
    """Predicts step, encode, decode and move costs.  Results are cached per distinct query."""

    def __init__(self, profile: str | Path = "h200", *, bandwidth: Bandwidth | None = None,
                 costs: CostEstimates | None = None):
        self.bandwidth = bandwidth or Bandwidth()
        self.costs = costs or CostEstimates()
        self.bandwidth.validate()
        self.costs.validate()
        root, stem = _resolve_profile(profile)
        fwd = json.loads((root / (stem + FORWARD_SUFFIX)).read_text())
        blk = json.loads((root / (stem + BLOCKS_SUFFIX)).read_text())
        self.meta = {"forward": fwd.get("meta", {}), "blocks": blk.get("meta", {}),
                     "profile": str(profile)}
        # Measured by `genserve profile` (absent from the shipped H200 files): preferred to the
        # estimates.  decode keys are "model@WxHxF".
        self._encode_measured = {k: v / 1e3 for k, v in
                                 self.meta["forward"].get("encode_ms", {}).items()}
        self._decode_measured = {k: v / 1e3 for k, v in
                                 self.meta["forward"].get("decode_ms", {}).items()}
        ms = self.meta["forward"].get("dispatch_ms")
        self._dispatch = self.costs.dispatch_s if ms is None else ms / 1e3
        self.models: dict[str, ModelProfile] = {}
        # Models whose step times are derived from another's measured rows: model -> that model.
        self.estimated: dict[str, str] = {}
        rows = {name: ([r for r in fwd["rows"] if r["model"] == name],
                       [r for r in blk["rows"] if r["model"] == name]) for name in MODELS}
        for name, spec in MODELS.items():
            frows, brows = rows[name]
            if not brows and spec.estimate_from and rows[spec.estimate_from][1]:
                frows, brows = _estimated_rows(spec, MODELS[spec.estimate_from],
                                               *rows[spec.estimate_from])
                self.estimated[name] = spec.estimate_from
            if brows:
                self.models[name] = ModelProfile(spec, frows, brows)
        self._cache: dict[tuple, float] = {}
        self._degrees: dict[str, tuple[int, ...]] = {}

    def profile_of(self, model: str) -> ModelProfile:
        try:
            return self.models[model]
        except KeyError:
            raise ValueError(f"model {model!r} has no rows in profile {self.meta['profile']!r} "
                             f"(profiled: {', '.join(self.models)})") from None

    def degrees(self, model: str) -> tuple[int, ...]:
        """SP degrees both allowed by the model's heads and measured in the profile."""
        hit = self._degrees.get(model)
        if hit is None:
            prof = self.profile_of(model)
            hit = self._degrees[model] = tuple(k for k in prof.spec.sp_degrees if k in prof.degrees)
        return hit

    def step_time(self, model: str, tokens: int, n_requests: int = 1, sp: int = 1,
                  cross_node: bool = False, cfg_split: bool = False) -> float:
        """Seconds per denoising step of a batch on `sp` GPUs: Ulysses over all of them, or with
        `cfg_split` the two CFG branches side by side, each at half the batch with Ulysses over
        half the GPUs, plus the exchange of their noise predictions."""
        key = (model, tokens, n_requests, sp, cross_node, cfg_split)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        prof = self.profile_of(model)
        k = sp // 2 if cfg_split else sp
        if cfg_split and (not prof.spec.cfg or sp % 2):
            why = "has no CFG branch" if not prof.spec.cfg else "needs an even count"
            raise ValueError(f"cfg_split on {sp} GPUs: {model} {why}")
        if k not in prof.degrees or k not in prof.spec.sp_degrees:
            raise ValueError(f"sp={k}: {model} supports degrees {self.degrees(model)}")
        if n_requests < 1 or tokens < 1:
            raise ValueError(f"step_time needs n_requests >= 1 and tokens >= 1, got "
                             f"{n_requests}, {tokens}")
        batch = n_requests * (1 if cfg_split else prof.spec.cfg_factor)
        t = prof.compute_s(tokens, batch, k)
        bw = self.bandwidth.cross_node if cross_node else self.bandwidth.intra_node
        if k > 1:
            t += prof.alltoall_bytes(tokens, batch, k) / bw
        if cfg_split:
            # A bf16 noise prediction per request: latent channels x (patch area) per token.
            spec = prof.spec
            nbytes = n_requests * tokens * spec.patch ** 2 * spec.latent_channels * 2
            t += self.costs.cfg_exchange_s + nbytes / bw
        self._cache[key] = t
        return t

    def gpu_configs(self, model: str, cfg: bool, max_gpus: int) -> tuple[tuple[int, bool], ...]:
        """(GPUs, CFG split) a step of `model` can run on within `max_gpus`: every SP degree,
        and for a request under classifier-free guidance (`cfg`) every CFG split."""
        split = self.cfg_split_sizes(model) if cfg else ()
        return (tuple((k, False) for k in self.degrees(model) if k <= max_gpus)
                + tuple((k, True) for k in split if k <= max_gpus))

    def cfg_split_sizes(self, model: str) -> tuple[int, ...]:
        """GPU counts a CFG-split step of `model` can run on: twice its SP degrees (none for a
        model without CFG)."""
        return tuple(2 * k for k in self.degrees(model)) if self.profile_of(model).spec.cfg else ()

    def request_step_time(self, req: Request | GenSpec, n_requests: int = 1, sp: int = 1,
                          cross_node: bool = False, cfg_split: bool = False) -> float:
        spec = get_model(req.model)
        return self.step_time(req.model, spec.tokens(req.height, req.width, req.frames),
                              n_requests, sp, cross_node, cfg_split)

    def encode_time(self, model: str) -> float:
        hit = self._encode_measured.get(model)
        if hit is not None:
            return hit
        return self.costs.encode_s.get(model, self.costs.default_encode_s)

    def decode_time(self, model: str, height: int, width: int, frames: int = 1) -> float:
        hit = self._decode_measured.get(f"{model}@{width}x{height}x{frames}")
        if hit is not None:
            return hit
        spec = get_model(model)
        rate = (self.costs.image_decode_s_per_mpix if spec.kind is Kind.IMAGE
                else self.costs.video_decode_s_per_mpix)
        return rate * height * width * frames / 1e6

    def dispatch_time(self, gpus: int = 1) -> float:
        """The engine's cost of one quantum on `gpus` GPUs besides its work (measured by
        `genserve profile --workers`, or on emulated GPUs by `emulate.calibrate`)."""
        return self._dispatch + self.costs.dispatch_per_rank_s * (gpus - 1)

    def move_time(self, req: Request | GenSpec, cross_node: bool) -> float:
        """Cost of resuming `req` on a GPU set other than the one holding its state."""
        nbytes = get_model(req.model).state_bytes(req.height, req.width, req.frames)
        bw = self.bandwidth.cross_node if cross_node else self.bandwidth.intra_node
        return self.costs.move_overhead_s + nbytes / bw

    def standalone(self, req: Request, sp: int) -> float:
        """Seconds for `req` alone on `sp` GPUs of one node: encode, all steps, decode."""
        return (self.encode_time(req.model) + req.steps * self.request_step_time(req, 1, sp)
                + self.decode_time(req.model, req.height, req.width, req.frames))


def describe(lat: LatencyModel) -> str:
    """The step-time table a policy plans with, per model and served size: seconds per step of one
    request on each SP degree and as a CFG split, and where the numbers come from (measured, or
    estimated from another model's rows: `ModelSpec.estimate_from`)."""
    lines = [f"profile {lat.meta['profile']}: seconds per denoising step, one request "
             "(CFG split: the two guidance branches on two halves of the GPUs)"]
    for name, prof in lat.models.items():
        spec = prof.spec
        source = (f"ESTIMATED from {lat.estimated[name]} (x layers x hidden^2), not measured"
                  if name in lat.estimated else "measured")
        lines.append(f"\n{name} ({spec.kind.value}): {source}")
        degrees, split = lat.degrees(name), lat.cfg_split_sizes(name)
        head = [f"SP{k}" for k in degrees] + [f"CFG{k}" for k in split]
        lines.append(f"  {'size':<16s}" + "".join(f"  {c:>8s}" for c in head))
        for w, h, f in spec.sizes:
            t = spec.tokens(h, w, f)
            cells = [f"{lat.step_time(name, t, 1, k):8.3f}" for k in degrees]
            cells += [f"{lat.step_time(name, t, 1, k, False, True):8.3f}" for k in split]
            size = f"{w}x{h}" + (f"x{f}" if f > 1 else "")
            lines.append(f"  {size:<16s}" + "".join(f"  {c}" for c in cells))
    return "\n".join(lines)
