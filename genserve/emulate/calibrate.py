"""The engine's own cost per quantum on emulated workers, measured, for the policy to plan with.

Emulated jobs take exactly the profile's time; what the engine adds around each one (the
decision, the messages, a checkpoint through the driver, the workers' hand-offs) is this
machine's real work, and under a time scale S each wall millisecond of it is S trace
milliseconds.  A policy that plans with the profile alone (`LatencyModel.dispatch_time` is 0 in
the shipped one) plans videos, which run a step per quantum, to finish just before their
deadlines and then misses them by that overhead.  `dispatch_cost` runs a short probe through the
engine and returns the mean overrun per quantum, in trace seconds: give it to the latency model
(`CostEstimates(dispatch_s=...)`) that the policy and the simulator use, as `genserve profile
--workers` does for real workers (`dispatch_ms`).
"""

from __future__ import annotations

from ..request import Kind, Request
from ..spec import GenSpec


def probe_requests(models, n_video_steps: int = 16) -> list[Request]:
    """A video stepped one quantum at a time beside a few images, all due far away, of the
    first video and image models among `models` (those served)."""
    from ..catalog import GENERATE_DEFAULTS, get_model

    reqs = []
    videos = [m for m in models if get_model(m).kind is Kind.VIDEO]
    images = [m for m in models if get_model(m).kind is Kind.IMAGE]
    if videos:
        h, w, f, _ = GENERATE_DEFAULTS[videos[0]]
        spec = GenSpec(videos[0], h, w, f, steps=n_video_steps, prompt="calibration")
        reqs.append(Request("calibrate-video", Kind.VIDEO, spec, arrival=0.0, deadline=1e9))
    for i in range(3 if images else 0):
        spec = GenSpec(images[0], 512, 512, steps=8, seed=i, prompt="calibration")
        reqs.append(Request(f"calibrate-image-{i}", Kind.IMAGE, spec, arrival=0.05 * i,
                            deadline=1e9))
    return reqs


def dispatch_cost(pool, latency, time_scale: float, gpus_per_node: int = 8,
                  checkpoint_every: int = 4, policy: str = "genserve") -> float:
    """Mean seconds (trace time) a quantum held its GPUs beyond its prediction, over a probe run
    on `pool` (emulated workers); never below 0."""
    from ..engine import Engine
    from ..parallel.protocol import OutputFormat
    from ..policies import make_policy

    engine = Engine(make_policy(policy), pool, latency, gpus_per_node, time_scale=time_scale,
                    output=OutputFormat(), checkpoint_every=checkpoint_every)
    res = engine.run(probe_requests(pool.presets))
    over = [held - predicted for predicted, held, _ in res.quanta_log]
    return max(0.0, sum(over) / len(over)) if over else 0.0
