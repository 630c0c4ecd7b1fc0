"""Emulated GPUs (genserve/emulate): the worker protocol with profile timings, real-size states
and placeholder outputs, under the unchanged WorkerPool and engine.

Units (no processes): an `EmuState`'s wire format (round trip, real payload sizes, damaged or
foreign blobs refused, `identity`), its digest (equal steps, equal digest, however the run was
cut), the placeholder outputs' shapes (raw and encoded).  The exchange: a message arrives under
its key; a receiver waiting on a sender that is SIGKILLed (or replaced in a later world) gives up
at once, not at its timeout.

On 8 emulated GPUs (one pool for the module, time scale 20), mirroring the real-worker tests
(test_engine_faults, test_moves): a video preempted for urgent images, a video re-sharded across
SP degrees and worker sets, cancels (inside an SP-2 job, in a batch), induced failures, a worker
SIGKILLed mid-job and a first rank exiting mid SP-2 job: every request ends once, and each output
equals the placeholder of its spec run straight through (the digest is chained per step, so a
request paused, moved, checkpointed or restarted ends with the digest of one that never was).
On 64 emulated GPUs over 8 nodes: a mixed trace of a few dozen requests, encoded outputs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from genserve.catalog import get_model
from genserve.emulate import emulation_for, frames
from genserve.emulate.exchange import Exchange, JobEnd, Parcel
from genserve.emulate.state import MAGIC, EmuState, identity, payload_bytes
from genserve.engine import Engine
from genserve.latency import LatencyModel
from genserve.models.output import MP4, PNG, Encoded
from genserve.parallel.protocol import OutputFormat
from genserve.parallel.workers import WorkerPool
from genserve.policies import make_policy
from genserve.request import Kind, Request, Status
from genserve.spec import GenSpec

from _policies import Pinned, Route

MODELS = ("sd3-medium", "flux-dev", "wan2.1-1.3b", "wan2.1-14b")
SCALE = 20.0  # the 8-GPU pool's clock: 20 trace seconds per wall second

# Induced faults of the 8-GPU pool, keyed by request ids only one test uses (a replacement worker
# has none).  "exit-sp": worker 6, the first rank of an SP-2 job on (6, 7), exits at step 6.
FAULTS = {
    "oom-b": {"kind": "oom", "step": 2},
    "err-b": {"kind": "error", "step": 2},
    "exit-sp": {"kind": "exit", "step": 6, "rank": 6},
}


# ----- helpers -----

def _seed(rid: str) -> int:
    return zlib.crc32(rid.encode()) % 1000


def image(rid: str, size: tuple[int, int] = (512, 512), steps: int = 28, model: str = "sd3-medium",
          guidance: float = 5.0, **kw) -> Request:
    spec = GenSpec(model, size[0], size[1], steps=steps, guidance=guidance, seed=_seed(rid),
                   prompt=f"image {rid}")
    return Request(rid, Kind.IMAGE, spec, **kw)


def video(rid: str, model: str = "wan2.1-1.3b", size: tuple[int, int] = (480, 832),
          frames_: int = 5, steps: int = 20, **kw) -> Request:
    spec = GenSpec(model, size[0], size[1], frames=frames_, steps=steps, seed=_seed(rid),
                   prompt=f"video {rid}")
    return Request(rid, Kind.VIDEO, spec, **kw)


def straight_digest(spec: GenSpec, steps: int | None = None) -> bytes:
    st = EmuState.new("reference", spec)
    for _ in range(spec.steps if steps is None else steps):
        st.step()
    return st.digest


def straight(r: Request) -> np.ndarray:
    """The placeholder of `r`'s spec run straight through."""
    return frames.render(r.spec, r.spec.steps, straight_digest(r.spec))


def assert_straight(res, r: Request) -> None:
    got = res.outputs[r.id]
    assert isinstance(got, np.ndarray), (r.id, type(got))
    assert np.array_equal(got, straight(r)), r.id


def statuses(r: Request) -> list[Status]:
    return [s for _, s in r.history]


def assert_ended_once(r: Request, status: Status) -> None:
    got = statuses(r)
    assert got[-1] is status, (r.id, got, r.reason)
    assert sum(s.is_final for s in got) == 1, (r.id, got)


