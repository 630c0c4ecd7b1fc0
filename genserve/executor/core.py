"""The executor core: one loop for the simulator and the real engine.

The core owns everything that does not depend on how work is carried out: arrivals, the
plannable queue, free GPUs, the quanta in flight, the `SchedulerState` handed to the policy,
decision timing, plan validation, pausing, reason counting, stall detection, and the counters of
the result.  A `Backend` carries quanta out and reports, for each one that ended, what happened
to each member (`Stepped`, `Failed`, `Cancelled`, `RolledBack`).  The simulator's backend
completes a quantum at its predicted end on a virtual clock; the engine's runs it on workers on
the real clock.  Each turn of the loop:

1. quanta that ended are applied (GPUs freed, members advanced, finished, failed, re-queued);
2. the backend's own events (the engine: cancels, dead workers) are taken;
3. arrivals and the policy's wake-ups that are due are taken;
4. if anything changed and there is work and a free GPU, the policy plans and the plan starts;
5. the backend waits for the next due time or the next quantum to end.

Events at equal times are applied in that order (work that ends frees its GPUs before arrivals
are planned), so a run is a pure function of its inputs on the virtual clock.
"""

from __future__ import annotations

import heapq
import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from ..latency import LatencyModel
from ..policies.base import Assignment, Cluster, Policy, SchedulerState
from ..request import Request
from .quanta import (PlanError, Quantum, count_reasons, pause_unplanned, place_members,
                     quantum_parts, validate_assignment)


# ----- what a backend reports for each member of a quantum that ended -----
@dataclass(frozen=True)
class Stepped:
    """The member's state is now at `steps_done`; `output` is its result if it finished."""

    steps_done: int
    output: object = None


@dataclass(frozen=True)
class Finishing:
    """Every step is done and the GPUs are free, but the output is still on its way (encoded on
    the worker): the member stays RUNNING, off the queue, until the backend calls
    `ExecutorCore.complete` (or ends or rolls it back)."""

    steps_done: int


@dataclass(frozen=True)
class Failed:
    reason: str


@dataclass(frozen=True)
class Cancelled:
    pass


@dataclass(frozen=True)
class RolledBack:
    """The member's state was lost: it resumes from a checkpoint at `steps_done` (0: anew)."""

    steps_done: int


Outcome = Stepped | Finishing | Failed | Cancelled | RolledBack


@dataclass(frozen=True)
class Ended:
    """A quantum that ended: how long it held its GPUs, and each member's outcome."""

    key: int
    ran_s: float
    outcomes: dict[str, Outcome]


@dataclass
class ExecResult:
    requests: list[Request]
    num_gpus: int
    busy_gpu_s: float
    end_time: float
    decisions: int
    preemptions: int
    migrations: int
    reasons: Counter = field(default_factory=Counter)
    decision_wall_s: list[float] = field(default_factory=list)  # the policy's call
    # A whole decision: the policy's call, plan validation, sourcing and dispatch of every
    # assignment (wall seconds), and how many requests were known then (queued or running).
    decide_wall_s: list[float] = field(default_factory=list)
    decide_load: list[int] = field(default_factory=list)
    # Per quantum that ended: (predicted cost, clock seconds it held its GPUs, steps planned).
    quanta_log: list[tuple[float, float, int]] = field(default_factory=list)
    # Quanta started, and those (and their GPU-seconds) whose GPUs span nodes.
    quanta: int = 0
    cross_node_quanta: int = 0
    cross_node_gpu_s: float = 0.0
    recovered: int = 0       # requests rolled back to a checkpoint (or the start) after a loss
    # With `keep`: every quantum that ran, as (start, end, assignment), in the order they ended
    # (those cut by the horizon last, ending there): what `genserve.timeline` draws.  The
    # assignment is the policy's own object (GPUs, members, steps, CFG split), not a copy.
    quanta_record: list[tuple[float, float, Assignment]] = field(default_factory=list)


