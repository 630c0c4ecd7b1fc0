"""An upper bound on SLO attainment: no policy the simulator can run meets more deadlines.

Every figure of a policy is also read as a share of this bound.  It holds for every schedule the
executor can carry out (any order, preemption at any step boundary, any allowed SP degree per
quantum, any batch of equal shapes, moves for free), because it only uses two facts about one:

1. **Alone.**  A met request's latency is at least dispatch + its encode + its steps at the
   fastest step time any degree and batch give + its decode (`quantum_cost` puts each of those
   in the quanta that carry it).  A request that cannot make its deadline even so is lost by every
   policy.
2. **Capacity.**  Share each quantum's GPU-seconds out: a member's own encode and decode to it
   (k GPUs x those seconds), the steps equally among the n members (k x step(k, n) / n per step
   each), dispatch and moves to nobody.  The shares are disjoint pieces of the GPUs' time, so in
   any stretch of time they sum to at most GPUs x its length; a met request's shares all lie in
   [arrival, deadline], at a rate of at most its largest degree.  Its steps' shares are at least
   the cheapest mix of (degree, batch) step options whose step times fit its window (the lower
   convex hull of the (step time, share) points: a linear program of two constraints), batches
   only as large as the requests of its shape that arrived before its deadline and the profile's
   largest measured batch (past it a step costs in proportion); a degree that fits in a node at
   the faster of inside one node and across nodes; encode and decode at least on one GPU.

The capacity part is a linear program over time buckets: maximize sum x_r (x_r in [0, 1]: the met
fraction of request r) subject to r's work sum_b y_rb = w_r x_r, y_rb <= rate_r x |b and r's
window|, and each bucket's GPU-seconds.  A schedule gives a feasible point (x = 1 for the met
requests, y = their shares per bucket), so the optimum, rounded down, bounds every schedule's count.
Buckets come in two levels: short-window requests (images) on fine buckets cut at every arrival and
deadline, long ones (videos) on coarse buckets made of whole fine ones, each coarse bucket holding
both.  Splitting videos' work only by coarse buckets is a relaxation (it may only raise the bound).

What it leaves out, so where a policy can sit below it for no fault of its own: moves, dispatch,
the order steps must run in, node boundaries for degrees that fit in a node, and that a batch's
partners must be there at the same time.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass

from .latency import Grid, LatencyModel
from .policies.base import Cluster
from .policies.common import tokens_of
from .request import Request

EPS = 1e-9          # the executor's deadline tolerance (`Request.met_deadline`)


def _tolerance(r: Request) -> float:
    # deadline - arrival on large clock values (epoch seconds) carries rounding far above EPS.
    return EPS + 1e-12 * max(abs(r.arrival), abs(r.deadline))


@dataclass(frozen=True)
class BoundConfig:
    coarse_buckets: int = 400   # coarse buckets over the trace's span (long windows' work)
    short_buckets: int = 16     # a window over at most this many fine buckets is "short"
    lp: bool = True             # the capacity LP (False: only the alone bound)

    def validate(self) -> None:
        if self.coarse_buckets < 1 or self.short_buckets < 1:
            raise ValueError(f"bound: coarse_buckets and short_buckets must be >= 1, got "
                             f"{self.coarse_buckets}, {self.short_buckets}")


@dataclass
class Need:
    """What meeting one request costs at least."""

    request: Request
    start: float        # its window: arrival..deadline
    end: float
    work: float         # GPU-seconds (its shares)
    rate: int           # most GPUs it can hold at once


@dataclass
class Bound:
    total: int
    alone: int                    # requests that can meet their deadline alone
    met: int                      # the bound: at most this many are met
    lp_value: float | None = None
    seconds: float = 0.0
    note: str = ""

    @property
    def attainment(self) -> float:
        return self.met / self.total if self.total else 1.0

    def as_dict(self) -> dict:
        return {"slo_attainment": round(self.attainment, 4), "met": self.met, "count": self.total,
                "alone": self.alone, "lp_value": (None if self.lp_value is None
                                                  else round(self.lp_value, 3)),
                "seconds": round(self.seconds, 3), "note": self.note}


# ----- per request: feasibility alone and least GPU-seconds -----
class _Options:
    """Step options (time, share) of one shape on one cluster, for a batch limit: the lower convex
    hull from the fastest option to the cheapest, where mixing two options is worth it."""

    def __init__(self, points: list[tuple[float, float]]):
        best: dict[float, float] = {}
        for t, c in points:                       # per step time, its least share
            best[t] = min(c, best.get(t, math.inf))
        pts = sorted(best.items())
        self.fastest = pts[0][0]
        cheapest = min(pts, key=lambda p: (p[1], p[0]))
        hull: list[tuple[float, float]] = []
        for p in pts:
            if p[0] > cheapest[0]:
                break
            while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
                hull.pop()
            hull.append(p)
        # Keep the part where share falls as time grows (slower and costlier is never used).
        self.hull = [hull[0]]
        for p in hull[1:]:
            if p[1] < self.hull[-1][1]:
                self.hull.append(p)

    def per_step(self, tau: float) -> float:
        """Least mean share per step when the steps' mean time may be at most `tau`."""
        h = self.hull
        if tau >= h[-1][0]:
            return h[-1][1]
        for (t0, c0), (t1, c1) in zip(h, h[1:]):
            if tau <= t1:
                return c0 + (c1 - c0) * (tau - t0) / (t1 - t0)
        return h[-1][1]  # unreachable: tau < h[-1][0] ends the loop


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


