"""The policy interface: scheduler state in, a Plan out, chosen by name.

A policy never touches torch, files or clocks: the engine (simulated or real) builds a
`SchedulerState` (plain data), calls `schedule`, validates the returned `Plan` and carries it out.
A policy is not a pure function, though: it may remember things between calls (a window of recent
arrivals, which videos it admitted), so the same state can get a different plan from a policy that
has seen a different past.  Such memory lives in one explicit object on the policy (e.g.
`GenServe.memory`) and is fed only by the states it is called with, so the same policy drives the
simulator and the real engine; use a fresh policy object per run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, get_type_hints

from ..latency import LatencyModel
from ..request import Request


@dataclass(frozen=True)
class Cluster:
    """GPUs 0..num_gpus-1 and the node each sits on: `nodes[g]` when given (a Ray cluster's real
    layout, nodes of any size), else `g // gpus_per_node` (a uniform simulated cluster)."""

    num_gpus: int
    gpus_per_node: int = 8
    nodes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_gpus < 1 or self.gpus_per_node < 1:
            raise ValueError(f"cluster needs >= 1 GPU and >= 1 GPU per node, got "
                             f"{self.num_gpus} GPUs, {self.gpus_per_node} per node")
        if self.nodes and len(self.nodes) != self.num_gpus:
            raise ValueError(f"cluster: nodes names {len(self.nodes)} GPUs' nodes, but there are "
                             f"{self.num_gpus} GPUs")

    def node(self, gpu: int) -> int:
        return self.nodes[gpu] if self.nodes else gpu // self.gpus_per_node

    def spans_nodes(self, gpus: tuple[int, ...]) -> bool:
        return len({self.node(g) for g in gpus}) > 1

    def node_sizes(self) -> dict[int, int]:
        sizes: dict[int, int] = {}
        for g in range(self.num_gpus):
            sizes[self.node(g)] = sizes.get(self.node(g), 0) + 1
        return sizes


@dataclass(frozen=True)
class Assignment:
    """Run `steps` denoising steps of a batch of compatible requests on a GPU set: Ulysses over all
    of `gpus`, or with `cfg_split` the two branches of classifier-free guidance side by side, each
    on half of the set (sorted: the lower half unconditional, the upper conditional) with Ulysses
    inside the half, exchanging only the noise predictions every step."""

    gpus: tuple[int, ...]
    requests: tuple[str, ...]
    steps: int
    cfg_split: bool = False


@dataclass
class Plan:
    assignments: list[Assignment] = field(default_factory=list)
    # Machine-readable reason for each active request left unserved at this decision point.
    reasons: dict[str, str] = field(default_factory=dict)
    # Ask to be called again at this time even if nothing else happens (a policy that holds GPUs
    # idle on purpose must say when to look again).
    wake_at: float | None = None


@dataclass(frozen=True)
class InFlight:
    """A quantum already running: its GPUs are busy until `end`, its requests can't be re-planned."""

    gpus: tuple[int, ...]
    requests: tuple[str, ...]
    end: float


@dataclass
class SchedulerState:
    now: float
    cluster: Cluster
    free_gpus: tuple[int, ...]
    # Active requests that can be planned now: WAITING, PREEMPTED, or RUNNING between two quanta.
    queue: list[Request]
    inflight: list[InFlight]
    latency: LatencyModel
    # Requests inside `inflight`, for policies that reason about everything in the system.
    running: list[Request] = field(default_factory=list)


# Reasons a request is not served at a decision point (exported as metrics).
NO_GPU = "no_free_gpu"
QUEUED_BEHIND = "queued_behind_head"
PREEMPTED_FOR_URGENT = "preempted_for_urgent"
BEST_EFFORT = "best_effort_deadline_unreachable"
NOT_ADMITTED = "not_admitted_capacity"
HELD_FOR_EARLIER = "gpus_held_for_earlier_video"
WRONG_POOL = "pool_full"


class Policy(ABC):
    name: ClassVar[str] = "?"
    # Accepted parameters and their types; `NAME:key=value` strings are parsed against this.
    params: ClassVar[dict[str, type]] = {}
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any):
        unknown = set(params) - set(self.params)
        if unknown:
            allowed = ", ".join(sorted(self.params)) or "none"
            raise ValueError(f"policy {self.name}: unknown parameter(s) {sorted(unknown)}; "
                             f"allowed: {allowed}")
        self.config = {**self.defaults, **params}

    @abstractmethod
    def schedule(self, state: SchedulerState) -> Plan:
        """Return the assignments to start now on free GPUs (and may update the policy's memory)."""

    def describe(self) -> str:
        ps = {k: v for k, v in self.config.items() if self.defaults.get(k, object()) != v}
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in ps.items()) if ps else "")


_REGISTRY: dict[str, tuple[type[Policy], dict[str, Any]]] = {}


def register(name: str, **preset: Any) -> Callable[[type[Policy]], type[Policy]]:
    """Register a policy class under `name`, optionally with preset parameters (ablations)."""

    def deco(cls: type[Policy]) -> type[Policy]:
        if name in _REGISTRY:
            raise ValueError(f"policy {name!r} registered twice")
        _REGISTRY[name] = (cls, preset)
        return cls

    return deco


def typed_params(params_cls: type) -> tuple[dict[str, type], dict[str, Any]]:
    """`Policy.params` and `Policy.defaults` read off a dataclass of parameters, so a policy can
    keep its parameters typed (one field each, with its default) and still be built from
    `NAME:key=value` strings."""
    hints = get_type_hints(params_cls)
    fs = fields(params_cls)
    return {f.name: hints[f.name] for f in fs}, {f.name: f.default for f in fs}


def policy_names() -> list[str]:
    return list(_REGISTRY)


def _parse_value(key: str, raw: str, typ: type, policy: str) -> Any:
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return typ(raw)
    except ValueError:
        raise ValueError(f"policy {policy}: {key}={raw!r} is not a valid {typ.__name__}") from None


def make_policy(spec: str) -> Policy:
    """Build a policy from `NAME` or `NAME:key=value,key=value`."""
    name, _, rest = spec.strip().partition(":")
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(_REGISTRY)}")
    cls, preset = _REGISTRY[name]
    params: dict[str, Any] = dict(preset)
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"policy {name}: parameter {item!r} must look like key=value")
        if key not in cls.params:
            allowed = ", ".join(sorted(cls.params)) or "none"
            raise ValueError(f"policy {name}: unknown parameter {key!r}; allowed: {allowed}")
        params[key] = _parse_value(key, raw, cls.params[key], name)
    pol = cls(**params)
    pol.name = name  # ablation variants share a class but keep their own name
    pol.spec = spec.strip()
    return pol
