"""Experiments on the simulator: one run, a grid sweep, and fair tuning of baselines.

Each (workload point, policy) run is independent and seeded, so a sweep fans out over processes and
still gives the same JSON every time.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace

from .bound import upper_bound
from .executor import ExecResult
from .feedback import Corrected, Scaled, parse_factors
from .latency import Bandwidth, LatencyModel
from .metrics import summarize
from .policies import Cluster, make_policy
from .request import Request
from .sim import SimConfig, Simulator
from .workload import WorkloadConfig, generate, load_trace

BASELINES = ("fcfs", "sjf", "edf", "static", "tetriserve")
DEFAULT_POLICIES = BASELINES + ("genserve",)
ABLATIONS = ("genserve-nopreempt", "genserve-nosp", "genserve-nobatch")


@dataclass
class RunSpec:
    """Everything one simulation needs; plain data so it crosses process boundaries."""

    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    gpus: int = 8
    gpus_per_node: int = 8
    profile: str = "h200"
    intra_bw: float = 450e9
    cross_bw: float = 50e9
    trace: str | None = None
    horizon: float | None = None
    drain: bool = False
    # The policy plans with step times wrong by these factors (`feedback.parse_factors`: "1.3" or
    # "MODEL=F,..."), while the simulator executes with the profile's; `feedback` corrects them.
    profile_error: str | None = None
    feedback: bool = False

    def validate(self) -> None:
        if self.gpus < 1 or self.gpus_per_node < 1:
            raise ValueError(f"--gpus and --gpus-per-node must be >= 1, got {self.gpus}, "
                             f"{self.gpus_per_node}")
        if self.horizon is not None and self.drain:
            raise ValueError("--horizon and --drain exclude each other")
        if self.profile_error is not None:
            parse_factors(self.profile_error)
        Bandwidth(self.intra_bw, self.cross_bw).validate()
        if self.trace is None:
            self.workload.validate()

    def config_dict(self) -> dict:
        d = asdict(self)
        if self.trace:
            d.pop("workload")
        return d


_LATENCY_CACHE: dict[tuple, LatencyModel] = {}


def latency_for(spec: RunSpec) -> LatencyModel:
    key = (spec.profile, spec.intra_bw, spec.cross_bw)
    if key not in _LATENCY_CACHE:
        _LATENCY_CACHE[key] = LatencyModel(spec.profile,
                                           bandwidth=Bandwidth(spec.intra_bw, spec.cross_bw))
    return _LATENCY_CACHE[key]


def requests_for(spec: RunSpec) -> list[Request]:
    if spec.trace:
        return load_trace(spec.trace)[0]
    return generate(spec.workload, latency_for(spec), spec.gpus)


def belief_for(spec: RunSpec) -> LatencyModel:
    """What the policy plans with: the profile, wrong by `profile_error`, corrected by feedback."""
    lat = latency_for(spec)
    if spec.profile_error is not None:
        lat = Scaled(lat, *parse_factors(spec.profile_error))
    return Corrected(lat) if spec.feedback else lat


def simulate_one(spec: RunSpec, policy: str) -> ExecResult:
    """Simulate one policy on the spec's workload; the whole result (requests, every quantum:
    what `simulate --timeline` draws)."""
    truth, belief = latency_for(spec), belief_for(spec)
    sim = Simulator(Cluster(spec.gpus, spec.gpus_per_node), belief, make_policy(policy),
                    SimConfig(horizon=spec.horizon, drain=spec.drain),
                    truth=None if belief is truth else truth)
    return sim.run(requests_for(spec))


def run_one(spec: RunSpec, policy: str) -> dict:
    """Simulate one policy on the spec's workload; returns the metrics summary."""
    return summarize(simulate_one(spec, policy))


BOUND = "bound"  # in a job list: the spec's upper bound instead of a policy's run


def bound_one(spec: RunSpec) -> dict:
    """The upper bound on SLO attainment for the spec's trace and cluster (genserve/bound.py)."""
    return upper_bound(requests_for(spec), Cluster(spec.gpus, spec.gpus_per_node),
                       latency_for(spec)).as_dict()


def _run_star(args: tuple[RunSpec, str]) -> dict:
    spec, policy = args
    return bound_one(spec) if policy == BOUND else run_one(spec, policy)


def run_many(jobs: list[tuple[RunSpec, str]], workers: int | None = None) -> list[dict]:
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(jobs) <= 1:
        return [_run_star(j) for j in jobs]
    with ProcessPoolExecutor(workers) as ex:
        return list(ex.map(_run_star, jobs, chunksize=1))


def tune_grid(policy: str, gpus: int) -> list[str]:
    """The free parameter of each baseline, swept so that it is compared at its best."""
    sps = [0] + [k for k in (1, 2, 4, 8) if k <= gpus]
    if policy in ("fcfs", "sjf", "edf"):
        return [policy] + [f"{policy}:video_sp={k}" for k in sps[1:]]
    if policy == "static":
        if gpus < 2:
            return []
        return [f"static:image_gpus={n},order={o}" for n in range(1, gpus) for o in ("fcfs", "edf")]
    if policy == "tetriserve":
        return ["tetriserve", "tetriserve:round_s=2.0"]
    return [policy]


def base_name(policy: str) -> str:
    return policy.partition(":")[0]


def sweep(spec: RunSpec, over: str, values: list[float], policies: list[str], tune: bool,
          workers: int | None = None, bound: bool = False) -> dict:
    """Run every policy at every value of `over` (rate or slo_scale).

    With `tune`, each baseline runs over its grid and the point reports its best setting.
    Returns {"points": [{over: v, "policies": {name: summary + "param" (the setting that won)}}]},
    each point with "bound" (`bound_one`) when `bound` is set.
    """
    if over not in ("rate", "slo_scale"):
        raise ValueError(f"--over must be rate or slo-scale, got {over!r}")
    jobs: list[tuple[RunSpec, str]] = []
    owners: list[tuple[int, str]] = []
    for i, v in enumerate(values):
        point = replace(spec, workload=replace(spec.workload, **{over: v}))
        for name in policies:
            grid = tune_grid(name, spec.gpus) if tune else [name]
            for p in grid or [name]:
                jobs.append((point, p))
                owners.append((i, name))
        if bound:
            jobs.append((point, BOUND))
            owners.append((i, BOUND))
    results = run_many(jobs, workers)
    points = [{over: v, "policies": {}} for v in values]
    for (i, name), (_, p), res in zip(owners, jobs, results):
        if name == BOUND:
            points[i]["bound"] = res
            continue
        best = points[i]["policies"].get(name)
        res = {**res, "param": p}
        if best is None or res["slo_attainment"] > best["slo_attainment"]:
            points[i]["policies"][name] = res
    return {"over": over, "points": points}


def plot_sweep(result: dict, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    over = result["over"]
    xs = [p[over] for p in result["points"]]
    names = list(result["points"][0]["policies"]) if result["points"] else []
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in names:
        ys = [p["policies"][n]["slo_attainment"] for p in result["points"]]
        ax.plot(xs, ys, marker="o", label=n, linewidth=2.5 if n == "genserve" else 1.2)
    if result["points"] and "bound" in result["points"][0]:
        ax.plot(xs, [p["bound"]["slo_attainment"] for p in result["points"]], color="black",
                linestyle="--", linewidth=1.5, label="upper bound (any policy)")
    ax.set_xlabel("request rate (req/s)" if over == "rate" else "SLO scale")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