def wait_ready(pool: WorkerPool) -> None:
    deadline = time.monotonic() + 60
    while not pool.ready():
        assert time.monotonic() < deadline, "replacement worker did not start"
        time.sleep(0.05)


class Watched:
    """The pool, recording the member types of every `Run` submitted; `on_submit(ranks)` runs
    right after each submit."""

    def __init__(self, pool, on_submit=None):
        self._pool, self.on_submit = pool, on_submit
        self.members: list[str] = []

    def __getattr__(self, name):
        return getattr(self._pool, name)

    def submit(self, ranks, job):
        jid = self._pool.submit(ranks, job)
        self.members += [type(m).__name__ for m in job.members]
        if self.on_submit is not None:
            self.on_submit(tuple(ranks))
        return jid


# ----- 1. units: states, digests, outputs -----

def test_state_round_trips_and_carries_the_real_payload_size():
    for spec in (GenSpec("sd3-medium", 1024, 1024, guidance=5.0),
                 GenSpec("wan2.1-14b", 720, 1280, frames=81, steps=50, guidance=5.0),
                 GenSpec("flux-dev", 1024, 1024)):  # no CFG: one prompt embedding
        m = get_model(spec.model)
        st = EmuState.new("r-1", spec)
        assert len(st.payload) == payload_bytes(spec) == m.state_bytes(spec.height, spec.width,
                                                                        spec.frames)
        for _ in range(3):
            st.step()
        blob = st.to_bytes()
        assert len(blob) > len(st.payload)
        back = EmuState.from_bytes(blob)
        assert (back.request_id, back.spec, back.step_index, back.digest) == (
            "r-1", spec, 3, st.digest)
        assert len(back.payload) == len(st.payload)
        assert identity(blob) == ("r-1", 3)
    # 720p, 81 frames: 16 x 21 x 90 x 160 fp32 latents plus two 512 x 4096 bf16 embeddings.
    assert payload_bytes(GenSpec("wan2.1-14b", 720, 1280, frames=81)) == (
        16 * 21 * 90 * 160 * 4 + 2 * 512 * 4096 * 2)


def test_damaged_or_foreign_blobs_are_refused_with_value_error():
    spec = GenSpec("sd3-medium", 512, 512, steps=4)
    st = EmuState.new("r-2", spec)
    st.step()
    blob = st.to_bytes()
    head_end = len(MAGIC) + 4 + struct.unpack_from("!I", blob, len(MAGIC))[0]
    other_spec = GenSpec("sd3-medium", 768, 768, steps=4)
    other = EmuState.new("r-3", other_spec).to_bytes()
    bad = {
        "foreign (a torch checkpoint's zip)": b"PK\x03\x04" + bytes(100),
        "empty": b"",
        "only the magic": MAGIC,
        "header cut short": blob[:len(MAGIC) + 2],
        "head cut short": blob[:head_end - 10],
        "head garbled": blob[:len(MAGIC) + 4] + b"\xff" * (head_end - len(MAGIC) - 4)
                        + blob[head_end:],
        "payload cut short": blob[:-1],
        "payload too long": blob + b"\0",
        "another's payload": blob[:head_end] + other[-payload_bytes(other_spec):],
        "head not a state": MAGIC + struct.pack("!I", 5) + pickle.dumps(5, protocol=4),
        "head without a spec": MAGIC + struct.pack("!I", len(pickle.dumps({"request_id": "x"})))
                               + pickle.dumps({"request_id": "x"}),
    }
    for what, b in bad.items():
        with pytest.raises(ValueError):
            EmuState.from_bytes(b)
            pytest.fail(f"{what}: accepted")
    with pytest.raises(ValueError):
        identity(blob[:-7])
    assert EmuState.from_bytes(blob).step_index == 1  # the good one still loads


def test_digest_depends_on_spec_and_steps_only():
    spec = GenSpec("wan2.1-1.3b", 480, 832, frames=5, steps=10, seed=7, prompt="a fox")
    a = EmuState.new("a", spec)
    for _ in range(10):
        a.step()
    b = EmuState.new("b", spec)  # another request id: the same output
    for _ in range(4):
        b.step()
    b = EmuState.from_bytes(b.to_bytes())
    assert b.step_index == 4
    for _ in range(6):
        b.step()
    assert b.done and b.digest == a.digest == straight_digest(spec)
    with pytest.raises(ValueError):
        b.step()  # all steps done
    assert straight_digest(spec, 9) != a.digest
    for other in (GenSpec("wan2.1-1.3b", 480, 832, frames=5, steps=10, seed=8, prompt="a fox"),
                  GenSpec("wan2.1-1.3b", 480, 832, frames=5, steps=10, seed=7, prompt="a hen")):
        assert straight_digest(other, 10) != a.digest


