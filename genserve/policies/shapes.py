"""What genserve knows about a request shape on a cluster, computed once per shape: the GPU counts
a step may run on and the seconds a step takes on each, and which way to run a step on k GPUs.

A step runs on k GPUs either as Ulysses over all of them (k an SP degree) or, for a request under
classifier-free guidance, as a CFG split: the two guidance branches side by side, each on k/2 GPUs
(k twice an SP degree).  Each count is priced at the faster way, and counts no faster than a
smaller one are left out, so that the least count meeting a deadline is the least GPU time.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..latency import LatencyModel
from ..request import Kind, Request
from .base import Cluster
from .common import default_sp, tokens_of


@dataclass
class ShapeInfo:
    """Constants of one request shape on one cluster, computed once."""

    tokens: int
    # GPU counts a step may run on, each strictly faster than every smaller one: SP degrees and,
    # under classifier-free guidance, CFG splits (twice an SP degree), whichever is faster.
    degrees: tuple[int, ...]
    # Seconds per step alone, by GPU count.  The engine's fixed cost of a quantum
    # (`LatencyModel.dispatch_time`) is in it for a video, which runs a step per quantum (a plan
    # without it finishes videos just late), and in `decode` for an image (one quantum).
    step: dict[int, float]
    decode: float
    encode: float
    fixed: int                 # default SP degree (used when elastic SP is off)


def split_ok(r: Request, cfg_split: bool) -> bool:
    """Whether a step of `r` may run as a CFG split (allowed, and the request runs both
    branches: the batch key's CFG flag)."""
    return cfg_split and r.shape[-1]


def gpu_counts(r: Request, lat: LatencyModel, cluster: Cluster, cfg_split: bool) -> list[int]:
    """GPU counts a step of `r` can run on within the cluster, ascending."""
    return sorted({k for k, _ in lat.gpu_configs(r.model, split_ok(r, cfg_split),
                                                 cluster.num_gpus)})


def gpu_config(r: Request, lat: LatencyModel, tokens: int, n: int, k: int, cross: bool,
               cfg_split: bool) -> tuple[float, bool]:
    """The faster way to run a step of `n` requests like `r` on `k` GPUs: (seconds, CFG split).
    Ulysses where k is an SP degree, the CFG split where k is twice one."""
    options = []
    if k in lat.degrees(r.model):
        options.append((lat.step_time(r.model, tokens, n, k, cross), False))
    if split_ok(r, cfg_split) and k in lat.cfg_split_sizes(r.model):
        options.append((lat.step_time(r.model, tokens, n, k, cross, True), True))
    return min(options)


def faster_with_more(step: dict[int, float]) -> tuple[int, ...]:
    """The GPU counts worth using: each strictly faster than every smaller count (a CFG split on
    many GPUs may not be), ascending."""
    out: list[int] = []
    for k in sorted(step):
        if not out or step[k] < step[out[-1]]:
            out.append(k)
    return tuple(out)


def shape_info(r: Request, lat: LatencyModel, cluster: Cluster, cfg_split: bool) -> ShapeInfo:
    t = tokens_of(r)
    video = r.kind is Kind.VIDEO
    # A video's quantum is a step: its dispatch goes with each step, on its GPU count; an
    # image's once, with its decode (on one GPU: images rarely run on more).
    step = {k: gpu_config(r, lat, t, 1, k, False, cfg_split)[0] + video * lat.dispatch_time(k)
            for k in gpu_counts(r, lat, cluster, cfg_split)}
    return ShapeInfo(t, faster_with_more(step), step,
                     lat.decode_time(r.model, r.height, r.width, r.frames)
                     + (not video) * lat.dispatch_time(),
                     lat.encode_time(r.model), default_sp(r, lat, cluster))
