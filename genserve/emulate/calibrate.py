"""The engine's own cost per quantum on emulated workers, measured, for the policy to plan with.

Emulated jobs take exactly the profile's time; what the engine adds around each one (the
decision, the messages, a checkpoint through the driver, the workers' hand-offs) is this
machine's real work, and under a time scale S each wall millisecond of it is S trace
milliseconds.  A policy that plans with the profile alone (`LatencyModel.dispatch_time` is 0 in
the shipped one) plans videos, which run a step per quantum, to finish just before their
deadlines and then misses them by that overhead.  `dispatch_cost` runs a short probe through the
engine and fits the overrun per quantum, in trace seconds, as a fixed part and a part per rank
(`DispatchCost`): give it to the latency model (`.estimates()`) that the policy and the
simulator use, as `genserve profile --workers` does for real workers (`dispatch_ms`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..latency import CostEstimates
from ..policies import Plan, Policy
from ..policies.base import Assignment
from ..request import Kind, Request
from ..spec import GenSpec


def probe(models, latency, gpus: int, gpus_per_node: int, steps: int = 12
          ) -> tuple[list[Request], "_Placed"]:
    """A video of the first video model among `models` per SP degree it can use (1, 2, 4, ...
    as long as they fit side by side in `gpus` and each in a node), each stepped one step per
    quantum on a GPU set of its own, all at once, due far away; and the policy that places them.
    Without a video model: one image per GPU count 1 (images run one quantum each)."""
    from ..catalog import GENERATE_DEFAULTS, get_model

    videos = [m for m in models if get_model(m).kind is Kind.VIDEO]
    images = [m for m in models if get_model(m).kind is Kind.IMAGE]
    reqs, where, nxt = [], {}, 0
    if videos:
        model = videos[0]
        h, w, f, _ = GENERATE_DEFAULTS[model]
        for k in latency.degrees(model):
            if k > gpus_per_node or nxt + k > gpus:
                break
            rid = f"calibrate-sp{k}"
            spec = GenSpec(model, h, w, f, steps=steps, prompt="calibration")
            reqs.append(Request(rid, Kind.VIDEO, spec, arrival=0.0, deadline=1e9))
            where[rid], nxt = tuple(range(nxt, nxt + k)), nxt + k
    elif images:
        for i in range(min(gpus, 4)):
            rid = f"calibrate-image-{i}"
            spec = GenSpec(images[0], 512, 512, steps=8, seed=i, prompt="calibration")
            reqs.append(Request(rid, Kind.IMAGE, spec, arrival=0.0, deadline=1e9))
            where[rid] = (i,)
    return reqs, _Placed(where)


class _Placed(Policy):
    """Each probe request on its own GPU set, a step per quantum for a video, whole for an
    image: every quantum's GPU count is known and the counts are spread."""

    name = "calibrate"

    def __init__(self, where: dict[str, tuple[int, ...]]):
        super().__init__()
        self.where = where

    def schedule(self, s) -> Plan:
        plan, free = Plan(), set(s.free_gpus)
        for r in s.queue:
            gpus = self.where[r.id]
            if set(gpus) <= free:
                free -= set(gpus)
                steps = 1 if r.kind is Kind.VIDEO else r.remaining_steps
                plan.assignments.append(Assignment(gpus, (r.id,), steps))
        return plan


@dataclass(frozen=True)
class DispatchCost:
    """The engine's cost per quantum on emulated GPUs, in trace seconds: `fixed_s` for every
    quantum, plus `per_rank_s` for each rank beyond the first (the first rank's hand-off with
    each of the others).  A single mean was off both ways: a probe whose video ran split on 4 of
    8 GPUs measured 79 ms while the workload's quanta, mostly on one GPU, took about 21 ms."""

    fixed_s: float
    per_rank_s: float

    def estimates(self) -> CostEstimates:
        return CostEstimates(dispatch_s=self.fixed_s, dispatch_per_rank_s=self.per_rank_s)

    def describe(self, time_scale: float) -> str:
        return (f"{1e3 * self.fixed_s:.0f} trace ms + {1e3 * self.per_rank_s:.1f} per rank beyond "
                f"the first ({1e3 * self.fixed_s / time_scale:.1f} + "
                f"{1e3 * self.per_rank_s / time_scale:.2f} ms wall at {time_scale:g}x)")


def fit(over: list[tuple[int, float]]) -> DispatchCost:
    """Least squares of overrun = fixed + per_rank * (GPUs - 1) over (GPUs, overrun) pairs; both
    kept >= 0 (a single GPU count: its mean, per rank 0)."""
    if not over:
        return DispatchCost(0.0, 0.0)
    xs = [k - 1 for k, _ in over]
    ys = [y for _, y in over]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx) if sxx else 0.0
    a = my - b * mx
    if a < 0:  # through the origin instead
        a, b = 0.0, max(0.0, sum(x * y for x, y in zip(xs, ys)) / max(1, sum(x * x for x in xs)))
    return DispatchCost(a, b)


def dispatch_cost(pool, latency, time_scale: float, gpus_per_node: int = 8,
                  checkpoint_every: int = 4) -> DispatchCost:
    """What a quantum held its GPUs beyond its prediction over a probe run on `pool` (emulated
    workers; `probe`), fitted by its GPU count (`fit`)."""
    from ..engine import Engine
    from ..parallel.protocol import OutputFormat

    # Twice: the first run on a fresh pool pays once-only costs (process groups, the workers'
    # first encodes and checkpoint files) that doubled its figure; the second one counts.
    for _ in range(2):
        reqs, policy = probe(pool.presets, latency, pool.n, gpus_per_node)
        engine = Engine(policy, pool, latency, gpus_per_node, time_scale=time_scale,
                        output=OutputFormat(), checkpoint_every=checkpoint_every)
        res = engine.run(reqs)
    # Both logs are appended as each quantum ends, in the same order.
    return fit([(len(a.gpus), held - predicted) for (predicted, held, _), (_, _, a)
                in zip(res.quanta_log, res.quanta_record)])
