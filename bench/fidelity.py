"""Simulator fidelity (issue 5), run by hand: the same trace through `simulate` (virtual clock, the
profile `genserve profile` just measured here) and through the real engine (`replay`, CPU worker
processes), for genserve and fcfs.  Reports the SLO-attainment difference (goal <= 5 points) and
the median per-request latency error (goal <= 10%).

    python bench/fidelity.py [--workers 4] [--requests 100] [--rate 6]
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
from genserve.metrics import summarize  # noqa: E402
from genserve.parallel.workers import WorkerPool  # noqa: E402
from genserve.policies import Cluster, make_policy  # noqa: E402
from genserve.profiler import profile_workers, write_profile  # noqa: E402
from genserve.sim import SimConfig, Simulator  # noqa: E402
from genserve.workload import WorkloadConfig, generate  # noqa: E402

MIX = "tiny-t2i@64x64=4,tiny-t2v@32x32x9=1"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--rate", type=float, default=6.0, help="requests per second")
    ap.add_argument("--slo-scale", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--policies", default="genserve,fcfs")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d, \
            WorkerPool(("tiny-t2i", "tiny-t2v"), a.workers) as pool:
        t0 = time.time()
        # Measured inside a worker of this pool: same threads and process layout as serving.
        write_profile(d, "local", *profile_workers(["tiny-t2i", "tiny-t2v"], (1, 2, 4, 8),
                                                   reps=5, pool=pool))
        lat = LatencyModel(d)
        print(f"profile measured in {time.time() - t0:.0f} s; dispatch "
              f"{1e3 * lat.dispatch_time():.2f} ms per quantum")
        wl = WorkloadConfig(rate=a.rate, duration=a.requests / a.rate, mix=MIX,
                            slo_scale=a.slo_scale, seed=a.seed)
        print(f"{len(generate(wl, lat, a.workers))} requests, {a.workers} workers, {MIX}, "
              f"rate {a.rate}/s, SLO x{a.slo_scale}")
        for name in a.policies.split(","):
            sim_reqs = generate(wl, lat, a.workers)
            sim = Simulator(Cluster(a.workers), lat, make_policy(name),
                            SimConfig(drain=True)).run(sim_reqs)
            real_reqs = generate(wl, lat, a.workers)
            real = Engine(make_policy(name), pool, lat).run(real_reqs)
            ms, mr = summarize(sim), summarize(real)
            pairs = [(s.latency, r.latency) for s, r in zip(sim_reqs, real_reqs)
                     if s.latency is not None and r.latency is not None]
            errs = [abs(r - s) / s for s, r in pairs]
            bias = statistics.median((r - s) / s for s, r in pairs)
            diff = 100 * abs(ms["slo_attainment"] - mr["slo_attainment"])
            print(f"  {name:9s} SLO sim {ms['slo_attainment']:.3f} real "
                  f"{mr['slo_attainment']:.3f} (diff {diff:.1f} points); median latency error "
                  f"{100 * statistics.median(errs):.1f}% (signed {100 * bias:+.1f}%) over "
                  f"{len(errs)} requests; preemptions sim {sim.preemptions} real "
                  f"{real.preemptions}; decisions sim {sim.decisions} real {real.decisions} "
                  f"(median policy call {1e3 * statistics.median(real.decision_wall_s):.2f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
