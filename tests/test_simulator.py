"""The discrete-event simulator: invariants under every policy, plan validation, horizon, costs.

CPU only and deterministic: hypothesis runs derandomized, without its example database.
"""

from __future__ import annotations

from typing import Callable

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from genserve.catalog import get_model
from genserve.latency import LatencyModel
from genserve.metrics import summarize
from genserve.policies import (Assignment, Cluster, Plan, Policy, SchedulerState, make_policy,
                               policy_names)
from genserve.request import Request, Status
from genserve.sim import PlanError, SimConfig, Simulator
from genserve.workload import WorkloadConfig, generate
from genserve.spec import GenSpec

LAT = LatencyModel()  # shipped H200 profile

BASELINES = [n for n in policy_names() if not n.startswith("genserve")]
GENSERVE_FAMILY = [n for n in policy_names() if n.startswith("genserve")]



# ----------------------------------------------------------------------------- helpers
def req(rid: str, model: str, height: int, width: int, frames: int = 1, *, arrival: float = 0.0,
        deadline: float = float("inf"), steps: int | None = None) -> Request:
    spec = get_model(model)
    return Request(rid, spec.kind,
                   GenSpec(model, height, width, frames=frames, steps=steps or spec.steps),
                   arrival=arrival, deadline=deadline)


def sd3(rid: str, size: int = 512, **kw) -> Request:
    return req(rid, "sd3-medium", size, size, **kw)