class Backend(ABC):
    """How quanta are carried out.  `core` is set by `ExecutorCore` when the backend joins it."""

    core: "ExecutorCore"

    def take_external(self) -> None:
        """Bring in what other threads handed over (submitted requests) via `core.add`."""

    def events(self, now: float) -> bool:
        """Apply the backend's own events (cancels, lost workers); returns whether any."""
        return False

    def unavailable(self) -> set[int]:
        """GPUs the policy must not plan on now (workers being replaced)."""
        return set()

    def expecting(self) -> bool:
        """Whether something may change that the core does not know the time of (a worker
        coming back): while so, an idle queue is not a stall."""
        return False

    def source(self, a: Assignment, members: list[Request], now: float) -> object | None:
        """Get ready to run `a` (before its members are placed): returns what `start` needs, or
        None to skip this assignment (a GPU was found dead) and plan again."""
        return ()

    @abstractmethod
    def start(self, q: Quantum, members: list[Request], sourced: object) -> bool:
        """Carry `q` out without blocking; False: it could not be dispatched, and its members
        were already rolled back (the core plans again)."""

    @abstractmethod
    def ended(self, now: float) -> list[Ended]:
        """Quanta that ended by `now` (without blocking)."""

    @abstractmethod
    def wait(self, until: float | None) -> None:
        """Block (or advance the clock) until `until` or until a quantum may have ended."""

    def next_end(self) -> float | None:
        """When the next quantum ends, if the backend knows it (the virtual clock)."""
        return None

    def on_end(self, r: Request) -> None:
        """`r` reached a final status: forget what the backend keeps for it."""


