"""States move worker to worker (parallel/transfer.py), not through the driver.

Without worker processes: the new messages, a state's wire format (every kind of tensor it holds),
and the engine's backend choosing the member (resident, held by a rank of the job, incoming from a
holder) without ever waiting for a move, asking the holder only once the job is submitted.

On one pool of 4 CPU workers: a paused video resumed on another worker set finishes exactly as
alone with no byte of its state through the driver; SP re-sharding (1 -> 2 -> 1 GPUs, disjoint
and overlapping sets); the holder killed (SIGKILL) right after the move is planned, before it
sends and while it sends (a stall hook): the video resumes from its checkpoint with the exact
output and the next moves, in the re-formed world, go worker to worker again.  And a worker whose
world was abandoned answers a move lost at once.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from genserve.engine import Engine  # noqa: E402
from genserve.engine.backend import WorkerBackend  # noqa: E402
from genserve.latency import LatencyModel  # noqa: E402
from genserve.models import GenRequest, load_preset  # noqa: E402
from genserve.models.base import StepState  # noqa: E402
from genserve.parallel.protocol import (CONTROL, Done, Held, Incoming, New, Ready,  # noqa: E402
                                        Rendezvous, Resident, Run, RunResult, SendState, Shutdown,
                                        Task)
from genserve.parallel.transfer import Parcel, get_parcel, put_parcel  # noqa: E402
from genserve.parallel.workers import PoolBase, WorkerLost, WorkerPool  # noqa: E402
from genserve.parallel.world import abandon  # noqa: E402
from genserve.policies.base import Assignment  # noqa: E402
from genserve.profiler import profile_workers, write_profile  # noqa: E402
from genserve.request import Kind, Request, Status  # noqa: E402
from genserve.spec import GenSpec  # noqa: E402

from _policies import Route  # noqa: E402

STALL_S = 6.0
FAULTS = {"mv-stall": {"kind": "stall_send", "step": "send", "seconds": STALL_S}}


# ----- without workers -----

# Workers fork from the tests' fork server (tests/_spawn.py); test_engine_acceptance and the
# serve processes of test_server_drain keep the production spawn path covered.
pytestmark = pytest.mark.usefixtures("forked_worker_pools")


def test_the_move_messages_are_frozen_values_and_send_state_is_a_control_message():
    for msg in (SendState("r", 2, 7, "world3/"), Incoming("r", 1, 7), Held("r", 1)):
        assert pickle.loads(pickle.dumps(msg)) == msg
        with pytest.raises(AttributeError):
            msg.rid = "x"
    assert SendState in CONTROL
    assert RunResult().lost == {} and RunResult(lost={"r": "why"}).lost == {"r": "why"}


def _state(ballast: bool = True) -> StepState:
    g = torch.Generator().manual_seed(1)
    sched = {"sigmas": torch.linspace(1, 0, 11), "step": 3, "model_outputs": [None, torch.ones(2)],
             "flag": torch.tensor(True), "empty": torch.zeros(0, 4), "t": torch.tensor(5.0)}
    if ballast:  # over SMALL: sent as tensors; bf16 and a non-contiguous view too
        sched["big"] = {"bf16": torch.randn(300, 300).bfloat16(),
                        "view": torch.randn(400, 300).t()}
    return StepState("r", "tiny-t2v", 32, 32, 9, 12, 5.0, 3, torch.randn(1, 16, 3, 32, 32),
                     {"prompt_embeds": torch.randn(1, 8, 16)}, None, sched, g.get_state())


def _same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


def test_a_state_crosses_the_wire_format_exactly():
    """What `put_parcel` sends, taken in the same order by `get_parcel` (a point-to-point pair or
    a broadcast does just that), is the same state: every field, every tensor bit for bit."""
    s = _state()
    wire: list[torch.Tensor] = []
    put_parcel(Parcel.of(s, "cpu"), lambda t: wire.append(t.clone()), "cpu")
    sent = iter(wire)
    got = get_parcel(lambda t: t.copy_(next(sent)), "cpu")
    assert next(sent, None) is None and got.why_lost is None
    r = got.state()
    for f in ("request_id", "model", "height", "width", "frames", "steps", "guidance",
              "step_index", "latents", "cond", "uncond", "scheduler_state", "generator_state"):
        _same(getattr(s, f), getattr(r, f))
    # Big tensors (latents and the two ballast ones) travel after the metadata, small ones inside
    # it; a holder without the state sends only a notice.
    assert len(wire) == 2 + 3 and all(t.dtype == torch.uint8 for t in wire[1:])
    wire.clear()
    put_parcel(Parcel.lost("gone"), wire.append, "cpu")
    sent = iter(wire)
    assert get_parcel(lambda t: t.copy_(next(sent)), "cpu").why_lost == "gone"


class FakePool:
    """What the backend asks of a pool, recorded; workers `dead` are not alive."""

    n, nodes = 4, ()

    def __init__(self, dead=(), lose_submit=False):
        self.calls: list = []
        self._dead, self.lose_submit, self._t = set(dead), lose_submit, 100

    def alive(self):
        return [g for g in range(self.n) if g not in self._dead]

    def dead(self):
        return sorted(self._dead)

    def transfer_id(self):
        self._t += 1
        return self._t

    def fetch(self, *a, **k):
        raise AssertionError("a decision must not fetch a moving state")

    def __getattr__(self, name):  # submit, send_state, drop: recorded in the order called
        def record(*args):
            self.calls.append((name, *args))
            if name == "submit" and self.lose_submit:
                raise WorkerLost("worker 3 was lost during submit")
            return 1
        return record


def _paused(gpus) -> Request:
    r = Request("v", Kind.VIDEO, GenSpec("tiny-t2v", 32, 32, frames=9, steps=12, prompt="p"))
    r.start(0.0, gpus)
    r.advance(4)
    r.preempt(0.1)
    return r


def _backend(pool) -> WorkerBackend:
    from genserve.engine.engine import EngineResult

    res = EngineResult(requests=[], num_gpus=4, busy_gpu_s=0, end_time=0, decisions=0,
                       preemptions=0, migrations=0)
    return WorkerBackend(pool, clock=None, checkpoint_every=0, poll_s=0.01, idle_poll_s=0.01,
                         gpus_per_node=4, keep=True, result=res)


@pytest.mark.parametrize("held, planned, member, drops", [
    ((0, 1), (0,), Resident("v"), [("drop", {1}, ["v"])]),  # 2 -> 1 inside: stays
    ((0,), (0, 1), Held("v", 0), []),                        # 1 -> 2 overlapping
    ((1, 2), (2, 3), Held("v", 2), [("drop", {1}, ["v"])]),
    ((0,), (1, 2), Incoming("v", 0, 101), []),              # disjoint: a transfer
    ((0, 1), (2,), Incoming("v", 0, 101), [("drop", {1}, ["v"])]),
])
def test_the_backend_takes_a_state_from_where_it_is_and_never_waits(held, planned, member,
                                                                     drops):
    pool = FakePool()
    b = _backend(pool)
    run = b.source(Assignment(planned, ("v",), 2), [_paused(held)], 0.2)
    assert run.members == (member,) and b.res.moves_bytes == 0
    assert pool.calls == drops
    q = type("Q", (), {"gpus": tuple(sorted(planned)), "key": 0})()
    assert b.start(q, [], run)
    after = pool.calls[len(drops):]
    assert after[0] == ("submit", q.gpus, run)
    # The holder is asked to send only after the job went out: both ends in the driver's order.
    assert after[1:] == ([("send_state", 0, "v", min(planned), 101)]
                         if isinstance(member, Incoming) else [])


def test_a_move_whose_job_cannot_be_submitted_is_never_asked_for():
    pool = FakePool(lose_submit=True)
    b = _backend(pool)
    r = _paused((0,))
    run = b.source(Assignment((2, 3), ("v",), 2), [r], 0.2)
    rolled = []
    b.core = type("Core", (), {"by_id": {"v": r}, "queue": {}, "notify": lambda self, r: None,
                               "roll_back": lambda self, r, t, s: rolled.append(s)})()
    b._lost = lambda q: {"v": type("RB", (), {"steps_done": 0})()}
    q = type("Q", (), {"gpus": (2, 3), "key": 0, "start": 0.2})()
    assert not b.start(q, [r], run)
    assert ("drop", [0], ["v"]) in pool.calls
    assert not [c for c in pool.calls if c[0] == "send_state"] and rolled == [0]


def test_the_pool_names_the_current_world_in_a_send_state():
    pool = PoolBase()
    pool._setup("tiny-t2v", 2, 0.01, None, "cpu", 10.0, None, 0)
    sent = []
    pool._send_ctl = lambda r, m: sent.append((r, m))
    pool._alive = lambda r: r != 1
    pool._open_store("127.0.0.1")
    pool._next_world((0, 1))
    pool._next_world((0, 1))
    pool.send_state(0, "v", 1, pool.transfer_id())
    pool.send_state(1, "w", 0, 9)  # a dead holder is not asked
    assert sent == [(0, SendState("v", 1, 0, "world2/"))]


# ----- on workers -----

@pytest.fixture(scope="module")
def pool(forked_worker_pools):
    with WorkerPool(("tiny-t2v",), 4, faults=FAULTS, collective_timeout_s=20) as p:
        yield p


@pytest.fixture(scope="module")
def latency(pool, tmp_path_factory):
    """Measured in the pool, plus SP-2 rows for tiny-t2v so that plans may name 2-GPU sets."""
    fwd, blk, meta = profile_workers(["tiny-t2v"], batches=(1, 2), reps=1, pool=pool)
    blk = blk + [{**r, "sp": 2} for r in blk]
    out = tmp_path_factory.mktemp("moves-prof")
    write_profile(out, "local", fwd, blk, meta)
    return LatencyModel(out)


def video(rid: str, steps: int = 12) -> Request:
    return Request(rid, Kind.VIDEO,
                   GenSpec("tiny-t2v", 32, 32, frames=9, steps=steps,
                           seed=zlib.crc32(rid.encode()) % 1000, prompt=f"video {rid}"))


_ADAPTER: list = []


def alone(r: Request) -> np.ndarray:
    torch.set_num_threads(1)
    if not _ADAPTER:
        _ADAPTER.append(load_preset("tiny-t2v"))
    return _ADAPTER[0].generate(GenRequest(r.id, r.spec))


class Watched:
    """The real pool, recording the members of every `Run` and every state reported lost;
    `on_send(holder)` runs right after a move is asked for."""

    def __init__(self, pool, on_send=None):
        self._pool, self.on_send = pool, on_send
        self.members: list[str] = []
        self.lost: dict[str, str] = {}

    def __getattr__(self, name):
        return getattr(self._pool, name)

    def submit(self, ranks, job):
        jid = self._pool.submit(ranks, job)  # one that raises (a member found dead) ran nothing
        self.members += [type(m).__name__ for m in job.members]
        return jid

    def result(self, job_id):
        out = self._pool.result(job_id)
        if isinstance(out, Done) and isinstance(out.result, RunResult):
            self.lost.update(out.result.lost)
        return out

    def send_state(self, holder, rid, dst, transfer):
        self._pool.send_state(holder, rid, dst, transfer)
        if self.on_send is not None:
            self.on_send(holder)


def _run(pool, latency, routes, reqs, **kw):
    res = Engine(Route(routes), pool, latency, **kw).run(reqs)
    for r in reqs:
        assert r.status is Status.FINISHED, (r.id, r.status, r.reason)
    return res


def test_a_paused_video_resumed_on_another_set_moves_worker_to_worker_exactly(pool, latency):
    vid = video("mv-plain")
    watched = Watched(pool)
    res = _run(watched, latency, {vid.id: [((0,), 5), ((1,), 99)]}, [vid])
    assert [q[2] for q in res.timeline[vid.id]] == [(0,), (1,)]
    assert watched.members == ["New", "Incoming"]
    assert res.moves_bytes == 0 and res.recovered == 0 and res.migrations == 1
    assert np.array_equal(res.outputs[vid.id], alone(vid))  # bit for bit


def test_sp_re_sharding_moves_states_between_degrees(pool, latency):
    """1 -> 2 GPUs (disjoint: received and broadcast), 2 -> 1 (from one of two holders), 1 -> 2
    overlapping (the holder broadcasts), 2 -> 1 inside the set (stays)."""
    vid = video("mv-sp", steps=15)
    route = [((0,), 3), ((1, 2), 3), ((3,), 3), ((2, 3), 3), ((2,), 99)]
    watched = Watched(pool)
    res = _run(watched, latency, {vid.id: route}, [vid])
    assert [q[2] for q in res.timeline[vid.id]] == [g for g, _ in route]
    assert watched.members == ["New", "Incoming", "Incoming", "Held", "Resident"]
    assert res.moves_bytes == 0 and res.recovered == 0
    ref = alone(vid).astype(int)
    assert np.abs(res.outputs[vid.id].astype(int) - ref).max() <= 1  # SP changes rounding only


def _kill(p: WorkerPool, rank: int) -> None:
    os.kill(p.procs[rank].pid, signal.SIGKILL)


def _ready(p: WorkerPool) -> None:
    deadline = time.monotonic() + 120
    while not p.ready():
        assert time.monotonic() < deadline, "replacement worker did not start"
        time.sleep(0.1)


@pytest.mark.parametrize("rid, delay, a, b", [("mv-kill", 0.0, 0, 1), ("mv-stall", 1.0, 2, 3)])
def test_the_holder_killed_right_after_the_move_is_planned(pool, latency, rid, delay, a, b):
    """Worker `a` holds the video at step 6 (4 steps, checkpointed, then 2) and is killed (SIGKILL)
    right after the engine asks it to send the state to worker `b`: at once (before it sends), or
    while it stalls after sending the metadata's length ("mv-stall", on a worker never replaced
    before: a replacement has no faults).  The receiving job reports the state lost (it neither
    hangs nor fails the request); the video resumes from its step-4 checkpoint, on the
    replacement, and moves again worker to worker in the new world."""
    _ready(pool)
    vid = video(rid, steps=12)
    killed: list[int] = []

    def on_send(holder):
        if killed:
            return
        killed.append(holder)
        if delay:
            threading.Timer(delay, _kill, (pool, holder)).start()
        else:
            _kill(pool, holder)

    watched = Watched(pool, on_send)
    t0 = time.monotonic()
    route = [((a,), 4), ((a,), 2), ((b,), 99)]
    res = _run(watched, latency, {vid.id: route}, [vid], checkpoint_every=4)
    why = (vid.history, watched.members, watched.lost, res.timeline[vid.id])
    assert killed == [a] and res.restarts == 1, why
    assert list(watched.lost) == [vid.id] and f"worker {a}" in watched.lost[vid.id], why
    # Once or twice: the resume can be planned on `a` before its death is seen, and roll back at
    # submit (then again to the same checkpoint).
    assert res.recovered in (1, 2), why
    # 4 + 2 steps on `a`, the lost move (not in the timeline), the 2 steps after the checkpoint
    # again on the replacement of `a`, then the rest after a second, direct move.
    assert [q[2] for q in res.timeline[vid.id]] == [(a,), (a,), (a,), (b,)]
    assert watched.members == ["New", "Resident", "Incoming", "Stored", "Incoming"]
    assert res.moves_bytes == 0
    assert np.array_equal(res.outputs[vid.id], alone(vid))
    assert time.monotonic() - t0 < STALL_S + 30  # no collective timeout (20 s) waited out
    _ready(pool)


def _abandoned_worker(init, members, inbox, ctl, outbox):
    from genserve.parallel.worker_main import worker_main
    from genserve.parallel.world import WorkerSpec

    worker_main(0, WorkerSpec(("tiny-t2v",), timeout_s=300), init, members, inbox, ctl, outbox)


def test_a_worker_whose_world_was_abandoned_answers_moves_lost_at_once():
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    inbox, ctl, outbox = ctx.Queue(), ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_abandoned_worker, args=(
        Rendezvous("127.0.0.1", store.port, "x1/"), (0, 1), inbox, ctl, outbox))
    p.start()
    try:
        time.sleep(0.5)
        assert abandon(store, "x1/")  # worker 1 never came
        assert outbox.get(timeout=120) == Ready(0)
        g = GenSpec("tiny-t2v", 32, 32, frames=9, steps=3, seed=1, prompt="a fox")
        inbox.put(Task(1, (0,), Run("tiny-t2v", (New("a", g),), 1)))
        assert outbox.get(timeout=60).result.steps == {"a": 1}
        ctl.put(SendState("a", 1, 5, "x1/"))  # nowhere to send: dropped, nothing hangs
        t0 = time.monotonic()
        c = GenSpec("tiny-t2v", 32, 32, frames=9, steps=3, seed=2, prompt="a hen")
        inbox.put(Task(2, (0,), Run("tiny-t2v", (Incoming("b", 1, 6), New("c", c)), 1)))
        done = outbox.get(timeout=60)
        assert time.monotonic() - t0 < 10
        assert "abandoned" in done.result.lost["b"] and done.result.steps == {"c": 1}
    finally:
        inbox.put(Shutdown())
        p.join(30)
    assert p.exitcode == 0


def test_the_old_path_through_the_driver_stays_available(pool, latency, monkeypatch):
    """`direct_moves = False` (bench/data_path.py's comparison) moves the state as bytes through
    the driver, with the same output."""
    monkeypatch.setattr(WorkerBackend, "direct_moves", False)
    vid = video("mv-old")
    watched = Watched(pool)
    res = _run(watched, latency, {vid.id: [((2,), 5), ((3,), 99)]}, [vid])
    assert watched.members == ["New", "Moved"] and res.moves_bytes > 0
    assert np.array_equal(res.outputs[vid.id], alone(vid))
