"""CFG parallelism in the scheduler (issue 16), run by hand on the simulator.

genserve with and without the CFG split (`genserve:cfg_split=false`) on the canonical settings (8
H200s, shipped profile, Gamma CV 2, both video shares, the quick grid's rates), or with
`--workload new-models` on a mix with Qwen-Image and Wan2.2 (A14B, TI2V-5B), whose step times are
estimates (`genserve profile --show h200`), each point the mean of the seeds.  Prints SLO attainment per kind for both, the upper bound (which prices CFG
splits too), and which configurations genserve chose: the share of denoising steps each kind ran
as a CFG split, by GPU count.

CFG-split step times are derived from the shipped profile's measured batch-1 forwards (a branch is
half of the CFG batch) plus an estimated exchange of the noise predictions; no CFG-split forward
was measured on a GPU (`LatencyModel.step_time`).

    python bench/cfg_split.py [--workload canonical|new-models] [--seeds 1,2,3]
                              [--duration 3600] [--jobs N]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genserve.experiment import RunSpec, bound_one, latency_for, requests_for  # noqa: E402
from genserve.metrics import summarize  # noqa: E402
from genserve.policies import Cluster, make_policy  # noqa: E402
from genserve.policies.base import Plan, Policy, SchedulerState  # noqa: E402
from genserve.sim import SimConfig, Simulator  # noqa: E402
from genserve.workload import WorkloadConfig  # noqa: E402

POINTS = [(share, slo, rate) for share, rates in ((0.2, (0.04, 0.1, 0.2, 0.4)),
                                                  (0.5, (0.02, 0.04, 0.08, 0.16)))
          for slo in (1.5, 2.0, 3.0) for rate in rates]
# Images 80%, videos 20% by count; the share column is the videos' share.
NEW_MIX = ("sd3-medium@1024x1024=0.2,flux-dev@1024x1024=0.2,qwen-image@1024x1024=0.2,"
           "qwen-image@1328x1328=0.2,wan2.1-1.3b@832x480x81=0.05,wan2.2-a14b@832x480x81=0.05,"
           "wan2.2-a14b@1280x720x81=0.05,wan2.2-ti2v-5b@1280x704x121=0.05")
NEW_POINTS = [(0.2, slo, rate) for slo in (1.5, 2.0, 3.0) for rate in (0.02, 0.05, 0.1, 0.2)]
VARIANTS = ("genserve", "genserve:cfg_split=false")


class Tally(Policy):
    """A policy's plans, counted: steps per (kind, GPUs, CFG split)."""

    name = "tally"

    def __init__(self, inner: str):
        super().__init__()
        self.inner = make_policy(inner)
        self.steps: Counter = Counter()

    def schedule(self, s: SchedulerState) -> Plan:
        plan = self.inner.schedule(s)
        kinds = {r.id: r.kind.value for r in s.queue}
        for a in plan.assignments:
            self.steps[(kinds[a.requests[0]], len(a.gpus), a.cfg_split)] += a.steps * len(
                a.requests)
        return plan


def run(job: tuple[RunSpec, str]) -> tuple[dict, Counter]:
    spec, variant = job
    if variant == "bound":
        return bound_one(spec), Counter()
    pol = Tally(variant)
    sim = Simulator(Cluster(spec.gpus, spec.gpus_per_node), latency_for(spec), pol, SimConfig())
    return summarize(sim.run(requests_for(spec))), pol.steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=("canonical", "new-models"), default="canonical")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    a = ap.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    new = a.workload == "new-models"
    points = NEW_POINTS if new else POINTS
    jobs = [(RunSpec(workload=WorkloadConfig(rate=rate, duration=a.duration, arrival="gamma",
                                             cv=2.0, video_share=share, slo_scale=slo,
                                             seed=seed, mix=NEW_MIX if new else None),
                     gpus=8), v)
            for share, slo, rate in points for seed in seeds for v in (*VARIANTS, "bound")]
    with ProcessPoolExecutor(a.jobs) as ex:
        out = list(ex.map(run, jobs, chunksize=1))
    res = {(j[0].workload.video_share, j[0].workload.slo_scale, j[0].workload.rate,
            j[0].workload.seed, j[1]): o for j, o in zip(jobs, out)}

    def mean(share, slo, rate, v, kind=None):
        xs = [res[(share, slo, rate, s, v)][0] for s in seeds]
        return sum((x[kind] if kind else x)["slo_attainment"] for x in xs) / len(xs)

    print(f"{'share':>5} {'slo':>4} {'rate':>5} {'bound':>6} | {'split on: all':>13} {'img':>6} "
          f"{'vid':>6} | {'off: all':>8} {'img':>6} {'vid':>6} | on - off")
    gains = {"all": [], "image": [], "video": []}
    for share, slo, rate in points:
        row = [mean(share, slo, rate, v, k) for v in VARIANTS for k in (None, "image", "video")]
        for name, i in (("all", 0), ("image", 1), ("video", 2)):
            gains[name].append(row[i] - row[i + 3])
        print(f"{share:5.1f} {slo:4.1f} {rate:5.2f} {mean(share, slo, rate, 'bound'):6.3f} | "
              f"{row[0]:13.3f} {row[1]:6.3f} {row[2]:6.3f} | {row[3]:8.3f} {row[4]:6.3f} "
              f"{row[5]:6.3f} | {100 * (row[0] - row[3]):+5.1f}")
    for name, g in gains.items():
        print(f"CFG split on - off, {name:5s}: mean {100 * sum(g) / len(g):+.2f} points, "
              f"min {100 * min(g):+.1f}, max {100 * max(g):+.1f}")
    steps: Counter = Counter()
    for (share, slo, rate, seed, v), (_, c) in res.items():
        if v == VARIANTS[0]:
            steps.update(c)
    for kind in ("image", "video"):
        total = sum(n for (k, _, _), n in steps.items() if k == kind)
        split = sum(n for (k, _, sp), n in steps.items() if k == kind and sp)
        by = ", ".join(f"{g} GPUs {100 * n / total:.1f}%"
                       for (k, g, sp), n in sorted(steps.items()) if k == kind and sp)
        print(f"{kind}: {100 * split / max(total, 1):.1f}% of steps as a CFG split ({by or 'none'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
