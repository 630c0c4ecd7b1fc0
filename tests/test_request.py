import json
import math

import pytest

from genserve.request import InvalidTransition, Kind, Request, Status
from genserve.spec import GenSpec


def make(**kw):
    """A request; keyword arguments name `GenSpec` or `Request` fields."""
    spec = dict(model="sd3-medium", height=512, width=512, steps=4)
    spec.update({k: kw.pop(k) for k in list(kw) if k in GenSpec.__dataclass_fields__})
    base = dict(arrival=1.0, deadline=10.0)
    base.update(kw)
    return Request(base.pop("id", "r1"), base.pop("kind", Kind.IMAGE), GenSpec(**spec), **base)


def running(now=2.0, gpus=(0,), **kw):
    r = make(**kw)
    r.start(now, gpus)
    return r


def done(**kw):
    r = running(**kw)
    r.advance(r.steps)
    return r


def finished(at=5.0, **kw):
    r = done(**kw)
    r.finish(at)
    return r


# ----- construction -----

def test_new_request_records_arrival_as_waiting():
    r = make()
    assert r.status is Status.WAITING
    assert r.history == [(1.0, Status.WAITING)]
    assert not r.started and not r.is_final


def test_kind_given_as_string_is_converted():
    assert make(kind="video").kind is Kind.VIDEO
    with pytest.raises(ValueError):
        make(kind="audio")


# ----- allowed transitions -----

def test_start_records_time_and_gpus():
    r = make()
    r.start(2.5, [3, 4])
    assert r.status is Status.RUNNING
    assert r.gpus == (3, 4) and isinstance(r.gpus, tuple)
    assert r.history[-1] == (2.5, Status.RUNNING)
    assert r.started


def test_preempt_and_resume_record_history():
    r = running(2.0, (0,))
    r.advance(1)
    r.preempt(3.0)
    assert r.status is Status.PREEMPTED
    assert r.gpus == (0,)  # state still lives where it was
    r.resume(4.0, (5, 6))
    assert r.status is Status.RUNNING
    assert r.gpus == (5, 6)
    assert r.history == [(1.0, Status.WAITING), (2.0, Status.RUNNING), (3.0, Status.PREEMPTED),
                         (4.0, Status.RUNNING)]


def test_advance_counts_steps_without_touching_history():
    r = running()
    before = list(r.history)
    r.advance(1)
    r.advance(2)
    assert r.steps_done == 3
    assert r.remaining_steps == 1
    assert r.status is Status.RUNNING
    assert r.history == before


def test_move_to_changes_gpus_only():
    r = running(gpus=(0,))
    before = list(r.history)
    r.move_to([2, 3])
    assert r.gpus == (2, 3)
    assert r.status is Status.RUNNING
    assert r.history == before


def test_finish_after_all_steps():
    r = done()
    r.finish(6.0)
    assert r.status is Status.FINISHED
    assert r.finish_time == 6.0
    assert r.history[-1] == (6.0, Status.FINISHED)
    assert r.latency == pytest.approx(5.0)
    assert r.is_final


@pytest.mark.parametrize("setup", ["waiting", "running", "preempted"])
def test_cancel_from_every_live_state(setup):
    r = make()
    if setup != "waiting":
        r.start(2.0, (0,))
    if setup == "preempted":
        r.preempt(3.0)
    r.cancel(4.0, "user")
    assert r.status is Status.CANCELLED
    assert (r.finish_time, r.reason) == (4.0, "user")
    assert r.history[-1] == (4.0, Status.CANCELLED)


def test_cancel_default_reason():
    r = make()
    r.cancel(2.0)
    assert r.reason == "cancelled"


@pytest.mark.parametrize("setup", ["waiting", "running", "preempted"])
def test_fail_from_every_live_state(setup):
    r = make()
    if setup != "waiting":
        r.start(2.0, (0,))
    if setup == "preempted":
        r.preempt(3.0)
    r.fail(4.0, "oom")
    assert r.status is Status.FAILED
    assert (r.finish_time, r.reason) == (4.0, "oom")
    assert r.history[-1] == (4.0, Status.FAILED)


def test_reject_waiting():
    r = make()
    r.reject(1.5, "infeasible")
    assert r.status is Status.REJECTED
    assert (r.finish_time, r.reason) == (1.5, "infeasible")
    assert r.history == [(1.0, Status.WAITING), (1.5, Status.REJECTED)]


# ----- illegal transitions -----

def _assert_unchanged(r, status, history):
    assert r.status is status
    assert r.history == history


