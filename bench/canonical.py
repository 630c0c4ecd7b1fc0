"""The canonical experiment (issue 2, DESIGN.md evaluation protocol), run by hand.

8 H200s (shipped profile), images (sd3-medium 512/768/1024, flux-dev 1024) and videos (wan2.1-1.3b
480p 33/81 frames, wan2.1-14b 480p/720p 81 frames), video share 0.2 and 0.5 by count, Gamma
arrivals CV 2, SLO scales 1.5 / 2 / 3, a rate sweep from light load to overload.  Every baseline is
tuned at every point (its free parameter swept, the value best on the mean over the seeds kept).
Per point, the mean over the seeds of: the upper bound on SLO attainment (genserve/bound.py: no
policy meets more), genserve, its ablations and the best tuned baseline.  Prints genserve / bound
and genserve / best tuned baseline per point and their summaries, and writes JSON and a PNG plot.

    python bench/canonical.py [--quick] [--seeds 1,2,3] [--duration 3600] [--jobs N]
                              [--out bench/results]

Baseline results depend only on the workload, so they are cached in the output folder
(`baselines.json`) and reused while the genserve policy is being changed (`--fresh` recomputes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genserve.cli import split_policies  # noqa: E402
from genserve.experiment import (ABLATIONS, BASELINES, BOUND, RunSpec, run_many,  # noqa: E402
                                 tune_grid)
from genserve.workload import WorkloadConfig  # noqa: E402

RATES = {0.2: [0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4],
         0.5: [0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.16]}
SLOS = [1.5, 2.0, 3.0]
QUICK_RATES = {0.2: [0.04, 0.1, 0.2, 0.4], 0.5: [0.02, 0.04, 0.08, 0.16]}


def points(quick: bool, duration: float, seeds: list[int]) -> list[list[RunSpec]]:
    """Per point of the grid, its run specs, one per seed."""
    out = []
    for share, rates in (QUICK_RATES if quick else RATES).items():
        for slo in SLOS:
            for rate in rates:
                out.append([RunSpec(workload=WorkloadConfig(
                    rate=rate, duration=duration, arrival="gamma", cv=2.0, video_share=share,
                    slo_scale=slo, seed=seed), gpus=8) for seed in seeds])
    return out


def key(spec: RunSpec) -> str:
    w = spec.workload
    return f"share={w.video_share},slo={w.slo_scale},rate={w.rate},dur={w.duration},seed={w.seed}"


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 rates per share instead of 8-9")
    ap.add_argument("--duration", type=float, default=3600.0, help="seconds of arrivals")
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated; each point is their mean")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--policies", default="genserve," + ",".join(ABLATIONS),
                    help="genserve variants to compare with the tuned baselines")
    ap.add_argument("--fresh", action="store_true", help="recompute the cached baselines")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    grid = points(a.quick, a.duration, seeds)
    cache_path = out / "baselines.json"
    cache = {} if a.fresh or not cache_path.exists() else json.loads(cache_path.read_text())

    t0 = time.time()
    variants = split_policies(a.policies)
    jobs, owners = [], []
    for specs in grid:
        for spec in specs:
            wanted = [p for b in BASELINES for p in tune_grid(b, spec.gpus)] + [BOUND]
            for p in wanted:
                if f"{key(spec)}|{p}" not in cache:
                    jobs.append((spec, p))
                    owners.append(f"{key(spec)}|{p}")
            for v in variants:
                jobs.append((spec, v))
                owners.append(f"{key(spec)}|{v}")
    print(f"{len(jobs)} simulations on {a.jobs} processes...", flush=True)
    results = dict(zip(owners, run_many(jobs, a.jobs)))
    for k, v in results.items():
        name = k.split("|", 1)[1]
        if name == BOUND or name.partition(":")[0] in BASELINES:
            cache[k] = v  # depends on the workload only
    cache_path.write_text(json.dumps(cache))
    results = {**cache, **results}

    def avg(specs: list[RunSpec], name: str, field: str = "slo_attainment", sub: str = "") -> float:
        return mean((results[f"{key(s)}|{name}"][sub] if sub else results[f"{key(s)}|{name}"])
                    [field] for s in specs)

    rows = []
    for specs in grid:
        w = specs[0].workload
        tuned = {b: max(((avg(specs, p), p) for p in tune_grid(b, 8))) for b in BASELINES}
        best_b = max(tuned, key=lambda b: tuned[b][0])
        row = {"share": w.video_share, "slo": w.slo_scale, "rate": w.rate, "seeds": seeds,
               "bound": avg(specs, BOUND), "best_baseline": tuned[best_b][1],
               "best_baseline_slo": tuned[best_b][0],
               "baselines": {b: v for b, (v, _) in tuned.items()}}
        for v in variants:
            row[v] = avg(specs, v)
            row[v + "/image"] = avg(specs, v, sub="image")
            row[v + "/video"] = avg(specs, v, sub="video")
        rows.append(row)
    report(rows, variants)
    print(f"wall time {time.time() - t0:.0f} s")
    (out / "canonical.json").write_text(json.dumps({"rows": rows}, indent=1))
    plot(rows, variants, out / "canonical.png")
    print(f"wrote {out / 'canonical.json'} and {out / 'canonical.png'}")
    return 0


def report(rows: list[dict], variants: list[str]) -> None:
    g = variants[0]
    print(f"\n{'share':>5s} {'slo':>4s} {'rate':>5s} {'bound':>6s} {'best tuned baseline':>34s} "
          f"{'base':>6s} " + " ".join(f"{v.replace('genserve', 'gs'):>11s}" for v in variants)
          + "   gs/base gs/bound")
    vs_base, vs_bound = [], []
    for r in rows:
        ratio = r[g] / r["best_baseline_slo"] if r["best_baseline_slo"] > 0 else math.inf
        of_bound = r[g] / r["bound"] if r["bound"] > 0 else 1.0
        vs_base.append((ratio, r))
        vs_bound.append(of_bound)
        print(f"{r['share']:5.1f} {r['slo']:4.1f} {r['rate']:5.2f} {r['bound']:6.3f} "
              f"{r['best_baseline']:>34s} {r['best_baseline_slo']:6.3f} "
              + " ".join(f"{r[v]:11.3f}" for v in variants) + f"   {ratio:6.3f}  {of_bound:6.3f}")
    finite = [x for x, _ in vs_base if x != math.inf]
    best_ratio, best_row = max(((x, r) for x, r in vs_base if x != math.inf), key=lambda t: t[0])
    print(f"\n{g} / bound: min {min(vs_bound):.3f}, mean {mean(vs_bound):.3f}")
    print(f"{g} / best tuned baseline: min {min(finite):.3f}x, geomean "
          f"{math.exp(mean(math.log(x) for x in finite if x > 0)):.3f}x, max {best_ratio:.2f}x "
          f"(at share {best_row['share']}, SLO {best_row['slo']}, rate {best_row['rate']}); "
          f"points below 1.0x: {sum(x < 1.0 for x in finite)}, below 0.99x: "
          f"{sum(x < 0.99 for x in finite)} of {len(finite)}")
    for v in variants[1:]:
        d = [r[g] - r[v] for r in rows]
        print(f"ablation {v:22s}: mean loss vs {g} {100 * mean(d):5.1f} points, "
              f"max {100 * max(d):5.1f} points")


def plot(rows: list[dict], variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    shares = sorted({r["share"] for r in rows})
    fig, axes = plt.subplots(len(shares), len(SLOS), figsize=(4 * len(SLOS), 3.2 * len(shares)),
                             squeeze=False, sharey=True)
    for i, share in enumerate(shares):
        for j, slo in enumerate(SLOS):
            ax = axes[i][j]
            sel = [r for r in rows if r["share"] == share and r["slo"] == slo]
            xs = [r["rate"] for r in sel]
            for b in BASELINES:
                ax.plot(xs, [r["baselines"][b] for r in sel], marker=".", linewidth=1,
                        label=f"{b} (tuned)")
            for v in variants[:1]:
                ax.plot(xs, [r[v] for r in sel], marker="o", linewidth=2.5, color="black", label=v)
            ax.plot(xs, [r["bound"] for r in sel], linestyle="--", linewidth=1.5, color="black",
                    label="upper bound")
            ax.set_title(f"video share {share}, SLO x{slo}", fontsize=9)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{x:g}" for x in xs], fontsize=7, rotation=45)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if i == len(shares) - 1:
                ax.set_xlabel("rate (req/s)")
            if j == 0:
                ax.set_ylabel("SLO attainment")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
