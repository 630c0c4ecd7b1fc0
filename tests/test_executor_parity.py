"""The simulator and the engine are one executor: on a virtual clock, the engine over a pool that
completes every job exactly when predicted makes the same plans, in the same order, as the
simulator, and ends every request at the same time."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from genserve.engine import Engine
from genserve.executor.clock import VirtualClock
from genserve.parallel.protocol import (Done, Held, Incoming, Moved, New, Resident, Run,
                                        RunResult)
from genserve.policies import Cluster, make_policy
from genserve.request import Kind, Request, Status
from genserve.sim import Simulator
from genserve.workload import WorkloadConfig, generate


class Recorder:
    """A policy that records every plan of the policy it wraps."""

    def __init__(self, inner):
        self.inner, self.plans = inner, []

    def schedule(self, state):
        plan = self.inner.schedule(state)
        self.plans.append((state.now, tuple(sorted(state.free_gpus)),
                           tuple(r.id for r in state.queue),
                           tuple((i.gpus, i.requests, i.end) for i in state.inflight),
                           tuple(plan.assignments), tuple(sorted(plan.reasons.items())),
                           plan.wake_at))
        return plan

    def describe(self):
        return self.inner.describe()


class PredictedPool:
    """The engine-facing side of a worker pool, in process: a job ends exactly at the end the
    engine predicted for it (`Engine.predicted_end`), with every member `steps` further."""

    shares_files = False  # checkpoints, if any, would come back as bytes

    def __init__(self, n: int, clock: VirtualClock):
        self.n, self.nodes, self.clock = n, (), clock
        self.predicted_end = None  # set to the engine's once it exists
        self._ids = itertools.count()
        self._jobs: dict[int, RunResult] = {}
        self._step: dict[str, int] = {}   # where each request's state is
        self._total: dict[str, int] = {}
        self.kinds: list[str] = []        # how every member was sourced

    def submit(self, ranks, job: Run) -> int:
        assert isinstance(job, Run)
        res = RunResult()
        for m in job.members:
            self.kinds.append(type(m).__name__)
            if isinstance(m, New):
                self._step[m.rid], self._total[m.rid] = 0, m.spec.steps
            else:
                assert isinstance(m, (Resident, Held, Incoming, Moved))
            step = min(self._step[m.rid] + job.steps, self._total[m.rid])
            self._step[m.rid] = res.steps[m.rid] = step
            if step == self._total[m.rid]:
                res.outputs[m.rid] = np.zeros(1, np.uint8)
        jid = next(self._ids)
        self._jobs[jid] = res
        return jid

    def finished(self, timeout_s: float = 0.0) -> list[int]:
        return [j for j in self._jobs if self.predicted_end(j) <= self.clock()]

    def result(self, jid: int):
        return Done(jid, self._jobs.pop(jid))

    def saved(self) -> list:
        return []

    def transfer_id(self) -> int:
        return next(self._ids)

    def send_state(self, holder: int, rid: str, dst: int, transfer: int) -> None:
        self.kinds.append("SendState")

    def drop(self, ranks, rids) -> None:
        pass

    def cancel(self, ranks, rids) -> None:
        raise AssertionError("nothing is cancelled here")

    def alive(self) -> list[int]:
        return list(range(self.n))

    def dead(self) -> list[int]:
        return []

    def down(self) -> list[int]:
        return []


def _trace(n: int, seed: int) -> tuple[list[Request], Cluster]:
    """A busy mixed trace on 8 GPUs: images that batch, videos that are paused for them and
    change SP degree."""
    from genserve.latency import LatencyModel

    lat = LatencyModel()
    cfg = WorkloadConfig(rate=0.6, duration=2000, video_share=0.15, slo_scale=2.0, seed=seed,
                         arrival="gamma", cv=3.0)
    reqs = generate(cfg, lat, 8)[:n]
    assert len(reqs) == n
    return reqs, Cluster(8)


def _copy(reqs: list[Request]) -> list[Request]:
    return [Request.from_trace(r.to_trace()) for r in reqs]


@pytest.mark.parametrize("policy", ["genserve", "fcfs:video_sp=4"])
def test_engine_on_predicted_times_plans_exactly_as_the_simulator(policy, latency):
    reqs, cluster = _trace(200, seed=7)
    sim_pol = Recorder(make_policy(policy))
    sim_reqs = _copy(reqs)
    sim = Simulator(cluster, latency, sim_pol).run(sim_reqs)

    clock = VirtualClock()
    pool = PredictedPool(cluster.num_gpus, clock)
    eng_pol = Recorder(make_policy(policy))
    engine = Engine(eng_pol, pool, latency, clock=clock)
    pool.predicted_end = engine.predicted_end
    eng_reqs = _copy(reqs)
    res = engine.run(eng_reqs)

    # The simulator stops at the last deadline; compare the plans made until then.
    horizon = max(r.deadline for r in reqs)
    eng_plans = [p for p in eng_pol.plans if p[0] <= horizon]
    assert len(sim_pol.plans) == len(eng_plans) > 100
    for i, (a, b) in enumerate(zip(sim_pol.plans, eng_plans)):
        assert a == b, f"plan {i} differs at t={a[0]:.3f}"
    for s, e in zip(sim_reqs, eng_reqs):
        if s.status is Status.FINISHED:
            assert (e.status, e.finish_time, e.history) == (s.status, s.finish_time, s.history)
    assert all(r.status is Status.FINISHED for r in eng_reqs)
    if policy == "genserve":  # the trace exercises what the executor must get right
        assert sim.preemptions > 0 and res.preemptions >= sim.preemptions
        assert sim.migrations > 0 and "Incoming" in pool.kinds and "Resident" in pool.kinds
        assert pool.kinds.count("Incoming") == pool.kinds.count("SendState")
        batched = [a for p in sim_pol.plans for a in p[4] if len(a.requests) > 1]
        degrees = {}
        for p in sim_pol.plans:
            for a in p[4]:
                degrees.setdefault(a.requests[0], set()).add(len(a.gpus))
        assert batched, "no batch in the trace"
        assert any(len(d) > 1 for d in degrees.values()), "no SP change in the trace"
    assert any(r.kind is Kind.VIDEO for r in eng_reqs)
