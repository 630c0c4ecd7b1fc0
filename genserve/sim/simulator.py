"""Discrete-event simulator: the virtual-clock executor.

A heap of (time, kind, seq, payload) events; handlers mutate requests only through their named
transitions.  At every decision point (arrivals, quanta done, a policy's wake-up) the simulator asks
the policy for a Plan, validates it, and turns each assignment into a QUANTUM_DONE event whose time
comes from the latency model: dispatch + move/re-shard costs + encode (first step) + steps x
batched step time + decode (members that finish).  The policy code is the same that drives the real engine.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from ..latency import LatencyModel
from ..policies.base import Assignment, Cluster, InFlight, Plan, Policy, SchedulerState
from ..policies.common import tokens_of
from ..request import Request, Status

log = logging.getLogger("genserve.sim")

# Kinds order events at equal times: work finishing frees GPUs before arrivals are planned.
QUANTUM_DONE, ARRIVAL, WAKE = 0, 1, 2


class PlanError(RuntimeError):
    """The policy returned a plan that cannot be carried out (a policy bug)."""


def validate_assignment(a: Assignment, free: set[int], queue: dict[str, Request],
                        latency: LatencyModel) -> list[Request]:
    """The checks every executor (simulated or real) applies to a policy's assignment; returns the
    member requests.  Raises PlanError: a bad plan is a policy bug, never silently fixed."""
    if not a.gpus or not a.requests or a.steps < 1:
        raise PlanError(f"empty or zero-step assignment {a}")
    if len(set(a.gpus)) != len(a.gpus) or not free.issuperset(a.gpus):
        raise PlanError(f"assignment uses busy or duplicate GPUs {a.gpus} (free: {sorted(free)})")
    members = []
    for rid in a.requests:
        r = queue.get(rid)
        if r is None:
            raise PlanError(f"request {rid!r} is not plannable now (unknown, running or done)")
        members.append(r)
    if len(set(a.requests)) != len(a.requests):
        raise PlanError(f"request listed twice in {a}")
    lead = members[0]
    if any(r.shape != lead.shape for r in members):
        raise PlanError(f"incompatible batch {a.requests}: shapes differ")
    if a.steps > min(r.remaining_steps for r in members):
        raise PlanError(f"{a.steps} steps exceed a member's remaining steps in {a.requests}")
    if len(a.gpus) not in latency.degrees(lead.model):
        raise PlanError(f"SP degree {len(a.gpus)} not allowed for {lead.model}")
    return members


def place_members(members: list[Request], gpus: tuple[int, ...], now: float,
                  queue: dict[str, Request]) -> int:
    """Move a validated assignment's requests onto `gpus` (start, resume or stay running) and out
    of the plannable queue; returns how many had their state on another GPU set."""
    moved = 0
    for r in members:
        if r.gpus and set(r.gpus) != set(gpus):
            moved += 1
        if r.status is Status.WAITING:
            r.start(now, gpus)
        elif r.status is Status.PREEMPTED:
            r.resume(now, gpus)
        else:
            r.move_to(gpus)
        del queue[r.id]
    return moved


def pause_unplanned(queue: dict[str, Request], now: float) -> int:
    """Requests that ran the last quantum and were not re-planned are paused; returns how many."""
    n = 0
    for r in queue.values():
        if r.status is Status.RUNNING:
            r.preempt(now)
            n += 1
    return n


def count_reasons(plan: Plan, last: dict[str, str], counter: Counter, now: float) -> None:
    """Count each change of a request's defer reason once (not once per decision)."""
    for rid, why in plan.reasons.items():
        if last.get(rid) != why:
            last[rid] = why
            counter[why] += 1
            log.debug("t=%.3f %s deferred: %s", now, rid, why)


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


@dataclass
class SimResult:
    requests: list[Request]
    num_gpus: int
    busy_gpu_s: float
    end_time: float
    decisions: int
    preemptions: int
    migrations: int
    reasons: Counter = field(default_factory=Counter)
    decision_wall_s: list[float] = field(default_factory=list)
    # Quanta started, and those (and their GPU-seconds) whose GPUs span nodes.  None where the
    # executor does not count them (the real engine).
    quanta: int | None = None
    cross_node_quanta: int | None = None
    cross_node_gpu_s: float | None = None