class Checked:
    """Wraps a policy and checks every plan it returns against the state it was given."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.plans = 0

    def describe(self) -> str:
        return self.policy.describe()

    def schedule(self, s: SchedulerState) -> Plan:
        plan = self.policy.schedule(s)
        self.plans += 1
        used = [g for a in plan.assignments for g in a.gpus]
        assert len(used) == len(set(used)), f"t={s.now}: GPU double-booked: {plan.assignments}"
        assert set(used) <= set(s.free_gpus), (
            f"t={s.now}: busy GPU in plan {used}, free {s.free_gpus}")
        ids = [i for a in plan.assignments for i in a.requests]
        assert len(ids) == len(set(ids)), f"t={s.now}: request in two assignments"
        assert set(ids) <= {r.id for r in s.queue}
        assert not (set(ids) & {r.id for r in s.running})
        return plan


class Scripted(Policy):
    """A fake policy: `fn(state, call_index) -> Plan`."""

    name = "scripted"

    def __init__(self, fn: Callable[[SchedulerState, int], Plan]):
        super().__init__()
        self.fn, self.calls = fn, 0

    def schedule(self, state: SchedulerState) -> Plan:
        self.calls += 1
        return self.fn(state, self.calls)


def run(policy, n_gpus: int, requests: list[Request], cluster: Cluster | None = None, **cfg):
    return Simulator(cluster or Cluster(n_gpus), LAT, policy, SimConfig(**cfg)).run(requests)


def check_drained(res, reqs: list[Request], n_gpus: int) -> None:
    for r in reqs:
        assert r.status is Status.FINISHED, (r.id, r.status, r.history[-3:])
        assert r.steps_done == r.steps
        assert r.finish_time is not None and r.finish_time >= r.arrival
        assert r.history[0] == (r.arrival, Status.WAITING)
        assert r.history[-1] == (r.finish_time, Status.FINISHED)
        times = [t for t, _ in r.history]
        assert times == sorted(times)
        assert r.history[1][1] is Status.RUNNING
        assert r.finish_time <= res.end_time + 1e-9
    assert res.busy_gpu_s >= 0
    assert res.busy_gpu_s <= n_gpus * res.end_time + 1e-6
    # Each request needs at least its encode + all steps at its fastest degree (or CFG split,
    # under guidance) + decode.
    for r in reqs:
        fastest = min(LAT.standalone(r, k) for k in LAT.degrees(r.model))
        if r.shape[-1]:
            fastest = min([fastest] + [
                LAT.standalone(r, 1) + r.steps * (LAT.request_step_time(r, 1, k, False, True)
                                                  - LAT.request_step_time(r, 1, 1))
                for k in LAT.cfg_split_sizes(r.model)])
        assert r.finish_time - r.arrival >= fastest - 1e-6


def workload(rate: float, duration: float, video_share: float, seed: int, n: int):
    return generate(WorkloadConfig(rate=rate, duration=duration, video_share=video_share,
                                   seed=seed), LAT, n)


workloads = dict(
    rate=st.floats(0.02, 0.3), duration=st.floats(300, 900), video_share=st.floats(0, 1),
    seed=st.integers(0, 10_000), n_gpus=st.integers(2, 8))

PROPERTY = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- properties
@pytest.mark.parametrize("name", [
    *BASELINES, *GENSERVE_FAMILY])
@PROPERTY
@example(rate=0.1, duration=600.0, video_share=0.1, seed=4, n_gpus=8)  # once stalled genserve
@given(**workloads)
def test_drained_run_finishes_everything(name, rate, duration, video_share, seed, n_gpus):
    reqs = workload(rate, duration, video_share, seed, n_gpus)
    pol = Checked(make_policy(name))
    res = run(pol, n_gpus, reqs, drain=True)
    assert pol.plans == res.decisions > 0 or not reqs
    check_drained(res, reqs, n_gpus)


@pytest.mark.parametrize("name", GENSERVE_FAMILY)
@settings(PROPERTY, max_examples=12)
@given(**workloads)
def test_genserve_plans_are_valid_until_the_last_arrival(name, rate, duration, video_share,
                                                         seed, n_gpus):
    """The drained test above is blocked by the stall bug; this keeps checking genserve's plans.

    Cutting at the last-but-one arrival keeps a future event on the heap, so a stall cannot end
    the run early; everything up to there must be a valid plan and consistent request states.
    """
    reqs = workload(rate, duration, video_share, seed, n_gpus)
    if len(reqs) < 2:
        return
    h = sorted(r.arrival for r in reqs)[-2]
    pol = Checked(make_policy(name))
    res = run(pol, n_gpus, reqs, horizon=h)
    assert res.end_time == h
    for r in reqs:
        assert 0 <= r.steps_done <= r.steps
        assert (r.status is Status.FINISHED) == (r.steps_done == r.steps)
        if r.status is Status.FINISHED:
            assert r.arrival <= r.finish_time <= h
        if r.arrival > h:
            assert r.history == [(r.arrival, Status.WAITING)]
    assert 0 <= res.busy_gpu_s <= n_gpus * h + 1e-6


# ----------------------------------------------------------------------------- stall regressions
def test_genserve_lone_video_needing_all_gpus_is_served():
    """8 idle GPUs, one Wan-14B video that meets its deadline only at SP 8 (plus 5 s of slack).

    Regression: the video budget is 8 - reserve(>= 1) = 7 < 8, so it was never admitted and its
    next wake-up rounded to `now` and was dropped: a stall.  Critical videos may use the reserve.
    """
    v = req("v", "wan2.1-14b", 480, 832, 81)
    v.deadline = LAT.standalone(v, 8) + 5.0
    assert LAT.standalone(v, 4) > v.deadline
    run(make_policy("genserve"), 8, [v], drain=True)
    assert v.status is Status.FINISHED


def test_genserve_paused_admitted_video_is_resumed():
    """A paused, admitted Wan-14B 720p video stalls at the exact moment its laxity hits 2 steps.

    Regression found by the property test (seed 0, 4 GPUs): laxity - 2*step came out +4e-14, so
    the video was not 'critical' and its next wake-up rounded to now.
    """
    reqs = workload(0.1, 600.0, 0.1, 0, 4)
    run(make_policy("genserve"), 4, reqs, drain=True)
    assert all(r.status is Status.FINISHED for r in reqs)


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", ["genserve", "tetriserve", "static"])
def test_same_workload_twice_gives_identical_results(name):
    def once():
        reqs = workload(0.2, 400.0, 0.4, 11, 4)
        res = run(make_policy(name), 4, reqs, horizon=400.0)
        return reqs, res

    (a, ra), (b, rb) = once(), once()
    assert [r.finish_time for r in a] == [r.finish_time for r in b]
    assert [r.history for r in a] == [r.history for r in b]
    assert summarize(ra) == summarize(rb)
    assert (ra.end_time, ra.decisions, ra.preemptions, ra.migrations, ra.busy_gpu_s) == (
        rb.end_time, rb.decisions, rb.preemptions, rb.migrations, rb.busy_gpu_s)
    assert sum(r.status is Status.FINISHED for r in a) > 0


def test_workload_generation_is_deterministic():
    a, b = workload(0.2, 400.0, 0.4, 11, 4), workload(0.2, 400.0, 0.4, 11, 4)
    assert [r.to_trace() for r in a] == [r.to_trace() for r in b]
    assert [r.to_trace() for r in a] != [r.to_trace() for r in workload(0.2, 400.0, 0.4, 12, 4)]


# ----------------------------------------------------------------------------- plan validation
def one_shot(make_plan: Callable[[SchedulerState], Plan]) -> Scripted:
    """A fake policy whose first decision is `make_plan(state)`; after that it plans greedily."""

    def fn(s: SchedulerState, call: int) -> Plan:
        if call == 1:
            return make_plan(s)
        return greedy(s)

    return Scripted(fn)


def greedy(s: SchedulerState) -> Plan:
    free = list(s.free_gpus)
    plan = Plan()
    for r in s.queue:
        if free:
            plan.assignments.append(Assignment((free.pop(0),), (r.id,), r.remaining_steps))
    return plan


def test_valid_scripted_plan_runs():
    reqs = [sd3("a"), sd3("b")]
    res = run(one_shot(greedy), 2, reqs, drain=True)
    check_drained(res, reqs, 2)
    one = LAT.standalone(reqs[0], 1)
    assert reqs[0].finish_time == pytest.approx(one) and reqs[1].finish_time == pytest.approx(one)
    assert res.busy_gpu_s == pytest.approx(2 * one)


def test_plan_error_busy_gpu():
    # "a" runs all its steps on GPU 0; at b's arrival the policy puts b on GPU 0 as well.
    reqs = [sd3("a"), sd3("b", arrival=0.1)]

    def fn(s, call):
        if call == 1:
            return Plan([Assignment((0,), ("a",), 28)])
        return Plan([Assignment((0,), ("b",), 28)])

    with pytest.raises(PlanError, match="busy"):
        run(Scripted(fn), 2, reqs, drain=True)


@pytest.mark.parametrize("plan", [
    Plan([Assignment((5,), ("a",), 1)]),                                  # no such GPU
    Plan([Assignment((0, 0), ("a",), 1)]),                                # same GPU twice
    Plan([Assignment((0, 1), ("a",), 1), Assignment((1,), ("b",), 1)]),   # two jobs on GPU 1
], ids=["out-of-range", "duplicate", "overlap"])
def test_plan_error_gpu_out_of_range_or_duplicate(plan):
    with pytest.raises(PlanError, match="busy or duplicate"):
        run(one_shot(lambda s: plan), 2, [sd3("a"), sd3("b")])


def test_plan_error_unknown_request():
    with pytest.raises(PlanError, match="nope"):
        run(one_shot(lambda s: Plan([Assignment((0,), ("nope",), 1)])), 1, [sd3("a")])


def test_plan_error_request_not_yet_arrived_or_in_flight():
    reqs = [sd3("a"), sd3("b", arrival=0.1), sd3("c", arrival=50.0)]

    def fn(s, call):
        if call == 1:
            return Plan([Assignment((0,), ("a",), 28)])
        return Plan([Assignment((1,), ("a",), 1)])  # a is still in flight

    with pytest.raises(PlanError, match="'a'"):
        run(Scripted(fn), 2, reqs)
    reqs = [sd3("a"), sd3("later", arrival=5.0)]
    with pytest.raises(PlanError, match="later"):
        run(one_shot(lambda s: Plan([Assignment((0,), ("later",), 1)])), 1, reqs)


def test_plan_error_request_listed_twice():
    with pytest.raises(PlanError, match="twice"):
        run(one_shot(lambda s: Plan([Assignment((0,), ("a", "a"), 1)])), 1, [sd3("a")])


@pytest.mark.parametrize("other", [
    lambda: sd3("b", 1024),
    lambda: req("b", "flux-dev", 512, 512),
    lambda: req("b", "wan2.1-1.3b", 480, 832, 33),
])
def test_plan_error_mixed_shapes(other):
    reqs = [sd3("a"), other()]
    with pytest.raises(PlanError, match="shapes differ"):
        run(one_shot(lambda s: Plan([Assignment((0,), ("a", "b"), 1)])), 1, reqs)


def test_same_shape_batch_is_accepted_and_cheaper_than_two_runs():
    reqs = [sd3("a"), sd3("b")]
    res = run(one_shot(lambda s: Plan([Assignment((0,), ("a", "b"), 28)])), 1, reqs)
    # Encoded one by one inside the job (as the workers do), steps batched, decoded one by one.
    both = (2 * LAT.encode_time("sd3-medium") + 28 * LAT.request_step_time(reqs[0], 2, 1)
            + 2 * LAT.decode_time("sd3-medium", 512, 512))
    assert reqs[0].finish_time == reqs[1].finish_time == pytest.approx(both)
    assert both < 2 * LAT.standalone(reqs[0], 1)
    assert res.busy_gpu_s == pytest.approx(both)


@pytest.mark.parametrize("model, shape, k", [
    ("sd3-medium", (512, 512, 1), 3),
    ("wan2.1-1.3b", (480, 832, 33), 8),  # 12 heads: no SP 8
])
def test_plan_error_sp_degree_not_allowed(model, shape, k):
    assert k not in LAT.degrees(model)
    r = req("a", model, *shape)
    with pytest.raises(PlanError, match=f"SP degree {k}"):
        run(one_shot(lambda s: Plan([Assignment(tuple(range(k)), ("a",), 1)])), 8, [r])


def test_plan_error_steps_exceed_remaining():
    r = sd3("a")
    with pytest.raises(PlanError, match="exceed"):
        run(one_shot(lambda s: Plan([Assignment((0,), ("a",), 29)])), 1, [r])
    # Also after some steps are done: 10 done, 18 left, 19 asked.
    r = sd3("a")

    def fn(s, call):
        return Plan([Assignment((0,), ("a",), 10 if call == 1 else 19)])

    with pytest.raises(PlanError, match="exceed"):
        run(Scripted(fn), 1, [r])
    assert r.steps_done == 10


@pytest.mark.parametrize("a", [Assignment((0,), ("a",), 0), Assignment((), ("a",), 1),
                               Assignment((0,), (), 1)])
def test_plan_error_empty_assignment(a):
    with pytest.raises(PlanError, match="empty or zero-step"):
        run(one_shot(lambda s: Plan([a])), 1, [sd3("a")])


def test_stall_is_reported():
    with pytest.raises(PlanError, match="stalled"):
        run(Scripted(lambda s, call: Plan()), 2, [sd3("a"), sd3("b", arrival=3.0)], drain=True)


def test_stall_after_some_progress_is_reported_with_its_time():
    def fn(s, call):
        return Plan([Assignment((0,), ("a",), 5)]) if call == 1 else Plan()

    with pytest.raises(PlanError, match=r"stalled at t=0\.1"):
        run(Scripted(fn), 1, [sd3("a")], drain=True)


def test_wake_at_calls_the_policy_back():
    r = sd3("a")

    def fn(s, call):
        if s.now < 5.0:
            return Plan(wake_at=5.0)
        return Plan([Assignment((0,), ("a",), 28)])

    pol = Scripted(fn)
    res = run(pol, 1, [r], drain=True)
    assert pol.calls == 2
    assert r.history[1] == (5.0, Status.RUNNING)
    assert r.finish_time == pytest.approx(5.0 + LAT.standalone(r, 1))
    assert res.decisions == 2


# ----------------------------------------------------------------------------- horizon
def test_horizon_cuts_the_run():
    reqs = workload(0.2, 600.0, 0.5, 2, 4)
    h = 150.0
    res = run(make_policy("genserve"), 4, reqs, horizon=h)
    assert res.end_time == h
    finished = [r for r in reqs if r.status is Status.FINISHED]
    assert finished and len(finished) < len(reqs)
    for r in reqs:
        if r.status is Status.FINISHED:
            assert r.finish_time <= h
        else:
            assert r.finish_time is None and r.steps_done < r.steps
            assert not r.met_deadline
        if r.arrival > h:
            assert r.history == [(r.arrival, Status.WAITING)]
    assert 0 < res.busy_gpu_s <= 4 * h + 1e-6


def test_horizon_busy_time_counts_only_the_part_that_ran():
    r = sd3("a")
    res = run(one_shot(lambda s: Plan([Assignment((0,), ("a",), 28)])), 1, [r], horizon=0.3)
    assert r.status is Status.RUNNING and r.steps_done == 0
    assert res.end_time == 0.3
    assert res.busy_gpu_s == pytest.approx(0.3)


def test_horizon_after_the_last_event_ends_at_the_last_event():
    r = sd3("a")
    res = run(make_policy("fcfs"), 1, [r], horizon=1000.0)
    assert r.status is Status.FINISHED
    assert res.end_time == r.finish_time == pytest.approx(LAT.standalone(r, 1))


def test_default_horizon_is_the_last_deadline():
    late = sd3("late", arrival=0.0, deadline=0.2)
    res = run(make_policy("fcfs"), 1, [late])
    assert late.status is Status.RUNNING and not late.met_deadline
    assert res.end_time == 0.2
    late2 = sd3("late", arrival=0.0, deadline=0.2)
    res = run(make_policy("fcfs"), 1, [late2], drain=True)
    assert late2.status is Status.FINISHED and res.end_time > 0.2


def test_bad_horizon_and_duplicate_ids_are_rejected():
    with pytest.raises(ValueError, match="horizon"):
        Simulator(Cluster(1), LAT, make_policy("fcfs"), SimConfig(horizon=0))
    with pytest.raises(ValueError, match="unique"):
        run(make_policy("fcfs"), 1, [sd3("a"), sd3("a")])


# ----------------------------------------------------------------------------- move costs
def resume_run(first: tuple[int, ...], second: tuple[int, ...], *, pause: bool,
               cluster: Cluster) -> tuple[Request, object]:
    """Run 10 steps on `first`, optionally pause until t=5, then finish on `second`."""
    r = sd3("a")

    def fn(s, call):
        if call == 1:
            return Plan([Assignment(first, ("a",), 10)])
        if pause and s.now < 5.0:
            return Plan(wake_at=5.0)
        return Plan([Assignment(second, ("a",), r.remaining_steps)])

    res = run(Scripted(fn), cluster.num_gpus, [r], cluster=cluster, drain=True)
    return r, res


@pytest.mark.parametrize("pause", [True, False])
def test_move_to_another_gpu_costs_move_time(pause):
    c = Cluster(2)
    same, res_same = resume_run((0,), (0,), pause=pause, cluster=c)
    moved, res_moved = resume_run((0,), (1,), pause=pause, cluster=c)
    assert same.status is moved.status is Status.FINISHED
    cost = LAT.move_time(moved, cross_node=False)
    assert cost > 0
    assert moved.finish_time - same.finish_time == pytest.approx(cost, rel=1e-6)
    assert (res_same.migrations, res_moved.migrations) == (0, 1)
    assert moved.gpus == (1,) and same.gpus == (0,)
    if pause:
        assert res_same.preemptions == res_moved.preemptions == 1
        assert [s for _, s in moved.history] == [Status.WAITING, Status.RUNNING,
                                                  Status.PREEMPTED, Status.RUNNING,
                                                  Status.FINISHED]
    else:
        assert res_moved.preemptions == 0


def test_cross_node_move_costs_more_than_in_node_move():
    c = Cluster(2, gpus_per_node=1)
    same, _ = resume_run((0,), (0,), pause=True, cluster=c)
    moved, _ = resume_run((0,), (1,), pause=True, cluster=c)
    cost = LAT.move_time(moved, cross_node=True)
    assert cost > LAT.move_time(moved, cross_node=False)
    assert moved.finish_time - same.finish_time == pytest.approx(cost, rel=1e-6)


def test_resharding_to_more_gpus_is_charged_and_uses_the_new_degree():
    c = Cluster(2)
    r, _ = resume_run((0,), (0, 1), pause=True, cluster=c)
    expect = (5.0 + LAT.move_time(r, cross_node=False)
              + 18 * LAT.request_step_time(r, 1, 2) + LAT.decode_time("sd3-medium", 512, 512))
    assert r.finish_time == pytest.approx(expect)


def test_encode_is_charged_once_and_decode_at_the_end():
    r = sd3("a")
    ends = []

    def fn(s, call):
        ends.append(s.now)
        return Plan([Assignment((0,), ("a",), 7)])

    run(Scripted(fn), 1, [r], drain=True)
    step = LAT.request_step_time(r, 1, 1)
    enc, dec = LAT.encode_time("sd3-medium"), LAT.decode_time("sd3-medium", 512, 512)
    assert ends == pytest.approx([0.0, enc + 7 * step, enc + 14 * step, enc + 21 * step])
    assert r.finish_time == pytest.approx(enc + 28 * step + dec)
    assert r.finish_time == pytest.approx(LAT.standalone(r, 1))


def test_running_request_not_replanned_is_preempted():
    reqs = [sd3("a"), sd3("b")]

    def fn(s, call):
        if call == 1:
            return Plan([Assignment((0,), ("a",), 5)])
        ids = {r.id for r in s.queue}
        if "b" in ids and call == 2:
            return Plan([Assignment((0,), ("b",), 28)])  # a is paused here
        return greedy(s)

    res = run(Scripted(fn), 1, reqs, drain=True)
    assert res.preemptions == 1
    assert [s for _, s in reqs[0].history] == [Status.WAITING, Status.RUNNING,
                                                Status.PREEMPTED, Status.RUNNING,
                                                Status.FINISHED]
    assert reqs[0].history[3][0] == pytest.approx(reqs[1].finish_time)
    check_drained(res, reqs, 1)
