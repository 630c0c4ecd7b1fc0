"""The real engine under failures and cancellations: a worker killed mid-video, cancels inside a
batch, before arrival, while paused and inside an SP-2 job, an induced OOM / error in one request
of a batch, and bad input inside a trace.  Every request ends exactly once; the survivors' outputs
are those of running each request alone.

One pool of 4 CPU workers serves the whole module (a worker start costs seconds); the injected
faults are keyed by request ids that only one test uses.
"""

from __future__ import annotations

import time
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from genserve.engine import Engine  # noqa: E402
from genserve.latency import LatencyModel  # noqa: E402
from genserve.models import GenRequest, GenSpec, load_preset  # noqa: E402
from genserve.parallel.workers import WorkerLost, WorkerPool  # noqa: E402
from genserve.policies import Plan, Policy, make_policy  # noqa: E402
from genserve.policies.base import Assignment  # noqa: E402
from genserve.profiler import profile_workers, write_profile  # noqa: E402
from genserve.request import Kind, Request, Status  # noqa: E402

from _policies import Pinned  # noqa: E402

PRESETS = ("tiny-t2i", "tiny-t2v")

# Test 1 kills worker 3 when the video steps from step 10 (the video runs on GPU 3: see there);
# "hold-img" kills worker 0 while it holds a paused video.
KILL_STEP, KILL_RANK = 10, 3
FAULTS = {
    "kill-vid": {"kind": "exit", "step": KILL_STEP, "rank": KILL_RANK},
    "hold-img": {"kind": "exit", "step": 1, "rank": 0},
    "oom-b": {"kind": "oom", "step": 2},
    "err-b": {"kind": "error", "step": 2},
}


# Workers fork from the tests' fork server (tests/_spawn.py); test_engine_acceptance and the
# serve processes of test_server_drain keep the production spawn path covered.
pytestmark = pytest.mark.usefixtures("forked_worker_pools")


@pytest.fixture(scope="module")
def pool(forked_worker_pools):
    with WorkerPool(PRESETS, 4, faults=FAULTS, collective_timeout_s=20) as p:
        yield p


@pytest.fixture(scope="module")
def latency(pool, tmp_path_factory):
    """Measured inside worker 0 of the pool; tiny-t2v also gets SP-2 rows (no speed-up, so the
    genserve policy never widens a video on its own) so that plans may name 2-GPU groups."""
    fwd, blk, meta = profile_workers(list(PRESETS), batches=(2, 4, 8), reps=3, pool=pool)
    blk = blk + [{**r, "sp": 2} for r in blk if r["model"] == "tiny-t2v"]
    out = tmp_path_factory.mktemp("faults-prof")
    write_profile(out, "local", fwd, blk, meta)
    lat = LatencyModel(out)
    assert lat.degrees("tiny-t2v") == (1, 2) and lat.degrees("tiny-t2i") == (1,)
    return lat


_ADAPTERS: dict = {}


def alone(r: Request) -> np.ndarray:
    """Reference output: the request run start to finish in this process, alone."""
    torch.set_num_threads(1)
    ad = _ADAPTERS.get(r.model) or _ADAPTERS.setdefault(r.model, load_preset(r.model))
    return ad.generate(GenRequest(r.id, r.spec))


def assert_alone(res, r: Request) -> None:
    got, ref = res.outputs[r.id].astype(int), alone(r).astype(int)
    assert got.shape == ref.shape, r.id
    assert np.abs(got - ref).max() <= 1, r.id


def image(rid: str, arrival: float = 0.0, size: tuple[int, int] = (64, 64), steps: int = 8,
          guidance: float = 5.0, **kw) -> Request:
    spec = GenSpec("tiny-t2i", size[0], size[1], steps=steps, guidance=guidance,
                   seed=zlib.crc32(rid.encode()) % 1000, prompt=f"image {rid}")
    return Request(rid, Kind.IMAGE, spec, arrival=arrival, **kw)


