"""Engine overhead (issue 5), run by hand on CPU workers with the tiny presets.

1. Per step: one video through the engine under `genserve` (one step per quantum, so every step
   is a decision point and a job round trip) against calling the workers directly with the same
   jobs (the same resident-state `run` job per step, no policy, no bookkeeping).  Goal: < 3%.
   Also: the same video as one n-step job (what fcfs dispatches), the floor of the job protocol.
2. Decision time with ~200 active requests: 200 requests arrive at once on 4 workers; the policy
   call is timed at every decision point, reported with the number of active requests it saw.

    python bench/engine_overhead.py [--steps 60] [--shape 64x64x9] [--active 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genserve.engine import Engine  # noqa: E402
from genserve.latency import LatencyModel  # noqa: E402
from genserve.models import GenRequest  # noqa: E402
from genserve.parallel.protocol import New, Resident, Run  # noqa: E402
from genserve.parallel.workers import WorkerPool  # noqa: E402
from genserve.policies import Policy, make_policy  # noqa: E402
from genserve.profiler import profile_workers, write_profile  # noqa: E402
from genserve.request import Kind, Request  # noqa: E402
from genserve.spec import GenSpec  # noqa: E402


def direct(pool: WorkerPool, req: GenRequest, per_job: int) -> float:
    """The video through bare `run` jobs of `per_job` steps; returns wall seconds."""
    t0 = time.perf_counter()
    src, done = New(req.id, req.spec), 0
    while done < req.spec.steps:
        n = min(per_job, req.spec.steps - done)
        out = pool.wait(pool.submit((0,), Run("tiny-t2v", (src,), n)))
        done, src = out.steps[req.id], Resident(req.id)
    return time.perf_counter() - t0


def through_engine(pool, lat, req: GenRequest, policy: str) -> float:
    r = Request(req.id, Kind.VIDEO, req.spec, deadline=1e9)
    t0 = time.perf_counter()
    Engine(make_policy(policy), pool, lat).run([r])
    return time.perf_counter() - t0


class Timed(Policy):
    """Wraps a policy: records (active requests, seconds) of each call."""

    name = "timed"

    def __init__(self, inner: Policy):
        super().__init__()
        self.inner, self.calls = inner, []

    def schedule(self, state):
        t0 = time.perf_counter()
        plan = self.inner.schedule(state)
        self.calls.append((len(state.queue) + len(state.running), time.perf_counter() - t0))
        return plan

    def describe(self) -> str:
        return self.inner.describe()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--shape", default="64x64x9", help="WxHxF of the tiny-t2v video")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--active", type=int, default=200)
    a = ap.parse_args()
    w, h, f = (int(x) for x in a.shape.split("x"))
    with tempfile.TemporaryDirectory() as d, \
            WorkerPool(("tiny-t2i", "tiny-t2v"), 4) as pool:
        write_profile(d, "local", *profile_workers(["tiny-t2i", "tiny-t2v"], (1, 2, 4), reps=3,
                                                   pool=pool))
        lat = LatencyModel(d)
        rows = {"direct, 1 step per job": [], "engine genserve (1 step per quantum)": [],
                "direct, all steps in one job": [], "engine fcfs (all steps in one quantum)": []}
        for rep in range(a.reps + 1):  # rep 0 warms up
            req = GenRequest(f"v{rep}",
                             GenSpec("tiny-t2v", h, w, frames=f, steps=a.steps, seed=rep,
                                     prompt="a fox in the snow"))
            got = [direct(pool, req, 1), through_engine(pool, lat, req, "genserve"),
                   direct(pool, req, a.steps), through_engine(pool, lat, req, "fcfs")]
            if rep:
                for k, v in zip(rows, got):
                    rows[k].append(v)
        base = statistics.median(rows["direct, 1 step per job"])
        print(f"tiny-t2v {a.shape}, {a.steps} steps, median of {a.reps}; worker 0 of 4 "
              f"(the others idle); dispatch in profile {1e3 * lat.dispatch_time():.2f} ms")
        for k, v in rows.items():
            m = statistics.median(v)
            print(f"  {k:40s} {1e3 * m / a.steps:7.2f} ms/step  {m / base:.3f}x")
        eng = statistics.median(rows["engine genserve (1 step per quantum)"])
        print(f"engine overhead per step vs direct: {100 * (eng / base - 1):+.1f}% (goal < 3%)")

        pol = Timed(make_policy("genserve"))
        mix = [("tiny-t2i", Kind.IMAGE, 64, 64, 1), ("tiny-t2v", Kind.VIDEO, 32, 32, 9)]
        reqs = []
        for i in range(a.active):
            m, k, hh, ww, ff = mix[i % 5 == 4]
            r = Request(f"r{i}", k, GenSpec(m, hh, ww, frames=ff, steps=8, seed=i, prompt="x"),
                        arrival=0.0)
            r.deadline = 60.0 + i * 0.1
            reqs.append(r)
        t0 = time.perf_counter()
        res = Engine(pol, pool, lat).run(reqs)
        print(f"{a.active} requests at once on 4 workers: {len(pol.calls)} decisions in "
              f"{time.perf_counter() - t0:.1f} s; finished "
              f"{sum(r.status.value == 'finished' for r in reqs)}/{len(reqs)}")
        edges = (a.active * 3 // 4, a.active // 2, a.active // 4, 0)
        hi = a.active + 1
        for lo in edges:
            xs = sorted(s for n, s in pol.calls if lo <= n < hi)
            if xs:
                print(f"  {lo:4d}-{hi - 1:<4d} active: {len(xs):4d} decisions, p50 "
                      f"{1e3 * statistics.median(xs):.2f} ms, p99 "
                      f"{1e3 * xs[int(0.99 * (len(xs) - 1))]:.2f} ms, max {1e3 * xs[-1]:.2f} ms")
            hi = lo
        del res
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