def test_placeholders_have_the_requested_shapes_raw_and_encoded():
    img = GenSpec("sd3-medium", 512, 768, steps=28)
    vid = GenSpec("wan2.1-1.3b", 480, 832, frames=5, steps=50)
    get_model(vid.model).validate_shape(vid.height, vid.width, vid.frames, vid.steps)
    d_img, d_vid = straight_digest(img), straight_digest(vid)
    raw_img = frames.render(img, 28, d_img)
    raw_vid = frames.render(vid, 50, d_vid)
    assert raw_img.shape == (512, 768, 3) and raw_img.dtype == np.uint8
    assert raw_vid.shape == (5, 480, 832, 3) and raw_vid.dtype == np.uint8
    # Another digest, another background; the video's bar grows frame by frame.
    assert not np.array_equal(frames.render(img, 28, straight_digest(img, 27)), raw_img)
    assert (raw_vid[-1] == 255).sum() > (raw_vid[0] == 255).sum()

    enc = frames.encode(img, 28, d_img)
    assert isinstance(enc, Encoded) and enc.media_type == PNG
    assert np.array_equal(enc.decode(), raw_img)  # PNG: exactly
    enc = frames.encode(vid, 50, d_vid)
    assert isinstance(enc, Encoded) and enc.media_type == MP4
    assert enc.decode().shape == (5, 480, 832, 3)


# ----- 2. the exchange -----

def _exchange_child(root: str, rank: int, gen: int, to: int | None, payload_n: int, up) -> None:
    ex = Exchange(root, rank, gen)
    if to is not None:
        assert ex.send(to, Parcel("hello", b"\x01" * payload_n))
        assert ex.send(to, JobEnd("end/7", {"r": 3}, ("q",)))
    up.put(os.getpid())
    time.sleep(120)


def _start_child(ctx, root, rank, gen, to=None, payload_n=0):
    up = ctx.Queue()
    p = ctx.Process(target=_exchange_child, args=(root, rank, gen, to, payload_n, up),
                    daemon=True)
    p.start()
    assert up.get(timeout=60) == p.pid
    return p


@pytest.fixture
def exchange_dir():
    import tempfile

    # Short: a Unix socket's path has a length limit (108 bytes).
    d = tempfile.mkdtemp(prefix="emu-x-")
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def test_exchange_delivers_under_the_key_and_sees_a_killed_sender_at_once(exchange_dir):
    ctx = mp.get_context("spawn")
    me = Exchange(exchange_dir, 0, 0)
    ticks = []
    p = _start_child(ctx, exchange_dir, 1, 0, to=0, payload_n=3 << 20)
    try:
        got = me.take("hello", 1, 0, 30, lambda: ticks.append(1))
        assert got == Parcel("hello", b"\x01" * (3 << 20))
        assert me.take("end/7", 1, 0, 30, lambda: None) == JobEnd("end/7", {"r": 3}, ("q",))
        assert me.alive(1, 0)
        # A live sender that never sends: the wait runs to its timeout, ticking.
        t0 = time.monotonic()
        assert me.take("never", 1, 0, 0.3, lambda: ticks.append(1)) is None
        assert 0.3 <= time.monotonic() - t0 < 3
        assert ticks
        # The sender killed while a receiver waits: the wait ends at once (the child is not
        # reaped yet: a zombie is dead too), far under its timeout.
        threading.Timer(0.3, os.kill, (p.pid, signal.SIGKILL)).start()
        t0 = time.monotonic()
        assert me.take("never", 1, 0, 30, lambda: None) is None
        waited = time.monotonic() - t0
        assert 0.2 < waited < 3, waited
        assert not me.alive(1, 0)
        p.join(10)  # (its other threads may still be going down for a moment)
        assert not me.send(1, Parcel("x"))  # nobody listens there any more
        # To itself: filed at once.
        assert me.send(0, Parcel("self", b"z"))
        assert me.take("self", 0, 0, 1, lambda: None) == Parcel("self", b"z")
    finally:
        p.kill()
        p.join(10)
        me.close()