def video(rid: str, arrival: float = 0.0, steps: int = 30, frames: int = 9, **kw) -> Request:
    spec = GenSpec("tiny-t2v", 32, 32, frames=frames, steps=steps,
                   seed=zlib.crc32(rid.encode()) % 1000, prompt=f"video {rid}")
    return Request(rid, Kind.VIDEO, spec, arrival=arrival, **kw)


def statuses(r: Request) -> list[Status]:
    return [s for _, s in r.history]


def assert_ended_once(r: Request, status: Status) -> None:
    """`status` is the last entry of the history and the only final one."""
    got = statuses(r)
    assert got[-1] is status, (r.id, got)
    assert sum(s.is_final for s in got) == 1, (r.id, got)


class StopAndGo(Policy):
    """Videos run `first` steps, then pause until `resume_at`, then run the rest; images run to
    completion on their own GPU."""

    name = "stop-and-go"

    def __init__(self, first: int, resume_at: float):
        super().__init__()
        self.first, self.resume_at = first, resume_at

    def schedule(self, s):
        plan = Plan()
        free = sorted(s.free_gpus)
        for r in sorted(s.queue, key=lambda r: r.id):
            if not free:
                break
            if r.kind is Kind.VIDEO and r.steps_done >= self.first and s.now < self.resume_at:
                plan.wake_at = self.resume_at
                continue
            n = (self.first if r.kind is Kind.VIDEO and r.steps_done < self.first
                 else r.remaining_steps)
            g = r.gpus[0] if r.gpus and r.gpus[0] in free else free[0]
            free.remove(g)
            plan.assignments.append(Assignment((g,), (r.id,), n))
        return plan


def follow_up_on(pool, latency, gpus: tuple[int, ...], req: Request) -> None:
    """A small request planned on `gpus` finishes there with the exact output."""
    res = Engine(Pinned(place=lambda r: gpus), pool, latency).run([req])
    assert req.status is Status.FINISHED, (req.id, req.status, req.reason)
    assert [q[2] for q in res.timeline[req.id]] == [gpus]
    assert_alone(res, req)


# ----- 1. a worker dies mid-video -----

def test_worker_killed_mid_video_recovers_from_checkpoint_exactly(pool, latency):
    """Images of three distinct shapes (no batching) arrive with the video and take GPUs 0-2 under
    genserve, so the video starts on GPU 3, whose worker dies when the video steps from step 10.
    The video resumes from its newest reported checkpoint on whichever worker is free: step 8, or
    step 4 when the worker died before its saver thread reported step 8 (checkpoints are written
    off the job's path); the images that arrive during the restart finish too."""
    every = 4
    vid = video("kill-vid", steps=30)
    first = [image("kill-i0", size=(64, 64)), image("kill-i1", size=(48, 48)),
             image("kill-i2", size=(32, 32))]
    late = [image("kill-i3", arrival=1.0), image("kill-i4", arrival=1.2)]
    reqs = [vid, *first, *late]
    reported: list[int] = []
    res = Engine(make_policy("genserve"), pool, latency, checkpoint_every=every,
                 on_checkpoint=lambda rid, steps, saved: reported.append(steps)
                 if rid == vid.id else None).run(reqs)

    for r in reqs:
        assert_ended_once(r, Status.FINISHED)
    # The kill happened where it was meant to: the video's first quanta ran on GPU 3.
    quanta = res.timeline[vid.id]
    assert quanta[0][2] == (KILL_RANK,), quanta[:3]
    assert res.restarts == 1 and pool.restarts >= 1
    assert res.recovered >= 1
    assert Status.PREEMPTED in statuses(vid)  # rolled back, then resumed
    for r in reqs:
        assert_alone(res, r)
    # One quantum per step under genserve; the lost quantum is not in the timeline.  From the step-8
    # checkpoint only steps 8 and 9 run twice (from step 4: 4 to 9); starting over would redo 10.
    assert 4 in reported, reported
    redo = len(quanta) - vid.steps
    assert redo in (KILL_STEP - 8, KILL_STEP - 4), (redo, reported)
    assert KILL_STEP - redo in reported, (redo, reported)

    # The pool is whole again and serves on every worker, the replaced one included.
    deadline = time.monotonic() + 60
    while not pool.ready():
        assert time.monotonic() < deadline, "replacement worker did not start"
        time.sleep(0.1)
    assert pool.alive() == [0, 1, 2, 3]
    after = [image(f"kill-after{g}", steps=4) for g in range(4)]
    res = Engine(Pinned(place=lambda r: (int(r.id[-1]),)), pool, latency).run(after)
    for r in after:
        assert_ended_once(r, Status.FINISHED)
        assert_alone(res, r)
    assert {res.timeline[r.id][0][2] for r in after} == {(0,), (1,), (2,), (3,)}