class Simulator:
    def __init__(self, cluster: Cluster, latency: LatencyModel, policy: Policy,
                 config: SimConfig | None = None):
        self.cluster, self.latency, self.policy = cluster, latency, policy
        self.config = config or SimConfig()
        self.config.validate()

    def run(self, requests: list[Request]) -> SimResult:
        heap: list[tuple[float, int, int, object]] = []
        seq = 0
        for r in sorted(requests, key=lambda r: (r.arrival, r.id)):
            heap.append((r.arrival, ARRIVAL, seq, r))
            seq += 1
        heapq.heapify(heap)
        by_id = {r.id: r for r in requests}
        if len(by_id) != len(requests):
            raise ValueError("request ids must be unique")
        free = set(range(self.cluster.num_gpus))
        queue: dict[str, Request] = {}          # active, not in flight
        inflight: dict[int, InFlight] = {}      # keyed by event seq
        busy = cross_busy = 0.0
        decisions = preemptions = migrations = quanta = cross_quanta = 0
        reasons: Counter = Counter()
        walls: list[float] = []
        now = 0.0
        pending_wake: float | None = None
        horizon = self.config.horizon
        if horizon is None and not self.config.drain and requests:
            horizon = max(r.deadline for r in requests)
        last_reason: dict[str, str] = {}

        while heap:
            now = heap[0][0]
            if horizon is not None and now > horizon:
                now = horizon
                break
            while heap and heap[0][0] == now:
                _, kind, key, payload = heapq.heappop(heap)
                if kind == ARRIVAL:
                    queue[payload.id] = payload
                elif kind == QUANTUM_DONE:
                    job, steps = inflight.pop(key), payload
                    free.update(job.gpus)
                    for rid in job.requests:
                        r = by_id[rid]
                        r.advance(steps)
                        if r.remaining_steps == 0:
                            r.finish(now)
                        else:
                            queue[rid] = r
                elif kind == WAKE and pending_wake == now:
                    pending_wake = None
            if not queue or not free:
                continue
            state = SchedulerState(
                now=now, cluster=self.cluster, free_gpus=tuple(sorted(free)),
                queue=list(queue.values()), inflight=list(inflight.values()),
                latency=self.latency,
                running=[by_id[i] for j in inflight.values() for i in j.requests])
            t0 = time.perf_counter()
            plan = self.policy.schedule(state)
            if self.config.time_decisions:
                walls.append(time.perf_counter() - t0)
            decisions += 1
            count_reasons(plan, last_reason, reasons, now)
            for a in plan.assignments:
                dur, moved = self._start(a, now, free, queue, by_id)
                migrations += moved
                busy += dur * len(a.gpus)
                quanta += 1
                if self.cluster.spans_nodes(a.gpus):
                    cross_quanta += 1
                    cross_busy += dur * len(a.gpus)
                inflight[seq] = InFlight(a.gpus, a.requests, now + dur)
                heapq.heappush(heap, (now + dur, QUANTUM_DONE, seq, a.steps))
                seq += 1
            preemptions += pause_unplanned(queue, now)
            if plan.wake_at is not None and plan.wake_at > now and (
                    pending_wake is None or plan.wake_at < pending_wake):
                pending_wake = plan.wake_at
                heapq.heappush(heap, (plan.wake_at, WAKE, seq, None))
                seq += 1
            if not heap and queue:
                raise PlanError(f"policy {self.policy.describe()} stalled at t={now:.3f}: "
                                f"{len(queue)} requests wait, {len(free)} GPUs idle, nothing runs")
        for job in inflight.values():  # horizon cut: count the part that ran
            busy -= (job.end - now) * len(job.gpus)
            if self.cluster.spans_nodes(job.gpus):
                cross_busy -= (job.end - now) * len(job.gpus)
        return SimResult(requests=list(requests), num_gpus=self.cluster.num_gpus, busy_gpu_s=busy,
                         end_time=now, decisions=decisions, preemptions=preemptions,
                         migrations=migrations, reasons=reasons, decision_wall_s=walls,
                         quanta=quanta, cross_node_quanta=cross_quanta, cross_node_gpu_s=cross_busy)

    def _start(self, a: Assignment, now: float, free: set[int], queue: dict[str, Request],
               by_id: dict[str, Request]) -> tuple[float, int]:
        """Validate one assignment, start it, and return (duration, number of state moves)."""
        members = validate_assignment(a, free, queue, self.latency)
        lead = members[0]
        k = len(a.gpus)
        lat = self.latency
        cross = self.cluster.spans_nodes(a.gpus)
        # As the engine does it: one job round trip; new members encoded one by one inside the
        # job; moved states fetched one by one before it.
        setup = lat.dispatch_time()
        for r in members:
            if r.steps_done == 0 and r.status is Status.WAITING:
                setup += lat.encode_time(r.model)
            if r.gpus and set(r.gpus) != set(a.gpus):
                setup += lat.move_time(r, self.cluster.spans_nodes(r.gpus + a.gpus))
        moved = place_members(members, a.gpus, now, queue)
        free.difference_update(a.gpus)
        dur = setup + a.steps * lat.step_time(lead.model, tokens_of(lead), len(members), k, cross)
        dur += sum(lat.decode_time(r.model, r.height, r.width, r.frames)
                   for r in members if r.remaining_steps == a.steps)
        return dur, moved