def test_exchange_sees_a_sender_replaced_in_a_later_world(exchange_dir):
    """Rank 1 restarted in world 2 will never send what world 1's rank 1 owed: a receiver
    waiting for world 1's message gives up at once; one waiting in world 2 keeps waiting.
    `joined`: whether a rank is up for a world (a dead pid file is a replacement to wait for)."""
    ctx = mp.get_context("spawn")
    me = Exchange(exchange_dir, 0, 1)
    p = _start_child(ctx, exchange_dir, 1, 2)
    try:
        assert me.alive(1, 2) and not me.alive(1, 1)
        assert me.joined(1, 1) and me.joined(1, 2) and me.joined(1, 3)
        t0 = time.monotonic()
        assert me.take("owed", 1, 1, 30, lambda: None) is None
        assert time.monotonic() - t0 < 1
        t0 = time.monotonic()
        assert me.take("owed", 1, 2, 0.3, lambda: None) is None
        assert time.monotonic() - t0 >= 0.3
        p.kill()
        p.join(10)
        assert not me.alive(1, 2)
        assert not me.joined(1, 3)  # its replacement for world 3 has not written its file yet
        assert me.joined(1, 1)  # superseded since world 1
    finally:
        p.kill()
        p.join(10)
        me.close()


def test_a_pool_whose_workers_die_at_start_leaves_no_exchange_behind(tmp_path):
    """Workers that die while starting (here: a profile directory without profiles) fail the
    pool's start with WorkerLost, and the pool's exchange directory goes with it."""
    from genserve.emulate import Emulation
    from genserve.parallel.workers import WorkerLost

    def exchanges() -> set[str]:
        return {p.name for p in Path("/dev/shm").glob("genserve-emu-*")}

    before = exchanges()
    with pytest.raises(WorkerLost, match="start-up"):
        WorkerPool(MODELS, 2, emulate=Emulation(str(tmp_path)), start_timeout_s=60)
    assert exchanges() <= before


# ----- 3. the engine on 8 emulated GPUs -----

@pytest.fixture(scope="module")
def pool():
    # A wait on another worker gives up after 10 s (a test that should fail does not hang).
    with WorkerPool(MODELS, 8, emulate=emulation_for("h200", SCALE, gpus=8), faults=FAULTS,
                    collective_timeout_s=10) as p:
        yield p


@pytest.fixture(scope="module")
def lat():
    return LatencyModel("h200")


def engine(policy, pool, lat, **kw) -> Engine:
    return Engine(policy, pool, lat, 8, time_scale=SCALE, **kw)


def test_a_video_preempted_for_urgent_images_finishes_with_the_straight_output(pool, lat):
    """A wan2.1-14b video runs (boosted over several GPUs) when sixteen images of distinct
    shapes (no batching: twice the GPUs) arrive with tight deadlines: at its next step boundary
    genserve gives every GPU to images and pauses the video, then resumes it; every output is the
    straight-through one."""
    vid = video("pre-vid", model="wan2.1-14b", frames_=17, steps=16, deadline=600.0)
    sizes = [(h, w) for h in (512, 640, 768, 1024) for w in (512, 640, 768, 1024)]
    imgs = [image(f"pre-i{i}", size=s, arrival=2.0, deadline=10.0) for i, s in enumerate(sizes)]
    res = engine(make_policy("genserve"), pool, lat).run([vid, *imgs])
    for r in (vid, *imgs):
        assert_ended_once(r, Status.FINISHED)
        assert_straight(res, r)
    why = (statuses(vid), res.timeline[vid.id])
    assert res.preemptions >= 1 and Status.PREEMPTED in statuses(vid), why
    # Paused for the images: while it was paused (from its first PREEMPTED to the RUNNING
    # after it), images ran on GPUs it had held.
    i = statuses(vid).index(Status.PREEMPTED)
    paused, resumed = vid.history[i][0], vid.history[i + 1][0]
    assert vid.history[i + 1][1] is Status.RUNNING, why
    held = {g for s, e, gpus in res.timeline[vid.id] if e <= paused for g in gpus}
    during = [(r.id, gpus) for r in imgs for s, e, gpus in res.timeline[r.id]
              if s < resumed and e > paused and set(gpus) & held]
    assert during, (why, [res.timeline[r.id] for r in imgs])
    assert len(res.timeline[vid.id]) >= 2