def test_worker_killed_while_holding_a_paused_video(pool, latency):
    """The video runs 4 steps on GPU 0 (checkpointed to host at step 4) and is paused there; an
    image then runs on GPU 0 and kills its worker.  The image starts over, the paused video goes
    back to its step-4 checkpoint (not to step 0): both finish exactly."""
    vid = video("hold-vid", steps=20)
    img = image("hold-img", arrival=0.3)
    res = Engine(StopAndGo(first=4, resume_at=1.0), pool, latency, checkpoint_every=4).run(
        [vid, img])
    for r in (vid, img):
        assert_ended_once(r, Status.FINISHED)
        assert_alone(res, r)
    assert res.restarts == 1 and res.recovered == 2
    # Two quanta: 4 steps, then the 16 left.  Back at step 0 the policy would have run 4 steps
    # again first (a third quantum).
    q0, q1 = res.timeline[vid.id]
    assert q0[2] == (0,) and q0[1] < 0.3  # paused on GPU 0 before the image arrived
    # Paused, rolled back while paused (recorded as a second PREEMPTED), resumed once.
    assert statuses(vid) == [Status.WAITING, Status.RUNNING, Status.PREEMPTED, Status.PREEMPTED,
                             Status.RUNNING, Status.FINISHED]
    assert q1[0] >= 1.0
    assert res.timeline[img.id][0][2] == (0,)  # the lost job is not in the timeline
    assert len(res.timeline[img.id]) == 1



class DeathAtSubmit:
    """The real pool, except that the `nth` submit naming `rid` finds a member dead: a death the
    engine notices after it planned, e.g. while it fetched a moving state for the job."""

    def __init__(self, pool, rid: str, nth: int):
        self._pool, self.rid, self.nth, self.seen = pool, rid, nth, 0

    def __getattr__(self, name):
        return getattr(self._pool, name)

    def submit(self, ranks, job):
        if any(m.rid == self.rid for m in job.members):
            self.seen += 1
            if self.seen == self.nth:
                raise WorkerLost(f"worker {ranks[0]} was lost during submit")
        return self._pool.submit(ranks, job)


def test_a_death_noticed_at_submit_rolls_that_assignment_back(pool, latency):
    """The video runs 4 steps (checkpointed), pauses; its resume's submit finds a worker dead.
    The assignment goes back like a lost job: to the step-4 checkpoint, then it is planned again;
    nothing is lost and the output is exact."""
    vid = video("submit-death", steps=12)
    wrapped = DeathAtSubmit(pool, vid.id, nth=2)
    res = Engine(StopAndGo(first=4, resume_at=0.3), wrapped, latency, checkpoint_every=4).run(
        [vid])
    assert wrapped.seen == 3
    assert_ended_once(vid, Status.FINISHED)
    assert res.recovered == 1 and res.restarts == 0
    assert [q[2] for q in res.timeline[vid.id]] == [(0,), (0,)]  # 4 steps, then the 8 left
    assert_alone(res, vid)

# ----- 2. cancellation -----

