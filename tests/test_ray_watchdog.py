"""Ray actors that hang: a stopped actor sends no heartbeat, is declared hung within the timeout,
killed (its process goes) and replaced like a dead one; the new one serves in a new world."""

from __future__ import annotations

import os
import signal
import time

import pytest

torch = pytest.importorskip("torch")
ray = pytest.importorskip("ray")

from genserve.cluster import RayWorkerPool  # noqa: E402
from genserve.models import GenRequest, GenSpec  # noqa: E402
from genserve.parallel.protocol import Noop, Steps  # noqa: E402
from genserve.parallel.workers import WorkerLost  # noqa: E402

TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def pool():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    p = RayWorkerPool(("tiny-t2i",), 2, device="cpu", collective_timeout_s=20, poll_s=0.1,
                      worker_timeout_s=TIMEOUT_S)
    yield p
    p.close()
    ray.shutdown()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_a_stopped_actor_is_declared_hung_killed_and_replaced(pool):
    pid = ray.get(pool._actors[0].__ray_call__.remote(lambda self: os.getpid()))
    (s,) = pool.prepare([GenRequest("r", GenSpec("tiny-t2i", 64, 64, steps=5000, seed=1,
                                                 prompt="x"))], rank=0)
    job = pool.submit((0,), Steps((s.to_bytes(),), 5000))
    time.sleep(0.3)
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        with pytest.raises(WorkerLost, match="declared hung: no heartbeat"):
            pool.wait(job, timeout_s=30)
        assert TIMEOUT_S - 1 <= time.monotonic() - t0 < TIMEOUT_S + 2
        assert pool.hung == 1 and pool.dead() == [0]
        deadline = time.monotonic() + 10
        while _running(pid):  # ray.kill ends the stopped process
            assert time.monotonic() < deadline, "the hung actor's process is still there"
            time.sleep(0.1)
    finally:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)
    pool.replace([0])
    deadline = time.monotonic() + 120
    while pool.down() or not pool.ready():
        assert time.monotonic() < deadline, "the replacement never came up"
        time.sleep(0.1)
    assert pool.wait(pool.submit((0, 1), Noop()), timeout_s=120) is None
    assert pool.hung == 1 and pool.alive() == [0, 1]
