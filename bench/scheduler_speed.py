"""Scheduler speed, run by hand (issue 2 benchmarks; goals, not tests):

1. Decision time: p50/p99 of one `schedule()` call with 64 GPUs and 500 active requests
   (goal for genserve: p99 < 2 ms).  States are snapshots taken from a real simulation of an
   overloaded 64-GPU cluster, re-planned by a fresh policy object each time.
2. Simulator wall time for one hour of a 64-GPU cluster at 80% load (goal < 20 s on 2 cores).

    python bench/scheduler_speed.py [--policies genserve,fcfs,...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genserve.latency import LatencyModel  # noqa: E402
from genserve.policies import Cluster, Plan, Policy, SchedulerState, make_policy  # noqa: E402
from genserve.request import Request  # noqa: E402
from genserve.sim import SimConfig, Simulator  # noqa: E402
from genserve.workload import WorkloadConfig, default_mix, generate  # noqa: E402
from genserve.spec import GenSpec  # noqa: E402


def mean_gpu_seconds(lat: LatencyModel, share: float) -> float:
    from genserve.catalog import get_model

    items = default_mix(share)
    tot = sum(i.weight for i in items)
    acc = 0.0
    for it in items:
        spec = get_model(it.model)
        r = Request("x", spec.kind,
                    GenSpec(it.model, it.height, it.width, frames=it.frames, steps=spec.steps))
        acc += it.weight / tot * lat.standalone(r, 1)
    return acc


class _Snapshot(Policy):
    """Wraps a policy; keeps copies of states whose active count is near the target."""

    name = "snapshot"

    def __init__(self, inner: Policy, target: int, keep: int):
        super().__init__()
        self.inner, self.target, self.keep, self.states = inner, target, keep, []

    def schedule(self, s: SchedulerState) -> Plan:
        if len(s.queue) + len(s.running) >= self.target and len(self.states) < self.keep:
            import copy

            self.states.append(copy.deepcopy(s))
        return self.inner.schedule(s)


def decision_times(policies: list[str], active: int, samples: int, slo: float) -> None:
    lat = LatencyModel()
    cl = Cluster(64, 8)
    rate = 4.0 * 64 / mean_gpu_seconds(lat, 0.2)  # 4x overload: the queue grows past `active`
    reqs = generate(WorkloadConfig(rate=rate, duration=3600, video_share=0.2, slo_scale=slo,
                                   seed=3), lat, 64)
    snap = _Snapshot(make_policy("genserve"), active, samples)
    Simulator(cl, lat, snap, SimConfig(horizon=3600)).run(reqs)
    if not snap.states:
        print(f"no state with {active} active requests was reached")
        return
    n_act = statistics.mean(len(s.queue) + len(s.running) for s in snap.states)
    n_hope = statistics.mean(
        sum(snap.inner.need(r, snap.inner.info(r, s), s.now) is None for r in s.queue)
        for s in snap.states)
    print(f"decision time, 64 GPUs, SLO scale {slo}: {len(snap.states)} snapshots with >= "
          f"{active} active requests (mean {n_act:.0f}, of which {n_hope:.0f} past saving):")
    for name in policies:
        cold, warm = [], []
        for s in snap.states:
            # A fresh policy pays for its per-request caches on the first call ("cold"); in a
            # running engine most requests were seen before ("warm": the same state again).
            pol = make_policy(name)
            t0 = time.perf_counter()
            pol.schedule(s)
            t1 = time.perf_counter()
            pol.schedule(s)
            cold.append(t1 - t0)
            warm.append(time.perf_counter() - t1)

        def pct(xs: list[float], q: float) -> float:
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(len(xs) * q))] * 1e3

        print(f"  {name:20s} warm p50 {pct(warm, .5):6.2f} ms  p99 {pct(warm, .99):6.2f} ms   "
              f"cold p50 {pct(cold, .5):6.2f} ms  p99 {pct(cold, .99):6.2f} ms")


def sim_wall(policies: list[str]) -> None:
    lat = LatencyModel()
    cl = Cluster(64, 8)
    rate = 0.8 * 64 / mean_gpu_seconds(lat, 0.2)
    print(f"simulator wall time, 64 GPUs, 1 h of arrivals at 80% load ({rate:.3f} req/s):")
    for name in policies:
        reqs = generate(WorkloadConfig(rate=rate, duration=3600, video_share=0.2, slo_scale=2.0,
                                       seed=4), lat, 64)
        sim = Simulator(cl, lat, make_policy(name))
        t0 = time.perf_counter()
        res = sim.run(reqs)
        wall = time.perf_counter() - t0
        met = sum(r.met_deadline for r in res.requests) / len(res.requests)
        print(f"  {name:20s} {wall:6.2f} s wall for {res.end_time / 3600:.2f} h simulated, "
              f"{len(reqs)} requests, {res.decisions} decisions, SLO {met:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default="genserve,fcfs,edf,static,tetriserve")
    ap.add_argument("--active", type=int, default=500)
    ap.add_argument("--samples", type=int, default=300)
    a = ap.parse_args()
    names = [p for p in a.policies.split(",") if p]
    for slo in (1.5, 20.0):  # tight: most of the backlog is demoted; loose: most is feasible
        decision_times(names, a.active, a.samples, slo)
    sim_wall(names)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
