"""Profile-error experiment (issue 15), run by hand: the simulator executes with the true H200
profile while genserve plans with one wrong by a factor, with and without the self-correcting
latency model (genserve/feedback.py).

Errors: every step time x0.7 (the policy is optimistic) and x1.3 (pessimistic), and per-model
errors in opposite directions (images x0.7 with videos x1.3, and the reverse).  Points: canonical
settings (8 GPUs, Gamma CV 2) at both video shares, each the mean of the seeds.  Prints SLO
attainment per error with and without correction, next to the true profile, and how many
decisions it takes until every model's correction is within 5% of the truth.

    python bench/profile_error.py [--seeds 1,2,3] [--duration 3600] [--jobs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genserve.experiment import RunSpec, belief_for, latency_for, requests_for  # noqa: E402
from genserve.feedback import Corrected, parse_factors  # noqa: E402
from genserve.metrics import summarize  # noqa: E402
from genserve.policies import Cluster, make_policy  # noqa: E402
from genserve.policies.base import Plan, Policy, SchedulerState  # noqa: E402
from genserve.sim import SimConfig, Simulator  # noqa: E402
from genserve.workload import WorkloadConfig  # noqa: E402

IMAGES, VIDEOS = ("sd3-medium", "flux-dev"), ("wan2.1-1.3b", "wan2.1-14b")
ERRORS = {"x0.7": "0.7", "x1.3": "1.3",
          "images x0.7, videos x1.3": ",".join([f"{m}=0.7" for m in IMAGES]
                                               + [f"{m}=1.3" for m in VIDEOS]),
          "images x1.3, videos x0.7": ",".join([f"{m}=1.3" for m in IMAGES]
                                               + [f"{m}=0.7" for m in VIDEOS])}
POINTS = [(0.2, 2.0, 0.1), (0.2, 1.5, 0.2), (0.5, 2.0, 0.04), (0.5, 1.5, 0.08)]


class Watched(Policy):
    """genserve, counting its decisions until every model's correction is within 5% of the truth
    (the models seen so far)."""

    name = "genserve"

    def __init__(self, truth_over_belief: dict[str, float]):
        super().__init__()
        self.inner, self.truth = make_policy("genserve"), truth_over_belief
        self.calls, self.recovered_at, self.seen = 0, None, set()

    def schedule(self, s: SchedulerState) -> Plan:
        self.calls += 1
        lat = s.latency
        self.seen.update(r.model for r in s.queue)
        ok = all(abs(lat.estimate(m) / self.truth[m] - 1) <= 0.05 for m in self.seen)
        if ok and self.recovered_at is None:
            self.recovered_at = self.calls
        elif not ok:
            self.recovered_at = None
        return self.inner.schedule(s)


def one(job: tuple[RunSpec, str]) -> tuple[float, int | None]:
    spec, error = job
    belief = belief_for(spec)
    if isinstance(belief, Corrected):
        per, default = parse_factors(error)
        pol: Policy = Watched({m: 1 / per.get(m, default) for m in IMAGES + VIDEOS})
    else:
        pol = make_policy("genserve")
    sim = Simulator(Cluster(spec.gpus), belief, pol, SimConfig(), truth=latency_for(spec))
    m = summarize(sim.run(requests_for(spec)))
    return m["slo_attainment"], getattr(pol, "recovered_at", None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    a = ap.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    jobs = []
    for share, slo, rate in POINTS:
        for seed in seeds:
            wl = WorkloadConfig(rate=rate, duration=a.duration, arrival="gamma", cv=2.0,
                                video_share=share, slo_scale=slo, seed=seed)
            jobs.append((RunSpec(workload=wl), "1"))
            for err in ERRORS.values():
                for fb in (False, True):
                    jobs.append((RunSpec(workload=wl, profile_error=err, feedback=fb), err))
    with ProcessPoolExecutor(a.jobs) as ex:
        out = list(ex.map(one, jobs, chunksize=1))
    res = {(j[0].workload.video_share, j[0].workload.slo_scale, j[0].workload.rate,
            j[0].profile_error, j[0].feedback, j[0].workload.seed): o for j, o in zip(jobs, out)}

    def mean(share, slo, rate, err, fb):
        return statistics.mean(res[(share, slo, rate, err, fb, s)][0] for s in seeds)

    print(f"SLO attainment, mean of seeds {seeds}, {a.duration:g} s per run; genserve planning "
          f"with a wrong profile, without / with correction (true profile first)")
    head = f"{'share':>5s} {'slo':>4s} {'rate':>5s} {'true':>6s} " + " ".join(
        f"{name:>26s}" for name in ERRORS)
    print(head)
    worst_gap = {}
    for share, slo, rate in POINTS:
        true = mean(share, slo, rate, None, False)
        cells = []
        for name, err in ERRORS.items():
            off, on = mean(share, slo, rate, err, False), mean(share, slo, rate, err, True)
            cells.append(f"{off:.3f} / {on:.3f}")
            worst_gap[name] = max(worst_gap.get(name, 0.0), true - on)
        print(f"{share:5.1f} {slo:4.1f} {rate:5.2f} {true:6.3f} "
              + " ".join(f"{c:>26s}" for c in cells))
    for name, gap in worst_gap.items():
        rec = [res[k][1] for k in res if k[3] == ERRORS[name] and k[4]]
        done = [r for r in rec if r is not None]
        print(f"{name:26s}: with correction, worst loss vs the true profile "
              f"{100 * gap:+.1f} points; recovered (every model within 5%) after "
              f"{statistics.median(done) if done else '-'} decisions (median; max "
              f"{max(done) if done else '-'}; {len(rec) - len(done)} runs not recovered)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
