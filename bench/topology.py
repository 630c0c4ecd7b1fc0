"""Topology-aware vs topology-blind placement on 4 nodes x 8 GPUs (issue 7, simulator), run by hand.

The canonical workload (bench/canonical.py: images and videos, video share 0.2 and 0.5, Gamma CV 2,
SLO scales 1.5 / 2 / 3) at the canonical rates x4 (4x the GPUs, light load to overload) on a
32-GPU cluster of 4 nodes.  `genserve` places SP groups inside one node and spans nodes only if it
pays (cross-node step time at the wanted degree strictly below the intra-node step time of the
largest degree that fits in a node); `genserve-blind` takes the lowest-index free GPUs wherever
they are.  Prints, per point, both SLO attainments, the ratio aware / blind and the share of busy
GPU-seconds (and of quanta) that spanned nodes; writes JSON.

    python bench/topology.py [--quick] [--jobs N] [--out bench/results] [--cross-bw 50]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from canonical import QUICK_RATES, RATES, SLOS  # noqa: E402  (this folder: bench/canonical.py)

from genserve.experiment import RunSpec, run_many  # noqa: E402
from genserve.workload import WorkloadConfig  # noqa: E402

AWARE, BLIND = "genserve", "genserve-blind"
SCALE = 4  # 4 nodes of 8 GPUs: 4x the canonical 8-GPU cluster, so 4x its rates


def points(a: argparse.Namespace) -> list[RunSpec]:
    out = []
    for share, rates in (QUICK_RATES if a.quick else RATES).items():
        for slo in SLOS:
            for rate in rates:
                wl = WorkloadConfig(rate=round(rate * SCALE, 6), duration=a.duration,
                                    arrival="gamma", cv=2.0, video_share=share, slo_scale=slo,
                                    seed=a.seed)
                out.append(RunSpec(workload=wl, gpus=a.nodes * a.gpus_per_node,
                                   gpus_per_node=a.gpus_per_node, cross_bw=a.cross_bw * 1e9))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 rates per share instead of 8-9")
    ap.add_argument("--duration", type=float, default=14400.0, help="seconds of arrivals")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--cross-bw", type=float, default=50.0, help="GB/s across nodes (per GPU)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    specs = points(a)
    jobs = [(spec, p) for spec in specs for p in (AWARE, BLIND)]
    # Heaviest (highest rate) first so the process pool does not end on one long run.
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i][0].workload.rate)
    print(f"{len(jobs)} simulations on {a.jobs} processes "
          f"({a.nodes} nodes x {a.gpus_per_node} GPUs, cross-node {a.cross_bw:g} GB/s)...",
          flush=True)
    res = dict(zip(order, run_many([jobs[i] for i in order], a.jobs)))

    rows = []
    for n, spec in enumerate(specs):
        w = spec.workload
        m = {p: res[2 * n + j] for j, p in enumerate((AWARE, BLIND))}
        sa, sb = m[AWARE]["slo_attainment"], m[BLIND]["slo_attainment"]
        row = {"share": w.video_share, "slo": w.slo_scale, "rate": w.rate,
               "ratio": (sa / sb) if sb > 0 else None}
        for p, tag in ((AWARE, "aware"), (BLIND, "blind")):
            row[tag] = {k: m[p][k] for k in ("slo_attainment", "cross_node_gpu_share",
                                                "cross_node_quanta_share", "gpu_busy",
                                                "preemptions", "migrations")}
            row[tag]["image"] = m[p]["image"]["slo_attainment"]
            row[tag]["video"] = m[p]["video"]["slo_attainment"]
        rows.append(row)

    print(f"\n{'share':>5s} {'slo':>4s} {'rate':>5s} {'aware':>6s} {'blind':>6s} {'ratio':>6s}   "
          f"{'cross GPU-s aware/blind':>23s}   {'cross quanta aware/blind':>24s}")
    for r in rows:
        ra, rb = r["aware"], r["blind"]
        ratio = f"{r['ratio']:5.3f}x" if r["ratio"] is not None else "   inf"
        print(f"{r['share']:5.1f} {r['slo']:4.1f} {r['rate']:5.2f} {ra['slo_attainment']:6.3f} "
              f"{rb['slo_attainment']:6.3f} {ratio:>6s}   "
              f"{ra['cross_node_gpu_share']:11.3f} / {rb['cross_node_gpu_share']:.3f}   "
              f"{ra['cross_node_quanta_share']:12.3f} / {rb['cross_node_quanta_share']:.3f}")
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    summary = {
        "points": len(rows),
        "ratio_min": min(ratios), "ratio_median": statistics.median(ratios),
        "ratio_max": max(ratios),
        "points_aware_below_blind": sum(x < 0.99 for x in ratios),
        "points_aware_above_blind": sum(x > 1.01 for x in ratios),
        "slo_gain_mean_points": 100 * statistics.mean(
            r["aware"]["slo_attainment"] - r["blind"]["slo_attainment"] for r in rows),
    }
    for tag in ("aware", "blind"):
        for k in ("cross_node_gpu_share", "cross_node_quanta_share"):
            vals = [r[tag][k] for r in rows]
            summary[f"{tag}_{k}_mean"] = statistics.mean(vals)
            summary[f"{tag}_{k}_max"] = max(vals)
    print(f"\n{AWARE} / {BLIND} SLO attainment: min {summary['ratio_min']:.3f}x, median "
          f"{summary['ratio_median']:.3f}x, max {summary['ratio_max']:.3f}x; mean gain "
          f"{summary['slo_gain_mean_points']:+.1f} points; aware below blind (<0.99x) at "
          f"{summary['points_aware_below_blind']} of {len(rows)} points, above (>1.01x) at "
          f"{summary['points_aware_above_blind']}")
    for tag in ("aware", "blind"):
        print(f"cross-node share, {tag:5s}: GPU-seconds mean "
              f"{summary[f'{tag}_cross_node_gpu_share_mean']:.3f} (max "
              f"{summary[f'{tag}_cross_node_gpu_share_max']:.3f}), quanta mean "
              f"{summary[f'{tag}_cross_node_quanta_share_mean']:.3f} (max "
              f"{summary[f'{tag}_cross_node_quanta_share_max']:.3f})")
    print(f"wall time {time.time() - t0:.0f} s")
    config = {"nodes": a.nodes, "gpus_per_node": a.gpus_per_node, "cross_bw_gbs": a.cross_bw,
              "duration": a.duration, "seed": a.seed, "quick": a.quick, "rate_scale": SCALE,
              "arrival": "gamma", "cv": 2.0}
    path = out / "topology.json"
    path.write_text(json.dumps({"config": config, "summary": summary, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