class _Costs:
    """Step options per (shape, batch limit), computed once per bound."""

    def __init__(self, cluster: Cluster, latency: LatencyModel):
        self.cluster, self.lat = cluster, latency
        self.node = max(cluster.node_sizes().values())
        self.several_nodes = len(cluster.node_sizes()) > 1
        self._opts: dict[tuple, _Options] = {}
        self._limits: dict[str, int] = {}

    def batch_limit(self, model: str) -> int:
        """Requests per batch beyond which batching gives no more credit: past the profile's
        largest measured batch, step time grows in proportion to the batch (`latency.Grid`)."""
        hit = self._limits.get(model)
        if hit is None:
            prof = self.lat.profile_of(model)
            grids = [prof.f1, *prof.speedup.values()]
            if isinstance(prof.calib, Grid):
                grids.append(prof.calib)
            top = max(b for g in grids for row in g.rows for b, _ in row)
            hit = self._limits[model] = math.ceil(top / prof.spec.cfg_factor) + 1
        return hit

    def step(self, r: Request, tokens: int, n: int, k: int, split: bool = False) -> float:
        """The fastest a step on k GPUs (Ulysses, or CFG split) can be: inside a node when one is
        big enough (or across nodes, should that link be the faster one), else across nodes."""
        if k > self.node:
            return self.lat.step_time(r.model, tokens, n, k, True, split)
        t = self.lat.step_time(r.model, tokens, n, k, False, split)
        if self.several_nodes and k > 1:
            t = min(t, self.lat.step_time(r.model, tokens, n, k, True, split))
        return t

    def configs(self, r: Request) -> tuple[tuple[int, bool], ...]:
        """(GPUs, CFG split) a step of `r` can run on: every SP degree, and twice each for a
        request under classifier-free guidance (its branches side by side)."""
        return self.lat.gpu_configs(r.model, r.shape[-1], self.cluster.num_gpus)

    def options(self, r: Request, batch: int) -> _Options:
        key = (r.shape, batch)
        hit = self._opts.get(key)
        if hit is None:
            tokens = tokens_of(r)
            pts = []
            for k, split in self.configs(r):
                for n in range(1, batch + 1):
                    t = self.step(r, tokens, n, k, split)
                    pts.append((t, k * t / n))
            hit = self._opts[key] = _Options(pts)
        return hit

    def need(self, r: Request, batch: int) -> Need | None:
        """None: the request cannot meet its deadline even alone."""
        lat, opts = self.lat, self.options(r, batch)
        enc = lat.encode_time(r.model) if r.steps_done == 0 else 0.0
        dec = lat.decode_time(r.model, r.height, r.width, r.frames)
        steps = r.remaining_steps
        room = r.deadline - r.arrival - lat.dispatch_time() - enc - dec
        if steps * opts.fastest > room + _tolerance(r):
            return None
        tau = max(room / steps, opts.fastest) if steps > 0 else opts.fastest
        return Need(r, r.arrival, r.deadline, enc + dec + steps * opts.per_step(tau),
                    max(k for k, _ in self.configs(r)))


def needs(requests: list[Request], cluster: Cluster, latency: LatencyModel) -> list[Need]:
    """The requests that can meet their deadline alone, with what meeting it costs at least."""
    costs = _Costs(cluster, latency)
    arrivals: dict[tuple, list[float]] = {}
    for r in requests:
        arrivals.setdefault(r.shape, []).append(r.arrival)
    for v in arrivals.values():
        v.sort()
    out = []
    for r in requests:
        # A batch partner must have arrived before the deadline (it may be late itself).
        partners = bisect.bisect_right(arrivals[r.shape], r.deadline)
        n = costs.need(r, max(1, min(costs.batch_limit(r.model), partners)))
        if n is not None:
            out.append(n)
    return out


