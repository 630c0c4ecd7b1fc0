"""The real engine: the simulator's policies driving real workers on a real clock.

Same contract as the simulator (`genserve.sim`): at every decision point (an arrival, a job done)
the engine builds a `SchedulerState`, asks the policy for a `Plan`, validates it with the
simulator's own checks, and hands each assignment to the worker set it names, without waiting for
any one of them: several groups run at once.  A request that ran the last quantum and is not
re-planned is paused; its state stays in the driver (host memory) and goes to whichever workers
the policy picks next.

This first version moves each request's state through the driver on every quantum (see
`parallel/workers.py`); keeping states resident on their workers is the next step.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..latency import LatencyModel
from ..models.base import GenRequest, StepState
from ..parallel.workers import WorkerPool
from ..policies.base import Assignment, Cluster, InFlight, Policy, SchedulerState
from ..request import Request
from ..sim.simulator import (PlanError, SimResult, count_reasons, pause_unplanned, place_members,
                             validate_assignment)


@dataclass
class EngineResult(SimResult):
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    # Per request: (start, end, GPU set) of every quantum it ran.
    timeline: dict[str, list[tuple[float, float, tuple[int, ...]]]] = field(default_factory=dict)


class Engine:
    def __init__(self, policy: Policy, pool: WorkerPool, latency: LatencyModel,
                 gpus_per_node: int = 8, time_scale: float = 1.0, poll_s: float = 0.005):
        self.policy, self.pool, self.latency = policy, pool, latency
        self.cluster = Cluster(pool.n, min(gpus_per_node, pool.n))
        self.time_scale = time_scale  # trace seconds per wall second (arrivals only)
        self.poll_s = poll_s

    def run(self, requests: list[Request]) -> EngineResult:
        by_id = {r.id: r for r in requests}
        arrivals = sorted(requests, key=lambda r: (r.arrival, r.id))
        queue: dict[str, Request] = {}
        states: dict[str, StepState] = {}
        inflight: dict[int, tuple[Assignment, float]] = {}
        free = set(range(self.cluster.num_gpus))
        res = EngineResult(requests=list(requests), num_gpus=self.cluster.num_gpus, busy_gpu_s=0.0,
                           end_time=0.0, decisions=0, preemptions=0, migrations=0,
                           reasons=Counter())
        self._last_reason: dict[str, str] = {}
        wake: float | None = None
        t0 = time.monotonic()
        i = 0
        while i < len(arrivals) or queue or inflight:
            now = (time.monotonic() - t0) * self.time_scale
            changed = wake is not None and now >= wake
            if changed:
                wake = None
            while i < len(arrivals) and arrivals[i].arrival <= now:
                queue[arrivals[i].id] = arrivals[i]
                i += 1
                changed = True
            for job in self.pool.finished(timeout_s=0.0 if changed else self.poll_s):
                a, started = inflight.pop(job)
                blobs, outputs = self.pool.wait(job)
                now = (time.monotonic() - t0) * self.time_scale
                free.update(a.gpus)
                res.busy_gpu_s += (now - started) * len(a.gpus)
                for rid, blob in zip(a.requests, blobs):
                    r = by_id[rid]
                    states[rid] = StepState.from_bytes(blob)
                    r.advance(a.steps)
                    res.timeline.setdefault(rid, []).append((started, now, a.gpus))
                    if r.remaining_steps == 0:
                        r.finish(now)
                        res.outputs[rid] = outputs[rid]
                        del states[rid]
                    else:
                        queue[rid] = r
                changed = True
            if changed and queue and free:
                asked = self._decide(now, queue, states, inflight, free, by_id, res)
                if asked is not None and asked > now and (wake is None or asked < wake):
                    wake = asked
                if not inflight and queue and i >= len(arrivals) and wake is None:
                    raise PlanError(f"policy {self.policy.describe()} stalled at t={now:.3f}: "
                                    f"{len(queue)} requests wait, nothing runs")
            if not changed and not inflight:  # idle: sleep until the next arrival or wake-up
                due = [t for t in (wake, arrivals[i].arrival if i < len(arrivals) else None)
                       if t is not None]
                if due:
                    time.sleep(min(max((min(due) - now) / self.time_scale, 0.0), 0.05))
        res.end_time = (time.monotonic() - t0) * self.time_scale
        return res

    def _decide(self, now, queue, states, inflight, free, by_id, res) -> float | None:
        """Plan and dispatch; returns the policy's wake-up time, if any."""
        running = [by_id[rid] for a, _ in inflight.values() for rid in a.requests]
        state = SchedulerState(
            now=now, cluster=self.cluster, free_gpus=tuple(sorted(free)),
            queue=list(queue.values()),
            inflight=[InFlight(a.gpus, a.requests, self._estimated_end(a, t, by_id))
                      for a, t in inflight.values()],
            latency=self.latency, running=running)
        plan = self.policy.schedule(state)
        res.decisions += 1
        count_reasons(plan, self._last_reason, res.reasons, now)
        for a in plan.assignments:
            members = validate_assignment(a, free, queue, self.latency)
            new = [m for m in members if m.id not in states]
            if new:
                for st in self.pool.prepare([_gen_request(m) for m in new], rank=a.gpus[0],
                                            model=new[0].model):
                    states[st.request_id] = st
            res.migrations += place_members(members, a.gpus, now, queue)
            blobs = [states[m.id].to_bytes() for m in members]
            job = self.pool.submit("steps", a.gpus, (blobs, a.steps, True))
            inflight[job] = (a, now)
            free.difference_update(a.gpus)
        res.preemptions += pause_unplanned(queue, now)
        return plan.wake_at

    def _estimated_end(self, a: Assignment, started: float, by_id) -> float:
        lead = by_id[a.requests[0]]
        try:
            step = self.latency.request_step_time(lead, len(a.requests), len(a.gpus))
        except ValueError:
            return started
        return started + a.steps * step


def _gen_request(r: Request) -> GenRequest:
    return GenRequest(id=r.id, prompt=r.prompt, height=r.height, width=r.width, frames=r.frames,
                      steps=r.steps, guidance=r.guidance, seed=r.seed)