def test_the_engine_corrects_a_wrong_profile_from_the_quanta_it_runs(pool, lat):
    """The policy plans with step times 1.5x the emulated GPUs' (the truth): after a few images on
    the real clock its correction for that model is near the truth's, and only that model's
    moved."""
    from genserve.feedback import Corrected, Scaled

    belief = Corrected(Scaled(lat, {"flux-dev": 1.5}))
    imgs = [image(f"fb-{i}", size=(1024, 1024), model="flux-dev", steps=20, arrival=0.5 * i,
                  deadline=500.0) for i in range(6)]
    engine(make_policy("genserve"), pool, belief).run(imgs)
    assert all(r.status is Status.FINISHED for r in imgs)
    assert belief.observations >= 6
    # Within 25% of the truth: quanta on a loaded 2-core machine overrun by a few ms (1.0, no
    # learning, stays far outside).
    assert belief.estimate("flux-dev") == pytest.approx(1 / 1.5, rel=0.25)
    assert belief.estimate("sd3-medium") == 1.0


def test_sp_re_sharding_across_degrees_and_sets_gives_the_straight_output(pool, lat):
    """1 -> 2 GPUs (moved in, shared by the first rank), 2 -> 1 (from one of two holders), 1 -> 2
    overlapping (held by the non-first rank), 2 -> 4 (disjoint), 4 -> 2 inside (resident), 2 -> 2
    overlapping (held by the first rank), then 1 elsewhere."""
    vid = video("sp-vid", steps=26)
    route = [((0,), 3), ((1, 2), 3), ((3,), 3), ((2, 3), 3), ((4, 5, 6, 7), 3), ((4, 5), 3),
             ((5, 6), 3), ((0,), 99)]
    watched = Watched(pool)
    res = engine(Route({vid.id: route}), watched, lat).run([vid])
    assert_ended_once(vid, Status.FINISHED)
    assert [q[2] for q in res.timeline[vid.id]] == [g for g, _ in route]
    assert len({len(q[2]) for q in res.timeline[vid.id]}) == 3  # SP 1, 2 and 4
    assert watched.members == ["New", "Incoming", "Incoming", "Held", "Incoming", "Resident",
                               "Held", "Incoming"]
    assert res.moves_bytes == 0 and res.recovered == 0 and res.restarts == 0
    assert_straight(res, vid)
    left = {g: EmuState.from_bytes(b).step_index for g in range(8)
            for b in pool.fetch(g, [vid.id]).values()}
    assert left == {}, left  # the holders along the way dropped their copies, the last finished


def test_a_member_late_to_end_its_job_keeps_no_stale_copy(pool, lat):
    """An SP-4 job on 4-7, then the rest on 4 and 5 (resident there: 6 and 7 are told to drop
    their copies).  Worker 7 is stopped (SIGSTOP) for 0.3 s as the SP-4 job is submitted, so it
    takes the first rank's word on where the job ended late: the job must not end before it has
    settled its copy, or the drop that follows the job's end finds nothing and the copy it
    settles afterwards stays for good."""
    vid = video("late-vid", steps=9)

    def on_submit(ranks):
        if ranks == (4, 5, 6, 7):
            pid = pool.procs[7].pid
            os.kill(pid, signal.SIGSTOP)
            threading.Timer(0.3, os.kill, (pid, signal.SIGCONT)).start()

    watched = Watched(pool, on_submit)
    res = engine(Route({vid.id: [((4, 5, 6, 7), 3), ((4, 5), 99)]}), watched, lat).run([vid])
    assert_ended_once(vid, Status.FINISHED)
    assert watched.members == ["New", "Resident"]
    assert [q[2] for q in res.timeline[vid.id]] == [(4, 5, 6, 7), (4, 5)]
    assert_straight(res, vid)
    time.sleep(0.1)  # (worker 7 is running again: its control thread has served the drop)
    left = {g: EmuState.from_bytes(b).step_index for g in range(8)
            for b in pool.fetch(g, [vid.id]).values()}
    assert left == {}, left


