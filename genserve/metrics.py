"""Evaluation metrics over finished runs (simulated now, real later): the protocol of DESIGN.md."""

from __future__ import annotations

import math

import numpy as np

from .request import Kind, Request, Status


def _pct(values: list[float], q: float) -> float | None:
    """Percentile where unfinished requests count as infinitely late; None if that is where q lands."""
    if not values:
        return None
    v = float(np.percentile(np.array(values), q, method="higher"))
    return None if math.isinf(v) else round(v, 4)


def _group(reqs: list[Request]) -> dict:
    n = len(reqs)
    met = sum(r.met_deadline for r in reqs)
    norm = [(r.latency / r.standalone) if (r.status is Status.FINISHED and r.standalone > 0)
            else math.inf for r in reqs]
    return {
        "count": n,
        "met": met,
        "slo_attainment": round(met / n, 4) if n else None,
        "finished": sum(r.status is Status.FINISHED for r in reqs),
        "failed": sum(r.status is Status.FAILED for r in reqs),
        "cancelled": sum(r.status is Status.CANCELLED for r in reqs),
        "p50_norm_latency": _pct(norm, 50),
        "p99_norm_latency": _pct(norm, 99),
    }


def summarize(result) -> dict:
    """Figures for one simulated (or replayed) run; `result` is an `ExecResult`."""
    reqs = result.requests
    out = _group(reqs)
    out["image"] = _group([r for r in reqs if r.kind is Kind.IMAGE])
    out["video"] = _group([r for r in reqs if r.kind is Kind.VIDEO])
    arrivals = [r.arrival for r in reqs]
    window = (max(arrivals) - min(arrivals)) if len(arrivals) > 1 else 0.0
    out["goodput_rps"] = round(out["met"] / window, 6) if window > 0 else None
    span = result.end_time
    out["gpu_busy"] = round(result.busy_gpu_s / (result.num_gpus * span), 4) if span > 0 else 0.0
    out["preemptions"] = result.preemptions
    out["migrations"] = result.migrations
    out["decisions"] = result.decisions
    out["defer_reasons"] = dict(sorted(result.reasons.items()))
    cross = getattr(result, "cross_node_gpu_s", None)
    if cross is not None:  # counted by the simulator only
        # Share of busy GPU-seconds, and of quanta, whose GPUs spanned nodes.
        out["cross_node_gpu_share"] = (round(cross / result.busy_gpu_s, 4)
                                       if result.busy_gpu_s > 0 else 0.0)
        out["cross_node_quanta_share"] = (round(result.cross_node_quanta / result.quanta, 4)
                                          if result.quanta else 0.0)
    return out