class ExecutorCore:
    def __init__(self, cluster: Cluster, latency: LatencyModel, policy: Policy, backend: Backend,
                 now: Callable[[], float], *, time_decisions: bool = True,
                 listener: Callable[[Request, object], None] | None = None, keep: bool = True,
                 result: ExecResult | None = None):
        """`now`: the clock (virtual or real).  `listener(request, output)` is told of every
        change of a request (arrived, ran, paused, ended; `output` when it finished).  With
        `keep=False` ended requests are forgotten after the listener saw them (a server).
        `result`: the object the run's counters go to (an executor's own subclass)."""
        self.cluster, self.latency, self.policy = cluster, latency, policy
        self.backend, self.now = backend, now
        self.time_decisions, self.listener, self.keep = time_decisions, listener, keep
        backend.core = self
        self.by_id: dict[str, Request] = {}
        self.arrivals: list[tuple[float, str]] = []
        self.queue: dict[str, Request] = {}         # active, not in flight
        self.inflight: dict[int, Quantum] = {}
        self.finishing: dict[str, Request] = {}     # off the GPUs, output on its way
        self.free = set(range(cluster.num_gpus))
        self.wakes: list[float] = []                # every wake-up asked for (stale ones too)
        self._pending_wake: float | None = None
        self._last_reason: dict[str, str] = {}
        self._next_key = 0
        self.replan = False
        # A self-correcting latency model (`feedback.Corrected`) learns from every quantum.
        self._observe = getattr(latency, "observe", None)
        self.res = result or ExecResult(requests=[], num_gpus=cluster.num_gpus, busy_gpu_s=0.0,
                                        end_time=0.0, decisions=0, preemptions=0, migrations=0)

    # ----- requests -----
    def add(self, r: Request) -> None:
        if r.id in self.by_id:
            raise ValueError(f"request id {r.id!r} is already in the engine")
        self.by_id[r.id] = r
        heapq.heappush(self.arrivals, (r.arrival, r.id))

    def notify(self, r: Request, output=None) -> None:
        if self.listener is not None:
            self.listener(r, output)
        if r.is_final and not self.keep:
            self.by_id.pop(r.id, None)

    def end(self, r: Request, now: float, failed: str | None = None,
            cancelled: bool = False) -> None:
        """End a request that is not in flight (or whose quantum just ended)."""
        if failed is not None:
            r.fail(now, failed)
        elif cancelled:
            r.cancel(max(now, r.arrival))  # cancelled before it arrived: at its arrival
        self.queue.pop(r.id, None)
        self.finishing.pop(r.id, None)
        self.backend.on_end(r)
        self.notify(r)

    def complete(self, r: Request, now: float, output) -> None:
        """A request every step of which is done has its output: it finishes."""
        self.finishing.pop(r.id, None)
        r.finish(now)
        self.backend.on_end(r)
        self.notify(r, output)

    def roll_back(self, r: Request, now: float, steps_done: int) -> None:
        """`r`'s state is lost: back to a checkpoint at `steps_done` (0: anew), plannable."""
        self.finishing.pop(r.id, None)
        r.rollback(now, steps_done)
        self.res.recovered += 1
        self.queue[r.id] = r
        self.notify(r)

    def in_flight(self, rid: str) -> Quantum | None:
        return next((q for q in self.inflight.values() if rid in q.requests), None)

    # ----- the loop -----
    def run(self, done: Callable[[], bool], horizon: float | None = None) -> None:
        """Turn until `done()`; with a `horizon`, stop the clock there (virtual clock only)."""
        while True:
            self.backend.take_external()
            while self.arrivals:  # drop those cancelled before they arrived
                r = self.by_id.get(self.arrivals[0][1])
                if r is not None and not r.is_final:
                    break
                heapq.heappop(self.arrivals)
            if done():
                break
            now = self.now()
            changed, self.replan = self.replan, False
            for e in self.backend.ended(now):
                self._apply(e, now)
                changed = True
            if self.backend.events(now):
                changed = True
            while self.arrivals and self.arrivals[0][0] <= now:
                r = self.by_id.get(heapq.heappop(self.arrivals)[1])
                if r is None or r.is_final:  # cancelled before it arrived (just now)
                    continue
                self.queue[r.id] = r
                self.notify(r)
                changed = True
            while self.wakes and self.wakes[0] <= now:
                if heapq.heappop(self.wakes) == self._pending_wake:
                    self._pending_wake = None
                changed = True
            if changed and self.queue and self.free - self.backend.unavailable():
                self._decide(now)
            if self.queue and not (self.arrivals or self.inflight or self.wakes or self.replan
                                   or self.finishing or self.backend.expecting()):
                raise PlanError(f"policy {self.policy.describe()} stalled at t={now:.3f}: "
                                f"{len(self.queue)} requests wait, nothing runs")
            due = [t for t in (self.arrivals[0][0] if self.arrivals else None,
                               self.wakes[0] if self.wakes else None,
                               self.backend.next_end()) if t is not None]
            t_next = min(due) if due else None
            if horizon is not None and t_next is not None and t_next > horizon:
                self.backend.wait(horizon)
                break
            self.backend.wait(t_next)
        self._close(self.now())

    def idle(self) -> bool:
        """Nothing will ever happen again without a new request."""
        return not (self.arrivals or self.inflight or self.wakes)

    def drained(self) -> bool:
        """Every request known has ended."""
        return not (self.arrivals or self.queue or self.inflight or self.finishing)

    def _close(self, now: float) -> None:
        for q in self.inflight.values():  # horizon cut: count the part that ran
            self.res.busy_gpu_s -= (q.end - now) * len(q.gpus)
            if self.keep:
                self.res.quanta_record.append((q.start, now, q.assignment))
            if q.cross_node:
                self.res.cross_node_gpu_s -= (q.end - now) * len(q.gpus)
        self.res.end_time = now

    # ----- decisions -----
    def _decide(self, now: float) -> None:
        t_in = time.perf_counter()
        free = self.free - self.backend.unavailable()
        state = SchedulerState(
            now=now, cluster=self.cluster, free_gpus=tuple(sorted(free)),
            queue=list(self.queue.values()),
            inflight=[q.in_flight() for q in self.inflight.values()], latency=self.latency,
            running=[self.by_id[rid] for q in self.inflight.values() for rid in q.requests])
        t0 = time.perf_counter()
        self.res.decisions += 1
        plan = self.policy.schedule(state)
        if self.time_decisions:
            self.res.decision_wall_s.append(time.perf_counter() - t0)
        self._carry_out(plan, free, now)
        if self.time_decisions and self.keep:
            self.res.decide_wall_s.append(time.perf_counter() - t_in)
            self.res.decide_load.append(len(state.queue) + len(state.running))

    def _carry_out(self, plan, free: set[int], now: float) -> None:
        count_reasons(plan, self._last_reason, self.res.reasons, now)
        for a in plan.assignments:
            members = validate_assignment(a, free, self.queue, self.latency)
            sourced = self.backend.source(a, members, now)
            if sourced is None:
                self.replan = True
                continue
            other, steps, key = quantum_parts(a, members, self.cluster, self.latency)
            q = Quantum(self._next_key, a, now, other + steps, self.cluster.spans_nodes(a.gpus),
                        steps, key)
            self._next_key += 1
            self.res.migrations += place_members(members, a.gpus, now, self.queue)
            if not self.backend.start(q, members, sourced):
                self.replan = True
                continue
            self.inflight[q.key] = q
            self.free.difference_update(a.gpus)
            free.difference_update(a.gpus)
            self._count_start(q)
            for m in members:
                self.notify(m)
        paused = pause_unplanned(self.queue, now)
        self.res.preemptions += len(paused)
        for r in paused:
            self.notify(r)
        if plan.wake_at is not None and plan.wake_at > now and (
                self._pending_wake is None or plan.wake_at < self._pending_wake):
            self._pending_wake = plan.wake_at
            heapq.heappush(self.wakes, plan.wake_at)

    def _count_start(self, q: Quantum) -> None:
        k = len(q.gpus)
        self.res.quanta += 1
        self.res.busy_gpu_s += q.cost * k
        if q.cross_node:
            self.res.cross_node_quanta += 1
            self.res.cross_node_gpu_s += q.cost * k

    # ----- results -----
    def _feed_back(self, q: Quantum, e: Ended) -> None:
        """Tell the latency model how long the steps of a quantum that ran whole took: its clock
        time less the parts that are not steps, as predicted."""
        whole = all(isinstance(o, (Stepped, Finishing)) for o in e.outcomes.values())
        if whole and q.step_s > 0:
            self._observe(q.step_key, q.assignment.steps, e.ran_s - (q.cost - q.step_s))

    def _apply(self, e: Ended, now: float) -> None:
        q = self.inflight.pop(e.key)
        self.free.update(q.gpus)
        if self._observe is not None:
            self._feed_back(q, e)
        if self.keep:
            self.res.quanta_log.append((q.cost, e.ran_s, q.assignment.steps))
            self.res.quanta_record.append((q.start, q.start + e.ran_s, q.assignment))
        if e.ran_s != q.cost:  # the real clock: count what it held, not what was predicted
            k = len(q.gpus)
            self.res.busy_gpu_s += (e.ran_s - q.cost) * k
            if q.cross_node:
                self.res.cross_node_gpu_s += (e.ran_s - q.cost) * k
        for rid in q.requests:
            r, o = self.by_id[rid], e.outcomes[rid]
            if isinstance(o, Stepped):
                if o.steps_done > r.steps_done:
                    r.advance(o.steps_done - r.steps_done)
                if r.remaining_steps == 0:
                    self.complete(r, now, o.output)
                    continue
                self.queue[rid] = r
                self.notify(r)
            elif isinstance(o, Finishing):
                if o.steps_done > r.steps_done:
                    r.advance(o.steps_done - r.steps_done)
                self.finishing[rid] = r
                self.notify(r)
            elif isinstance(o, Failed):
                self.end(r, now, failed=o.reason)
            elif isinstance(o, Cancelled):
                self.end(r, now, cancelled=True)
            elif isinstance(o, RolledBack):
                self.roll_back(r, now, o.steps_done)
            else:
                raise TypeError(f"unknown outcome {o!r} for {rid}")