def test_cancel_one_request_inside_a_running_batch(pool, latency):
    """Three images share one 120-step job (about 2 s: ~18 ms per batched step); one is cancelled
    at 0.3 s and leaves the batch at the next step boundary; the other two go on and finish
    exactly as alone."""
    reqs = [image(f"cb-{c}", steps=120) for c in "abc"]
    t0 = time.monotonic()
    res = Engine(Pinned(), pool, latency).run(reqs, cancel_at={"cb-b": 0.3})
    wall = time.monotonic() - t0
    a, b, c = reqs
    assert_ended_once(b, Status.CANCELLED)
    assert b.steps_done < b.steps and b.id not in res.outputs
    for r in (a, c):
        assert_ended_once(r, Status.FINISHED)
        assert_alone(res, r)
    # One job held all three: the cancel came inside it, not before it started or after it ended.
    assert len({tuple(q) for r in reqs for q in res.timeline[r.id]}) == 1
    (start, end, _), = res.timeline[a.id]
    assert start < 0.3 < end, (start, end)
    assert wall < 30


def test_cancel_before_arrival_never_runs(pool, latency):
    early = image("cba-early")
    never = image("cba-never", arrival=2.0)
    res = Engine(Pinned(), pool, latency).run([early, never], cancel_at={never.id: 0.1})
    assert_ended_once(early, Status.FINISHED)
    assert_ended_once(never, Status.CANCELLED)
    assert statuses(never) == [Status.WAITING, Status.CANCELLED]
    assert never.id not in res.timeline and never.id not in res.outputs
    assert never.finish_time == never.arrival  # ended at its arrival: no negative latency


def test_cancel_before_arrival_does_not_wait_for_the_arrival(pool, latency):
    never = image("cbw-never", arrival=3.0)
    t0 = time.monotonic()
    Engine(Pinned(), pool, latency).run([never], cancel_at={never.id: 0.1})
    assert never.status is Status.CANCELLED
    assert time.monotonic() - t0 < 1.5
    assert never.latency == 0  # ended at its arrival: no negative latencies


def test_cancel_a_paused_video(pool, latency):
    """The video runs 4 steps, is paused until t=3 s (the policy asks to be woken then) and is
    cancelled at 0.8 s while paused; its resident state is dropped; the images finish."""
    vid = video("cp-vid", steps=30)
    imgs = [image("cp-i0"), image("cp-i1", arrival=0.2)]
    t0 = time.monotonic()
    res = Engine(StopAndGo(first=4, resume_at=3.0), pool, latency).run(
        [vid, *imgs], cancel_at={vid.id: 0.8})
    assert time.monotonic() - t0 < 2.5  # did not wait for the wake-up at 3 s
    assert_ended_once(vid, Status.CANCELLED)
    assert statuses(vid) == [Status.WAITING, Status.RUNNING, Status.PREEMPTED, Status.CANCELLED]
    assert vid.steps_done == 4 and vid.finish_time >= 0.8
    assert len(res.timeline[vid.id]) == 1
    for r in imgs:
        assert_ended_once(r, Status.FINISHED)
        assert_alone(res, r)
    # Nothing of the video is left on the worker that held it.
    assert pool.fetch(vid.gpus[0], [vid.id]) == {}