@pytest.mark.parametrize("missing_on", [2, 3])
def test_a_member_without_the_state_fails_the_sp_job_and_holds_up_no_one(pool, missing_on):
    """An SP-2 job whose first rank (2) or other member (3) lacks a resident state: the job fails
    at once (a JobError), and neither rank waits for the other until the world's timeout (10 s
    here) before its next job."""
    from genserve.parallel.protocol import New, Noop, Resident, Run
    from genserve.parallel.workers import WorkerError

    spec = GenSpec("wan2.1-1.3b", 480, 832, 33, steps=10, prompt="gap")
    rid = f"gap-{missing_on}"
    pool.wait(pool.submit((2, 3), Run(spec.model, (New(rid, spec),), 2)), timeout_s=30)
    assert rid in pool.fetch(missing_on, [rid])  # taken off that worker (a round trip)
    t0 = time.monotonic()
    job = pool.submit((2, 3), Run(spec.model, (Resident(rid),), 2))
    with pytest.raises(WorkerError, match=f"worker {missing_on}: KeyError: .no resident state"):
        pool.wait(job, timeout_s=30)
    for g in (2, 3):
        pool.wait(pool.submit((g,), Noop()), timeout_s=30)
    assert time.monotonic() - t0 < 5
    pool.drop([2, 3], [rid])


def test_cancel_inside_an_sp2_job_stops_it_and_leaves_nothing(pool, lat):
    """A 100-step SP-2 video (about 96 trace s, 5 wall s) is cancelled at 10 s: it stops at a
    step boundary, an image meanwhile finishes on GPU 2, neither member of the group keeps the
    state, and the group serves the next video exactly."""
    vid = video("can-vid", model="wan2.1-14b", steps=100)
    img = image("can-img", arrival=1.0)
    place = {vid.id: (0, 1), img.id: (2,)}
    t0 = time.monotonic()
    res = engine(Pinned(lambda r: place[r.id]), pool, lat).run([vid, img],
                                                              cancel_at={vid.id: 10.0})
    assert time.monotonic() - t0 < 4
    assert_ended_once(vid, Status.CANCELLED)
    assert vid.id not in res.outputs and vid.steps_done < vid.steps
    (start, end, gpus), = res.timeline[vid.id]
    assert gpus == (0, 1) and start < 10.0 <= end < 40.0, (start, end)
    assert_ended_once(img, Status.FINISHED)
    assert_straight(res, img)
    for g in (0, 1):
        assert pool.fetch(g, [vid.id]) == {}
    after = video("can-after", model="wan2.1-14b", steps=6)
    res = engine(Pinned(lambda r: (0, 1)), pool, lat).run([after])
    assert_ended_once(after, Status.FINISHED)
    assert [q[2] for q in res.timeline[after.id]] == [(0, 1)]
    assert_straight(res, after)


def test_cancel_one_request_of_a_batch(pool, lat):
    """Three images share one 200-step job on GPU 4 (about 10 trace s); one is cancelled at 3 s
    and leaves at the next step; the others finish with the straight output."""
    reqs = [image(f"cb-{c}", steps=200) for c in "abc"]
    res = engine(Pinned(lambda r: (4,)), pool, lat).run(reqs, cancel_at={"cb-b": 3.0})
    a, b, c = reqs
    assert_ended_once(b, Status.CANCELLED)
    assert b.steps_done < b.steps and b.id not in res.outputs
    for r in (a, c):
        assert_ended_once(r, Status.FINISHED)
        assert_straight(res, r)
    assert len({tuple(q) for r in reqs for q in res.timeline[r.id]}) == 1  # one job
    (start, end, _), = res.timeline[a.id]
    assert start < 3.0 < end
    assert pool.fetch(4, [b.id]) == {}


@pytest.mark.parametrize("kind, rid, says", [("oom", "oom-b", "out_of_memory"),
                                             ("error", "err-b", "injected error at step 2")])