def test_finish_before_all_steps_raises():
    r = running()
    r.advance(3)
    hist = list(r.history)
    with pytest.raises(InvalidTransition, match="3/4"):
        r.finish(5.0)
    _assert_unchanged(r, Status.RUNNING, hist)
    assert r.finish_time is None


def test_finish_while_waiting_raises():
    with pytest.raises(InvalidTransition):
        make().finish(2.0)


def test_finish_while_preempted_with_all_steps_raises():
    r = done()
    r.preempt(3.0)
    with pytest.raises(InvalidTransition):
        r.finish(4.0)
    assert r.status is Status.PREEMPTED


def test_preempt_waiting_raises():
    r = make()
    with pytest.raises(InvalidTransition, match="waiting -> preempted"):
        r.preempt(2.0)
    _assert_unchanged(r, Status.WAITING, [(1.0, Status.WAITING)])


def test_preempt_preempted_raises():
    r = running()
    r.preempt(3.0)
    with pytest.raises(InvalidTransition):
        r.preempt(4.0)


def test_resume_running_raises():
    r = running(gpus=(0,))
    hist = list(r.history)
    with pytest.raises(InvalidTransition, match="running -> running"):
        r.resume(3.0, (1,))
    _assert_unchanged(r, Status.RUNNING, hist)
    assert r.gpus == (0,)


def test_resume_waiting_raises():
    with pytest.raises(InvalidTransition):
        make().resume(2.0, (0,))


def test_start_twice_raises():
    r = running()
    with pytest.raises(InvalidTransition):
        r.start(3.0, (1,))


def test_start_preempted_raises():
    r = running()
    r.preempt(3.0)
    with pytest.raises(InvalidTransition):
        r.start(4.0, (1,))


@pytest.mark.parametrize("setup", ["waiting", "preempted"])
def test_advance_when_not_running_raises(setup):
    r = make()
    if setup == "preempted":
        r.start(2.0, (0,))
        r.preempt(3.0)
    with pytest.raises(InvalidTransition):
        r.advance(1)
    assert r.steps_done == 0


@pytest.mark.parametrize("n", [0, -1, 5])
def test_advance_bad_count_raises(n):
    r = running()
    with pytest.raises(InvalidTransition):
        r.advance(n)
    assert r.steps_done == 0


def test_advance_past_total_raises():
    r = running()
    r.advance(3)
    with pytest.raises(InvalidTransition):
        r.advance(2)
    assert r.steps_done == 3


@pytest.mark.parametrize("setup", ["waiting", "preempted"])
def test_move_to_when_not_running_raises(setup):
    r = make()
    if setup == "preempted":
        r.start(2.0, (0,))
        r.preempt(3.0)
    gpus = r.gpus
    with pytest.raises(InvalidTransition):
        r.move_to((7,))
    assert r.gpus == gpus


@pytest.mark.parametrize("setup", ["running", "preempted"])
def test_reject_after_start_raises(setup):
    r = running()
    if setup == "preempted":
        r.preempt(3.0)
    with pytest.raises(InvalidTransition):
        r.reject(4.0, "late")
    assert r.reason is None


def _final(kind):
    if kind == "finished":
        return finished()
    r = make()
    if kind == "cancelled":
        r.cancel(2.0)
    elif kind == "failed":
        r.fail(2.0, "x")
    else:
        r.reject(2.0, "x")
    return r


FINAL_KINDS = ["finished", "cancelled", "failed", "rejected"]
ACTIONS = {
    "start": lambda r: r.start(9.0, (1,)),
    "preempt": lambda r: r.preempt(9.0),
    "resume": lambda r: r.resume(9.0, (1,)),
    "advance": lambda r: r.advance(1),
    "move_to": lambda r: r.move_to((1,)),
    "finish": lambda r: r.finish(9.0),
    "cancel": lambda r: r.cancel(9.0),
    "fail": lambda r: r.fail(9.0, "y"),
    "reject": lambda r: r.reject(9.0, "y"),
}


@pytest.mark.parametrize("final", FINAL_KINDS)
@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_nothing_leaves_a_final_state(final, action):
    r = _final(final)
    status, hist = r.status, list(r.history)
    finish_time, reason, steps = r.finish_time, r.reason, r.steps_done
    assert status.is_final
    with pytest.raises(InvalidTransition):
        ACTIONS[action](r)
    _assert_unchanged(r, status, hist)
    assert (r.finish_time, r.reason, r.steps_done) == (finish_time, reason, steps)


def test_status_is_final_flags():
    assert {s for s in Status if s.is_final} == {
        Status.FINISHED, Status.CANCELLED, Status.FAILED, Status.REJECTED}


