"""The simulator: the executor core on a virtual clock.

Its backend completes every quantum exactly at the end the core predicted for it
(`quantum_cost`: dispatch + moves + encode of new members + steps x batched step time + decode of
members that finish), so the clock jumps from event to event.  The loop, the checks and the
policy are the real engine's (`genserve.executor`).

With a `truth` latency model the backend completes quanta when *it* says instead, while the core
and the policy keep planning with theirs: a profile that is wrong, or one that corrects itself
from what it observes (`genserve.feedback`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from ..executor import (Backend, Ended, ExecResult, ExecutorCore, PlanError, Quantum, Stepped,
                        quantum_cost)
from ..executor.clock import VirtualClock
from ..latency import LatencyModel
from ..policies.base import Cluster, Policy
from ..request import Request

__all__ = ["PlanError", "SimConfig", "Simulator"]


@dataclass
class SimConfig:
    # Stop the clock here; requests not finished by then count as missed (unfinished).  None stops
    # at the last deadline (after it, nothing can change SLO attainment), unless `drain` is set.
    horizon: float | None = None
    # Run until every request has finished (for latency figures of late requests).
    drain: bool = False
    # Keep wall-clock time of each policy call (for the decision-time benchmark).
    time_decisions: bool = False

    def validate(self) -> None:
        if self.horizon is not None and self.horizon <= 0:
            raise ValueError(f"horizon must be > 0 seconds, got {self.horizon}")



class ModelBackend(Backend):
    """Quanta complete at their predicted end (or at the end `truth` gives them); every member
    advances by the quantum's steps."""

    def __init__(self, clock: VirtualClock, truth: LatencyModel | None = None):
        self.clock, self.truth = clock, truth
        self._ends: list[tuple[float, int, float, Quantum]] = []

    def source(self, a, members: list[Request], now: float) -> object:
        # Before the members are placed: the true cost reads where their states are, as the core's.
        return () if self.truth is None else quantum_cost(a, members, self.core.cluster,
                                                          self.truth)

    def start(self, q: Quantum, members: list[Request], sourced: object) -> bool:
        cost = q.cost if self.truth is None else sourced
        heapq.heappush(self._ends, (q.start + cost, q.key, cost, q))
        return True

    def ended(self, now: float) -> list[Ended]:
        out = []
        while self._ends and self._ends[0][0] <= now:
            _, _, cost, q = heapq.heappop(self._ends)
            out.append(Ended(q.key, cost, {
                rid: Stepped(self.core.by_id[rid].steps_done + q.assignment.steps)
                for rid in q.requests}))
        return out

    def next_end(self) -> float | None:
        return self._ends[0][0] if self._ends else None

    def wait(self, until: float | None) -> None:
        if until is not None:
            self.clock.advance_to(until)


class Simulator:
    def __init__(self, cluster: Cluster, latency: LatencyModel, policy: Policy,
                 config: SimConfig | None = None, truth: LatencyModel | None = None):
        """`latency`: what the core and the policy plan with; `truth`: how long quanta really
        take (default: `latency`)."""
        self.cluster, self.latency, self.policy, self.truth = cluster, latency, policy, truth
        self.config = config or SimConfig()
        self.config.validate()

    def run(self, requests: list[Request]) -> ExecResult:
        if len({r.id for r in requests}) != len(requests):
            raise ValueError("request ids must be unique")
        clock = VirtualClock()
        core = ExecutorCore(self.cluster, self.latency, self.policy,
                            ModelBackend(clock, self.truth), clock,
                            time_decisions=self.config.time_decisions)
        for r in sorted(requests, key=lambda r: (r.arrival, r.id)):
            core.add(r)
        core.res.requests = list(requests)
        horizon = self.config.horizon
        if horizon is None and not self.config.drain and requests:
            horizon = max(r.deadline for r in requests)
        core.run(core.idle, horizon)
        return core.res