def test_an_induced_failure_fails_only_that_request_of_a_batch(pool, lat, kind, rid, says):
    prefix = rid.split("-")[0]
    reqs = [image(f"{prefix}-a", steps=8), image(rid, steps=8), image(f"{prefix}-c", steps=8)]
    res = engine(Pinned(lambda r: (5,)), pool, lat).run(reqs)
    a, b, c = reqs
    assert_ended_once(b, Status.FAILED)
    assert says in b.reason, b.reason
    assert b.id not in res.outputs
    for r in (a, c):
        assert_ended_once(r, Status.FINISHED)
        assert_straight(res, r)
    assert {q[2] for r in reqs for q in res.timeline[r.id]} == {(5,)}


def test_bad_input_fails_alone_and_names_the_field(pool, lat):
    bad = video("bad-frames", frames_=6, steps=4)  # frames must be 4k+1
    good = [image("bad-ok", steps=4), video("bad-okv", steps=4)]
    res = engine(make_policy("genserve"), pool, lat).run([bad, *good])
    assert_ended_once(bad, Status.FAILED)
    assert "frames" in bad.reason, bad.reason
    for r in good:
        assert_ended_once(r, Status.FINISHED)
        assert_straight(res, r)


def test_a_worker_sigkilled_mid_job_resumes_from_its_checkpoint(pool, lat):
    """The video runs 8 steps on GPU 3 (checkpointed at step 8), then a 32-step job there; the
    worker is SIGKILLed 0.15 wall s into that job (about 1/4 of it).  The job is lost, the worker
    replaced, and the video resumes from its step-8 checkpoint on the replacement: the output is
    the straight one."""
    wait_ready(pool)
    vid = video("kill-vid", steps=40)
    killed: list[float] = []
    eng = None

    def kill():
        killed.append(eng.now())
        os.kill(pool.procs[3].pid, signal.SIGKILL)

    def on_update(r, output):
        if r.id == vid.id and r.steps_done == 8 and not killed and r.status is Status.RUNNING:
            killed.append(-1.0)
            threading.Timer(0.15, kill).start()

    watched = Watched(pool)
    eng = engine(Route({vid.id: [((3,), 8), ((3,), 99)]}), watched, lat, checkpoint_every=4,
                 on_update=on_update)
    t0 = time.monotonic()
    res = eng.run([vid])
    assert time.monotonic() - t0 < 10
    why = (statuses(vid), res.timeline[vid.id], watched.members, killed)
    assert_ended_once(vid, Status.FINISHED)
    assert len(killed) == 2, why
    assert res.restarts == 1 and res.recovered == 1, why
    assert Status.PREEMPTED in statuses(vid), why  # rolled back to the checkpoint
    # The 32-step job was submitted and lost (not in the timeline); the rest ran again from the
    # checkpoint, which the worker wrote to a file and the new one read (no bytes via the driver).
    assert watched.members == ["New", "Resident", "Stored"], why
    (s0, e0, g0), (s1, e1, g1) = res.timeline[vid.id]
    assert g0 == g1 == (3,) and e0 < killed[1] < s1, why
    assert_straight(res, vid)
    wait_ready(pool)
    assert pool.alive() == list(range(8))
    after = image("kill-after", steps=4)
    res = engine(Pinned(lambda r: (3,)), pool, lat).run([after])
    assert_ended_once(after, Status.FINISHED)
    assert_straight(res, after)


def slow_replacements(pool, monkeypatch, hold_s: float) -> list[tuple[int, bool]]:
    """Replacement workers start `hold_s` late (SIGSTOPped as soon as forked: a loaded machine);
    returns (pid, whether its pid file was not written yet when stopped) per replacement."""
    spawn, held = pool._spawn, []

    def slow_spawn(rank, world, spec):
        spawn(rank, world, spec)
        pid = pool.procs[rank].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            named = int(open(os.path.join(pool._exchange, f"pid.{rank}")).read().split()[0])
        except (OSError, ValueError, IndexError):
            named = None
        held.append((pid, named != pid))
        threading.Timer(hold_s, os.kill, (pid, signal.SIGCONT)).start()

    monkeypatch.setattr(pool, "_spawn", slow_spawn)
    return held


