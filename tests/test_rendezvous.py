"""The store rendezvous of a re-formed world (the Ray pool's): members meet, then one shared
decision says whether the world formed or the driver abandoned it because a member died first.

The case it exists for: two workers of a node die a second apart, so the survivors are told to
re-form twice.  Without it they waited for the first dead member until the collective timeout, then
exited, and were replaced too (CI saw 6 workers lost where 2 died)."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from genserve.parallel.protocol import (Done, JobLost, MakeGroup, New, Noop, Ready,  # noqa: E402
                                        Rendezvous, Restart, Run, Shutdown, Task)
from genserve.parallel.world import abandon  # noqa: E402
from genserve.spec import GenSpec  # noqa: E402


def _member(rank, members, init, timeout_s, q):
    import torch
    import torch.distributed as dist

    from genserve.parallel.world import Abandoned, rendezvous

    try:
        rendezvous(init, rank, members, "gloo", timeout_s)
        x = torch.ones(1)
        dist.all_reduce(x)
        dist.destroy_process_group()
        q.put((rank, ("formed", float(x))))
    except Abandoned:
        q.put((rank, ("abandoned", None)))
    except TimeoutError as e:
        q.put((rank, ("timeout", str(e))))


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _start(store, prefix, members, who, timeout_s):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = Rendezvous("127.0.0.1", store.port, prefix)
    procs = [ctx.Process(target=_member, args=(r, members, init, timeout_s, q)) for r in who]
    for p in procs:
        p.start()
    return q, procs


def _collect(q, procs, timeout_s=60):
    out = dict(q.get(timeout=timeout_s) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return out


def test_every_member_came_the_world_forms_and_can_no_longer_be_abandoned(store):
    q, procs = _start(store, "w1/", (0, 1, 2), (0, 1, 2), timeout_s=60)
    assert _collect(q, procs) == {r: ("formed", 3.0) for r in range(3)}
    assert not abandon(store, "w1/")


def test_a_world_abandoned_while_a_member_is_missing_lets_the_others_go(store):
    # Worker 2 died before coming; the rendezvous timeout is long, the abandon frees them early.
    q, procs = _start(store, "w2/", (0, 1, 2), (0, 1), timeout_s=300)
    time.sleep(1.0)
    assert abandon(store, "w2/")
    assert _collect(q, procs, timeout_s=60) == {0: ("abandoned", None), 1: ("abandoned", None)}
    # A straggler that comes after the decision takes the same side, even though every member
    # has now arrived.
    q, procs = _start(store, "w2/", (0, 1, 2), (2,), timeout_s=300)
    assert _collect(q, procs) == {2: ("abandoned", None)}
    # The next world, fresh keys, forms.
    q, procs = _start(store, "w3/", (0, 1), (0, 1), timeout_s=60)
    assert _collect(q, procs) == {0: ("formed", 2.0), 1: ("formed", 2.0)}


def test_a_member_that_never_comes_times_out_naming_it(store):
    q, procs = _start(store, "w4/", (0, 1), (0,), timeout_s=1.0)
    ((tag, msg),) = _collect(q, procs).values()
    assert tag == "timeout" and "[1]" in msg and "w4/" in msg


def _worker(init, members, inbox, ctl, outbox):
    from genserve.parallel.worker_main import worker_main
    from genserve.parallel.world import WorkerSpec

    worker_main(0, WorkerSpec(("tiny-t2i",), timeout_s=300), init, members, inbox, ctl, outbox)


def test_a_worker_whose_world_was_abandoned_runs_alone_and_answers_group_jobs_lost(store):
    ctx = mp.get_context("spawn")
    inbox, ctl, outbox = ctx.Queue(), ctx.Queue(), ctx.Queue()
    # Worker 1 of its first world never comes (it died): the driver abandons the world.
    p = ctx.Process(target=_worker, args=(Rendezvous("127.0.0.1", store.port, "a1/"), (0, 1),
                                          inbox, ctl, outbox))
    p.start()
    try:
        time.sleep(0.5)
        assert abandon(store, "a1/")
        assert outbox.get(timeout=120) == Ready(0)
        g = GenSpec("tiny-t2i", 32, 32, steps=2, seed=1, prompt="a fox")
        inbox.put(MakeGroup((0, 1)))  # sent to a world that never formed: skipped
        inbox.put(Task(2, (0, 1), Run("tiny-t2i", (New("x", g),), 1)))
        inbox.put(Task(3, (0,), Run("tiny-t2i", (New("x", g),), 2)))
        lost = outbox.get(timeout=60)
        assert isinstance(lost, JobLost) and lost.job_id == 2 and "abandoned" in lost.message
        done = outbox.get(timeout=60)
        assert isinstance(done, Done) and done.job_id == 3 and "x" in done.result.outputs, done
        # The next world (this worker alone) forms and it serves on.
        inbox.put(Restart(Rendezvous("127.0.0.1", store.port, "a2/"), (0,)))
        inbox.put(Task(4, (0,), Noop()))
        assert outbox.get(timeout=60) == Done(4, None)
    finally:
        inbox.put(Shutdown())
        p.join(30)
    assert p.exitcode == 0
