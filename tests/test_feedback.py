"""The self-correcting latency model (genserve/feedback.py) and the simulator that executes with a
true profile while the policy plans with a wrong one."""

from __future__ import annotations

import pickle

import pytest

from genserve.experiment import RunSpec, run_one
from genserve.feedback import Corrected, FeedbackConfig, Scaled, parse_factors
from genserve.latency import LatencyModel
from genserve.policies import Cluster, make_policy
from genserve.policies.base import SchedulerState
from genserve.request import Kind, Request
from genserve.sim import SimConfig, Simulator
from genserve.spec import GenSpec
from genserve.workload import WorkloadConfig, generate

LAT = LatencyModel("h200")
KEY = ("flux-dev", 4096, 1, 2, False)


def test_one_quantum_corrects_a_scale_error_and_noise_is_smoothed():
    belief = Corrected(Scaled(LAT, default=1.3))
    true = LAT.step_time(*KEY)
    assert belief.step_time(*KEY) == pytest.approx(1.3 * true)
    belief.observe(KEY, 10, 10 * true)
    assert belief.step_time(*KEY) == pytest.approx(true)
    assert belief.estimate("flux-dev") == pytest.approx(1 / 1.3)
    # Another shape of the same model, never seen: corrected by the model's factor.
    assert belief.step_time("flux-dev", 1024, 2, 1) == pytest.approx(LAT.step_time(
        "flux-dev", 1024, 2, 1))
    # Other models are untouched.
    assert belief.step_time("sd3-medium", 1024, 1, 1) == pytest.approx(
        1.3 * LAT.step_time("sd3-medium", 1024, 1, 1))
    # One outlier (2x) moves the estimate by alpha of its log, not to it.
    belief.observe(KEY, 1, 2 * true)
    assert belief.step_time(*KEY) == pytest.approx(true * 2 ** 0.3)


def test_version_changes_only_when_a_factor_moves_enough():
    belief = Corrected(LAT, FeedbackConfig(publish_change=0.02))
    t = LAT.step_time(*KEY)
    belief.observe(KEY, 1, 1.01 * t)  # 1%: not worth re-planning for
    assert belief.version == 0 and belief.step_time(*KEY) == t
    belief.observe(KEY, 1, 1.5 * t)
    assert belief.version > 0 and belief.step_time(*KEY) > t
    v = belief.version
    belief.observe(KEY, 1, 0.0)  # fixed parts over-predicted: nothing learned
    assert belief.version == v and belief.observations == 2


def test_views_keep_the_base_data_and_pickle():
    view = Corrected(Scaled(LAT, {"sd3-medium": 0.7}))
    assert view.degrees("wan2.1-14b") == LAT.degrees("wan2.1-14b")
    assert view.encode_time("sd3-medium") == LAT.encode_time("sd3-medium")
    assert view.dispatch_time() == LAT.dispatch_time()
    copy = pickle.loads(pickle.dumps(view))
    assert copy.step_time(*KEY) == view.step_time(*KEY)


def test_parse_factors_and_bad_ones():
    assert parse_factors("1.3") == ({}, 1.3)
    assert parse_factors("sd3-medium=0.7,*=1.1") == ({"sd3-medium": 0.7}, 1.1)
    with pytest.raises(ValueError, match="expected FACTOR"):
        parse_factors("sd3-medium=fast")
    with pytest.raises(ValueError, match="> 0"):
        Scaled(LAT, default=0.0)
    with pytest.raises(ValueError, match="profile error"):
        RunSpec(profile_error="x").validate()


def test_a_truth_equal_to_the_belief_changes_nothing():
    wl = WorkloadConfig(rate=0.1, duration=900, video_share=0.3, slo_scale=1.5, seed=4)
    runs = []
    for truth in (None, LAT):
        reqs = generate(wl, LAT, 8)
        Simulator(Cluster(8), LAT, make_policy("genserve"), SimConfig(), truth=truth).run(reqs)
        runs.append([(r.status, r.finish_time) for r in reqs])
    assert runs[0] == runs[1]


def test_the_simulator_executes_with_the_truth():
    # The policy believes steps take 1.3x: the request still finishes when the true profile says.
    r = Request("a", Kind.IMAGE, GenSpec("sd3-medium", 1024, 1024, steps=28), deadline=100.0)
    Simulator(Cluster(1), Scaled(LAT, default=1.3), make_policy("fcfs"), SimConfig(),
              truth=LAT).run([r])
    assert r.finish_time == pytest.approx(LAT.standalone(r, 1))


def test_a_request_given_up_on_a_pessimistic_profile_is_served_once_corrected():
    """Under a 1.3x belief an image due at 1.1x its time on 2 GPUs looks hopeless (best effort: one
    GPU); after one observation it is not, and genserve plans it on the 2 GPUs it needs."""
    r = Request("a", Kind.IMAGE, GenSpec("sd3-medium", 1024, 1024, steps=28))
    r.deadline = 1.1 * LAT.standalone(r, 2)
    belief = Corrected(Scaled(LAT, default=1.3))
    pol = make_policy("genserve:reserve=false")

    def plan():
        return pol.schedule(SchedulerState(0.0, Cluster(2), (0, 1), [r], [], belief))

    first = plan()
    assert first.reasons.get("a") == "best_effort_deadline_unreachable"
    assert [len(a.gpus) for a in first.assignments] == [1]
    key = ("sd3-medium", 4096, 1, 1, False)
    belief.observe(key, 28, 28 * LAT.step_time(*key))
    again = plan()
    assert "a" not in again.reasons
    assert [(a.requests, len(a.gpus)) for a in again.assignments] == [(("a",), 2)]


@pytest.mark.parametrize("error", ["0.7", "1.3"])
def test_correction_recovers_most_of_what_a_wrong_profile_loses(error):
    wl = WorkloadConfig(rate=0.04, duration=3600, arrival="gamma", cv=2.0, video_share=0.5,
                        slo_scale=2.0, seed=1)
    true = run_one(RunSpec(workload=wl), "genserve")["slo_attainment"]
    wrong = run_one(RunSpec(workload=wl, profile_error=error), "genserve")["slo_attainment"]
    fixed = run_one(RunSpec(workload=wl, profile_error=error, feedback=True),
                    "genserve")["slo_attainment"]
    assert wrong < true - 0.01, (wrong, true)  # the error costs something here
    assert fixed >= true - 0.02 and fixed > wrong, (true, wrong, fixed)
