"""The executor core's own edge cases, on a virtual clock (no workers)."""

from __future__ import annotations

import threading

from genserve.engine import Engine
from genserve.latency import LatencyModel
from genserve.executor.clock import VirtualClock
from genserve.policies import make_policy
from genserve.request import Kind, Request, Status
from genserve.spec import GenSpec

from test_executor_parity import PredictedPool


def _served(requests, cancels=()) -> list[Request]:
    """Serve `requests` (submitted, then `cancels` cancelled, before the loop's first turn) on a
    server-mode engine (ended requests are forgotten) until drained; returns what it reported."""
    clock = VirtualClock()
    pool = PredictedPool(2, clock)
    seen: list[Request] = []
    engine = Engine(make_policy("genserve"), pool, LatencyModel(), clock=clock,
                    on_update=lambda r, out: seen.append(r))
    pool.predicted_end = engine.predicted_end
    for r in requests:
        engine.submit(r)
    for rid in cancels:
        engine.cancel(rid)
    stop = threading.Event()
    stop.set()
    engine.serve(stop)
    return seen


def test_a_request_cancelled_in_the_turn_it_arrives_is_skipped_not_looked_up(latency):
    r = Request("a", Kind.IMAGE, GenSpec("sd3-medium", 512, 512), arrival=0.0, deadline=10.0)
    seen = _served([r], cancels=["a"])
    assert r.status is Status.CANCELLED and seen[-1] is r


def test_a_batch_mixing_cfg_on_and_off_is_refused_and_never_planned(latency):
    import pytest

    from genserve.executor import PlanError, validate_assignment
    from genserve.policies.base import Assignment
    from genserve.sim import Simulator
    from genserve.policies import Cluster

    mk = [Request(f"r{i}", Kind.IMAGE, GenSpec("sd3-medium", 512, 512, guidance=g), deadline=60.0)
          for i, g in enumerate((5.0, 1.0, 5.0, 1.0))]
    with pytest.raises(PlanError, match="shapes differ"):
        validate_assignment(Assignment((0,), ("r0", "r1"), 1), {0}, {r.id: r for r in mk},
                            latency)
    batches = []

    class Spy:
        def __init__(self):
            self.inner = make_policy("genserve")

        def schedule(self, s):
            plan = self.inner.schedule(s)
            batches.extend(a.requests for a in plan.assignments)
            return plan

        def describe(self):
            return "spy"

    Simulator(Cluster(1), latency, Spy()).run(mk)
    assert any(len(b) > 1 for b in batches)  # they do batch, each with its own kind
    assert all(len({mk[int(rid[1])].guidance for rid in b}) == 1 for b in batches)
