"""Hung workers through the real engine: a worker that stops (SIGSTOP: no heartbeat) and one whose
main thread is stuck (heartbeats go on, progress does not) are declared hung within the timeout,
killed and replaced, and the request they held completes on the other worker, exactly."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from genserve.engine import Engine  # noqa: E402
from genserve.latency import LatencyModel  # noqa: E402
from genserve.models import GenRequest, GenSpec, load_preset  # noqa: E402
from genserve.parallel.workers import WorkerPool  # noqa: E402
from genserve.policies import Plan, Policy  # noqa: E402
from genserve.policies.base import Assignment  # noqa: E402
from genserve.profiler import profile_workers, write_profile  # noqa: E402
from genserve.request import Kind, Request, Status  # noqa: E402

TIMEOUT_S = 3.0
# The stuck-thread test's request blocks worker 1's main thread at its step 5 (see worker_main's
# "hang" fault); its heartbeat thread goes on.
FAULTS = {"stuck-vid": {"kind": "hang", "step": 5, "rank": 1}}

pytestmark = pytest.mark.usefixtures("forked_worker_pools")


@pytest.fixture(scope="module")
def pool(forked_worker_pools):
    with WorkerPool(("tiny-t2v",), 2, faults=FAULTS, collective_timeout_s=20,
                    worker_timeout_s=TIMEOUT_S) as p:
        yield p


@pytest.fixture(scope="module")
def latency(pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("watchdog-prof")
    write_profile(out, "local", *profile_workers(["tiny-t2v"], batches=(1, 2), reps=1, pool=pool))
    return LatencyModel(out)


def video(rid: str, steps: int) -> Request:
    # 128x128, 17 frames: 5-9 ms a step on a CPU worker
    return Request(rid, Kind.VIDEO, GenSpec("tiny-t2v", 128, 128, frames=17, steps=steps, seed=3,
                                            prompt=f"video {rid}"))


class FirstThenOther(Policy):
    """Every request runs all its steps at once: its first quantum on GPU `first`, any later one
    (after its worker was lost) on the other GPU."""

    name = "first-then-other"

    def __init__(self, first: int):
        super().__init__()
        self.first = first

    def schedule(self, s):
        plan = Plan()
        for r in sorted(s.queue, key=lambda r: r.id):
            ran = sum(st is Status.RUNNING for _, st in r.history)
            gpu = self.first if ran == 0 else 1 - self.first
            if gpu in s.free_gpus:
                plan.assignments.append(Assignment((gpu,), (r.id,), r.remaining_steps))
        return plan


def declared(pool) -> list:
    """Record (rank, why, when) of every worker the pool declares hung."""
    seen, kill = [], pool._kill_hung

    def spy(rank, why):
        seen.append((rank, why, time.monotonic()))
        kill(rank, why)

    pool._kill_hung = spy
    return seen


def alone(r: Request) -> np.ndarray:
    torch.set_num_threads(1)
    return load_preset("tiny-t2v").generate(GenRequest(r.id, r.spec))


def wait_whole(pool) -> None:
    deadline = time.monotonic() + 60
    while not pool.ready():
        assert time.monotonic() < deadline, "the replacement did not start"
        time.sleep(0.1)
    assert pool.alive() == [0, 1]


def test_a_stopped_worker_is_declared_hung_replaced_and_its_request_completes_elsewhere(
        pool, latency):
    """Worker 0 runs a 300-step video (2-3 s) and is SIGSTOPped 0.5 s in: it sends nothing
    more.  Within the timeout (and a poll) it is declared hung and killed; the engine replaces it
    and runs the video again on worker 1, where it finishes with the output it has alone."""
    vid = video("stopped-vid", 300)
    seen = declared(pool)
    hung0, pid = pool.hung, pool.procs[0].pid
    stopped: list[float] = []

    def stop():
        os.kill(pid, signal.SIGSTOP)
        stopped.append(time.monotonic())

    timer = threading.Timer(0.5, stop)
    timer.start()
    try:
        res = Engine(FirstThenOther(first=0), pool, latency).run([vid])
    finally:
        timer.cancel()
        del pool._kill_hung
    assert stopped, "the worker was never stopped"
    assert vid.status is Status.FINISHED, (vid.status, vid.reason)
    ((rank, why, when),) = seen
    assert rank == 0 and why.startswith("no heartbeat"), why
    # Its last beat went out up to a beat (TIMEOUT_S / 4) before the stop.
    assert TIMEOUT_S - 1 <= when - stopped[0] < TIMEOUT_S + 1.5, when - stopped[0]
    assert pool.hung == hung0 + 1 and res.restarts == 1
    assert [q[2] for q in res.timeline[vid.id]] == [(1,)]  # the lost quantum is not listed
    assert np.abs(res.outputs[vid.id].astype(int) - alone(vid).astype(int)).max() <= 1
    wait_whole(pool)


def test_a_worker_stuck_in_a_job_is_declared_hung_by_its_progress(pool, latency):
    """Worker 1's main thread blocks for good at the video's step 5 while its heartbeat thread
    goes on: it is alive but its progress counter stands still, so it is declared hung too."""
    vid = video("stuck-vid", 40)
    seen = declared(pool)
    hung0 = pool.hung
    t0 = time.monotonic()
    try:
        res = Engine(FirstThenOther(first=1), pool, latency).run([vid])
    finally:
        del pool._kill_hung
    assert vid.status is Status.FINISHED, (vid.status, vid.reason)
    ((rank, why, when),) = seen
    assert rank == 1 and why.startswith("no progress"), why
    assert TIMEOUT_S <= when - t0 < TIMEOUT_S + 2.5, when - t0
    assert pool.hung == hung0 + 1 and res.restarts == 1
    assert [q[2] for q in res.timeline[vid.id]] == [(0,)]
    assert np.abs(res.outputs[vid.id].astype(int) - alone(vid).astype(int)).max() <= 1
    wait_whole(pool)


def test_an_idle_or_busy_healthy_pool_declares_nobody_hung(pool, latency):
    """Longer than the timeout: idle workers (their counters stand still: not running a job),
    then a job of several timeouts that progresses; nobody is declared hung."""
    wait_whole(pool)
    hung0 = pool.hung
    time.sleep(TIMEOUT_S + 1)
    pool.finished(0.0)
    vid = video("healthy-vid", 700)  # 2 timeouts or more, in one job
    res = Engine(FirstThenOther(first=0), pool, latency).run([vid])
    assert vid.status is Status.FINISHED and res.restarts == 0
    assert pool.hung == hung0 and pool.alive() == [0, 1]