# ----- the capacity LP -----
def _fine_cuts(ns: list[Need]) -> list[float]:
    pts = sorted({n.start for n in ns} | {n.end for n in ns})
    cuts = [pts[0]]
    for p in pts[1:]:
        if p - cuts[-1] > 1e-6:
            cuts.append(p)
    if len(cuts) > 1:
        cuts[-1] = pts[-1]  # the last window's end, even when merged with a point just before
    return cuts


def _coarse_of(cuts: list[float], buckets: int) -> list[int]:
    """Indices into `cuts` of the coarse boundaries: about `buckets` equal stretches."""
    span = cuts[-1] - cuts[0]
    idx, nxt = [0], cuts[0] + span / buckets
    for i, c in enumerate(cuts[1:-1], 1):
        if c >= nxt:
            idx.append(i)
            nxt = c + span / buckets
    idx.append(len(cuts) - 1)
    return idx


def capacity_lp(ns: list[Need], gpus: int, cfg: BoundConfig) -> float:
    """The LP optimum: at most this many of `ns` meet their deadlines together."""
    import numpy as np
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    if not ns:
        return 0.0
    cuts = _fine_cuts(ns)
    if len(cuts) < 2:
        return float(len(ns))
    coarse = _coarse_of(cuts, cfg.coarse_buckets)
    coarse_of_fine = np.searchsorted(np.array(coarse), np.arange(len(cuts) - 1), side="right") - 1
    n_fine, n_coarse = len(cuts) - 1, len(coarse) - 1
    rows, cols, vals, obj, ub = [], [], [], [], []
    # Rows: 0..R-1 work per request, then fine buckets, then coarse buckets.
    R = len(ns)
    fine_row, coarse_row = R, R + n_fine

    def var(row_req: int, buckets: list[int], w: float, cap: float) -> None:
        j = len(obj)
        obj.append(-1.0 / w)
        ub.append(cap)
        rows.append(row_req)
        cols.append(j)
        vals.append(1.0)
        for b in buckets:
            rows.append(b)
            cols.append(j)
            vals.append(1.0)

    for i, n in enumerate(ns):
        hi = min(max(bisect.bisect_left(cuts, n.end - 1e-7), 1), len(cuts) - 1)
        lo = min(max(bisect.bisect_right(cuts, n.start + 1e-7) - 1, 0), hi - 1)
        if hi - lo <= cfg.short_buckets:
            for b in range(lo, hi):
                ov = min(n.end, cuts[b + 1]) - max(n.start, cuts[b])
                if ov > 0:
                    var(i, [fine_row + b, coarse_row + int(coarse_of_fine[b])], n.work,
                        n.rate * ov)
        else:
            for cb in range(int(coarse_of_fine[lo]), int(coarse_of_fine[hi - 1]) + 1):
                a, z = cuts[coarse[cb]], cuts[coarse[cb + 1]]
                ov = min(n.end, z) - max(n.start, a)
                if ov > 0:
                    var(i, [coarse_row + cb], n.work, n.rate * ov)
    b_ub = np.concatenate([
        np.array([n.work for n in ns]),
        gpus * np.diff(np.array(cuts)),
        gpus * np.array([cuts[coarse[c + 1]] - cuts[coarse[c]] for c in range(n_coarse)])])
    A = coo_matrix((vals, (rows, cols)), shape=(R + n_fine + n_coarse, len(obj))).tocsr()
    res = linprog(np.array(obj), A_ub=A, b_ub=b_ub, bounds=np.stack([np.zeros(len(ub)),
                                                                      np.array(ub)], axis=1),
                  method="highs")
    if res.status != 0:
        raise RuntimeError(f"bound LP: {res.message}")
    return -float(res.fun)


def upper_bound(requests: list[Request], cluster: Cluster, latency: LatencyModel,
                config: BoundConfig | None = None) -> Bound:
    """At most this many of `requests` meet their deadlines under any policy on `cluster`."""
    cfg = config or BoundConfig()
    cfg.validate()
    t0 = time.perf_counter()
    ns = needs(requests, cluster, latency)
    b = Bound(len(requests), len(ns), len(ns))
    # A request without a deadline is met whenever it ends: it constrains no one.
    free = sum(math.isinf(n.end) for n in ns)
    ns = [n for n in ns if not math.isinf(n.end)]
    if cfg.lp and ns:
        try:
            b.lp_value = capacity_lp(ns, cluster.num_gpus, cfg)
        except ImportError:
            b.note = "scipy missing: the capacity LP was skipped (alone bound only)"
        else:
            # The solver's tolerances (~1e-7 per constraint, over thousands of requests) must not
            # round a whole request away.
            b.met = free + min(len(ns), math.floor(b.lp_value + 0.01))
    b.seconds = time.perf_counter() - t0
    return b