def test_the_first_rank_of_an_sp2_job_exits_mid_job(pool, lat, monkeypatch):
    """Worker 6, first rank of an SP-2 job on (6, 7), exits at step 6 (injected); worker 7, which
    waits for the first rank's word on where the job ended, sees it die at once (not at the
    worker timeout).  The video resumes from its step-4 checkpoint on the group, with 6's
    replacement, which starts late (1 s): worker 7 joins the new world only once it is up (it
    must not take the replacement for its dead predecessor), then ends with the straight
    output."""
    wait_ready(pool)
    held = slow_replacements(pool, monkeypatch, 1.0)
    vid = video("exit-sp", steps=12)
    watched = Watched(pool)
    t0 = time.monotonic()
    res = engine(Route({vid.id: [((6, 7), 4), ((6, 7), 4), ((7,), 99)]}), watched, lat,
                 checkpoint_every=4).run([vid])
    assert time.monotonic() - t0 < 10
    why = (statuses(vid), vid.reason, res.timeline[vid.id], watched.members)
    assert_ended_once(vid, Status.FINISHED)
    assert res.restarts == 1 and res.recovered == 1, why
    # Steps 4-7 again from the checkpoint, on the group with the replacement (which may still be
    # starting when worker 7 takes the job: 7 must wait for it, not take it for dead), then the
    # rest on 7 alone, from the copy it kept.
    assert watched.members == ["New", "Resident", "Stored", "Resident"], why
    assert [q[2] for q in res.timeline[vid.id]] == [(6, 7), (6, 7), (7,)], why
    assert len(held) == 1, held
    assert_straight(res, vid)
    wait_ready(pool)
    for g in (6, 7):
        assert pool.fetch(g, [vid.id]) == {}


def test_encoded_outputs_are_the_straight_placeholders(pool, lat):
    imgs = [image("enc-i0", size=(512, 512), steps=8), image("enc-i1", size=(512, 512), steps=8),
            image("enc-f", size=(1024, 1024), steps=8, model="flux-dev")]
    vid = video("enc-v", steps=8)
    res = engine(make_policy("genserve"), pool, lat, output=OutputFormat()).run([*imgs, vid])
    for r in (*imgs, vid):
        assert_ended_once(r, Status.FINISHED)
        assert isinstance(res.outputs[r.id], Encoded), r.id
    for r in imgs:
        assert res.outputs[r.id].media_type == PNG
        assert np.array_equal(res.outputs[r.id].decode(), straight(r)), r.id
    assert res.outputs[vid.id].media_type == MP4
    assert res.outputs[vid.id].decode().shape == (5, 480, 832, 3)


# ----- 4. 64 emulated GPUs over 8 nodes -----

def test_a_mixed_trace_on_64_gpus_over_8_nodes_finishes_everything():
    scale = 50.0
    rng = np.random.default_rng(5)
    reqs: list[Request] = []
    shapes = [("sd3-medium", (512, 512)), ("sd3-medium", (1024, 1024)),
              ("flux-dev", (1024, 1024))]
    for i in range(30):
        model, size = shapes[i % 3]
        t = float(rng.uniform(0, 20))
        reqs.append(image(f"t-i{i}", size=size, model=model, steps=20, arrival=t,
                          deadline=t + 15))
    for i in range(10):
        model = "wan2.1-14b" if i % 2 else "wan2.1-1.3b"
        t = float(rng.uniform(0, 20))
        reqs.append(video(f"t-v{i}", model=model, frames_=9, steps=20, arrival=t,
                          deadline=t + 90))
    lat = LatencyModel("h200")
    with WorkerPool(MODELS, 64, emulate=emulation_for("h200", scale, gpus=64, nodes=8)) as p:
        assert p.alive() == list(range(64))
        t0 = time.monotonic()
        res = Engine(make_policy("genserve"), p, lat, 8, time_scale=scale,
                     output=OutputFormat()).run(reqs)
        wall = time.monotonic() - t0
    bad = [(r.id, r.status, r.reason) for r in reqs if r.status is not Status.FINISHED]
    assert not bad, bad
    assert wall < 30, wall
    assert res.num_gpus == 64 and res.restarts == 0
    used = {g for r in reqs for q in res.timeline[r.id] for g in q[2]}
    assert len({g // 8 for g in used}) >= 2, sorted(used)  # more than one node served
    for r in reqs:
        out = res.outputs[r.id]
        assert isinstance(out, Encoded), r.id
        assert out.media_type == (PNG if r.kind is Kind.IMAGE else MP4), r.id
    for r in reqs[:3]:
        assert np.array_equal(res.outputs[r.id].decode(), straight(r)), r.id