@pytest.mark.parametrize("group", [(0, 1), (1, 0)])
def test_cancel_inside_an_sp2_job(pool, latency, group):
    """A 300-step video on GPUs 0 and 1 (about 10 ms per SP-2 step) is cancelled at 0.4 s; an
    image on GPU 2 finishes meanwhile; the group then serves another SP-2 video exactly.  The plan
    may list the group in any order: the cancel must reach the rank that decides (the lowest)."""
    tag = "".join(map(str, group))
    vid = video(f"csp{tag}-vid", steps=300)
    img = image(f"csp{tag}-img", arrival=0.05, steps=8)
    place = {vid.id: group, img.id: (2,)}
    res = Engine(Pinned(place=lambda r: place[r.id]), pool, latency).run(
        [vid, img], cancel_at={vid.id: 0.4})
    assert_ended_once(vid, Status.CANCELLED)
    assert vid.steps_done < vid.steps and vid.id not in res.outputs
    (start, end, gpus), = res.timeline[vid.id]
    assert gpus == group and start < 0.4 <= end
    assert end < 2.0  # stopped early: the 300 steps take about 3 s
    assert_ended_once(img, Status.FINISHED)
    assert res.timeline[img.id][0][2] == (2,)
    assert_alone(res, img)
    for g in group:
        assert pool.fetch(g, [vid.id]) == {}
    follow_up_on(pool, latency, group, video(f"csp{tag}-after", steps=12))


# ----- 3. a request fails inside a batch -----

@pytest.mark.parametrize("kind, rid, gpu, says", [
    ("oom", "oom-b", 1, "out_of_memory"), ("error", "err-b", 2, "injected error at step 2")])
def test_induced_failure_fails_only_that_request_of_a_batch(pool, latency, kind, rid, gpu, says):
    """`rid` has an injected fault at step 2 (see FAULTS); it shares a degree-1 batch with two
    others.  Only it fails, with the reason; the batch-mates finish exactly; the worker serves on.
    (GPUs 1 and 2: the other tests replace workers 0 and 3, and a replacement has no faults.)"""
    prefix = rid.split("-")[0]
    reqs = [image(f"{prefix}-a"), image(rid), image(f"{prefix}-c")]
    res = Engine(Pinned(place=lambda r: (gpu,)), pool, latency).run(reqs)
    a, b, c = reqs
    assert_ended_once(b, Status.FAILED)
    assert says in b.reason, b.reason
    if kind == "oom":
        assert b.reason.startswith("out_of_memory"), b.reason
    assert b.id not in res.outputs
    (gpus,) = {q[2] for r in reqs for q in res.timeline[r.id]}  # one job, one GPU
    assert gpus == (gpu,)
    for r in (a, c):
        assert_ended_once(r, Status.FINISHED)
        assert_alone(res, r)
    follow_up_on(pool, latency, gpus, image(f"{prefix}-after"))


# ----- 4. bad input inside a trace -----

def test_bad_input_fails_alone_and_names_the_field(pool, latency):
    """Requests the worker's prepare rejects (ModelInputError): a 10-frame tiny-t2v video (frames
    must be 4k+1) and an image with negative guidance, among good requests; under genserve and
    inside a batch."""
    bad_frames = video("bad-frames", frames=10, steps=8)
    bad_guidance = image("bad-guidance", guidance=-1.0)
    good = [image("bad-ok0"), image("bad-ok1", arrival=0.05), video("bad-okv", steps=8)]
    res = Engine(make_policy("genserve"), pool, latency).run([bad_frames, bad_guidance, *good])
    assert_ended_once(bad_frames, Status.FAILED)
    assert "frames" in bad_frames.reason and "ModelInputError" in bad_frames.reason
    assert_ended_once(bad_guidance, Status.FAILED)
    assert "guidance" in bad_guidance.reason
    assert bad_frames.id not in res.outputs and bad_guidance.id not in res.outputs
    for r in good:
        assert_ended_once(r, Status.FINISHED)
        assert_alone(res, r)

    # In one batch with good requests of the same batch key (infinite guidance: CFG on, as theirs).
    batch = [image("badb-a"), image("badb-b", guidance=float("inf")), image("badb-c")]
    res = Engine(Pinned(), pool, latency).run(batch)
    assert len({q[2] for r in batch for q in res.timeline[r.id]}) == 1
    assert_ended_once(batch[1], Status.FAILED)
    assert "guidance" in batch[1].reason
    for r in (batch[0], batch[2]):
        assert_ended_once(r, Status.FINISHED)
        assert_alone(res, r)