# ----- derived values -----

def test_remaining_steps():
    r = running(steps=28)
    assert r.remaining_steps == 28
    r.advance(10)
    assert r.remaining_steps == 18


def test_met_deadline_on_time_and_at_deadline():
    assert finished(at=5.0, deadline=10.0).met_deadline
    assert finished(at=10.0, deadline=10.0).met_deadline


def test_met_deadline_false_when_late():
    assert not finished(at=10.01, deadline=10.0).met_deadline


def test_met_deadline_false_unless_finished():
    r = make(deadline=10.0)
    assert not r.met_deadline
    r.cancel(2.0)  # ended before the deadline but not FINISHED
    assert r.finish_time <= r.deadline
    assert not r.met_deadline
    r2 = done(deadline=10.0)
    assert not r2.met_deadline  # all steps done, not yet finished


# ----- trace I/O -----

def test_trace_round_trip():
    r = make(id="x9", model="wan2.1-14b", kind=Kind.VIDEO, height=480, width=832, frames=81,
             steps=50, guidance=5.0, seed=1234, prompt="a cat \u00e9", arrival=3.25,
             deadline=99.5, standalone=41.0)
    d = r.to_trace()
    assert d["kind"] == "video"
    d2 = json.loads(json.dumps(d))
    r2 = Request.from_trace(d2)
    assert r2.to_trace() == d
    assert r2.kind is Kind.VIDEO
    assert r2.status is Status.WAITING and r2.steps_done == 0
    assert r2.history == [(3.25, Status.WAITING)]


def test_trace_round_trip_infinite_deadline():
    r = make(deadline=math.inf)
    r2 = Request.from_trace(json.loads(json.dumps(r.to_trace())))
    assert r2.deadline == math.inf


def test_from_trace_defaults_and_ignores_unknown_keys():
    d = {"id": "a", "model": "sd3-medium", "kind": "image", "height": 512, "width": 512,
         "arrival": 1.0, "deadline": 2.0, "status": "finished", "extra": 1}
    r = Request.from_trace(d)
    assert r.status is Status.WAITING
    assert (r.frames, r.steps, r.standalone) == (1, 28, 0.0)


@pytest.mark.parametrize("missing", ["id", "model", "kind", "height", "width", "arrival",
                                     "deadline"])
def test_from_trace_requires_keys(missing):
    d = make().to_trace()
    del d[missing]
    with pytest.raises(ValueError, match=missing):
        Request.from_trace(d)


@pytest.mark.parametrize("optional", ["frames", "steps", "guidance", "seed", "prompt",
                                      "standalone"])
def test_from_trace_optional_keys(optional):
    d = make().to_trace()
    del d[optional]
    assert Request.from_trace(d).id == "r1"


def test_rollback_returns_to_a_checkpoint_and_forgets_the_gpus():
    r = Request("a", Kind.IMAGE, GenSpec("sd3-medium", 512, 512, steps=10))
    r.start(1.0, (0, 1))
    r.advance(7)
    r.rollback(2.0, 4)
    assert (r.status, r.steps_done, r.gpus) == (Status.PREEMPTED, 4, ())
    assert r.history[-1] == (2.0, Status.PREEMPTED)
    r.rollback(3.0, 0)  # no checkpoint: start over, from PREEMPTED too
    assert r.steps_done == 0 and r.remaining_steps == 10
    r.resume(4.0, (2,))
    r.advance(10)
    r.finish(5.0)
    assert r.status is Status.FINISHED


@pytest.mark.parametrize("bad", [-1, 6])
def test_rollback_cannot_go_forward_or_below_zero(bad):
    r = Request("a", Kind.IMAGE, GenSpec("sd3-medium", 512, 512, steps=10))
    r.start(1.0, (0,))
    r.advance(5)
    with pytest.raises(InvalidTransition, match="roll back"):
        r.rollback(2.0, bad)


def test_rollback_and_relocate_refuse_waiting_and_final_requests():
    r = Request("a", Kind.IMAGE, GenSpec("sd3-medium", 512, 512, steps=2))
    with pytest.raises(InvalidTransition):
        r.rollback(1.0, 0)
    with pytest.raises(InvalidTransition, match="relocated"):
        r.relocate((1,))
    r.start(1.0, (0, 1))
    r.relocate((1,))  # a worker of its group died: the surviving copy
    assert r.gpus == (1,)
    r.advance(2)
    r.finish(2.0)
    with pytest.raises(InvalidTransition):
        r.rollback(3.0, 0)
    with pytest.raises(InvalidTransition):
        r.relocate((0,))
