"""The executor core's own edge cases, on a virtual clock (no workers)."""

from __future__ import annotations

import threading

from genserve.engine import Engine
from genserve.latency import LatencyModel
from genserve.executor.clock import VirtualClock
from genserve.policies import make_policy
from genserve.request import Kind, Request, Status

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
    r = Request("a", "sd3-medium", Kind.IMAGE, 512, 512, arrival=0.0, deadline=10.0)
    seen = _served([r], cancels=["a"])
    assert r.status is Status.CANCELLED and seen[-1] is r
