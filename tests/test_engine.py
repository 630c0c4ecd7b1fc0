"""The real engine on CPU workers: the simulator's policies, real tiny models, a real clock."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from genserve.cli import main  # noqa: E402
from genserve.engine import Engine  # noqa: E402
from genserve.latency import LatencyModel  # noqa: E402
from genserve.models import GenRequest, load_preset  # noqa: E402
from genserve.parallel.workers import WorkerPool  # noqa: E402
from genserve.policies import make_policy  # noqa: E402
from genserve.request import Status  # noqa: E402
from genserve.workload import WorkloadConfig, generate  # noqa: E402

MIX = "tiny-t2i@64x64=3,tiny-t2v@32x32x9=1"


# Workers fork from the tests' fork server (tests/_spawn.py); test_engine_acceptance and the
# serve processes of test_server_drain keep the production spawn path covered.
pytestmark = pytest.mark.usefixtures("forked_worker_pools")


@pytest.fixture(scope="module")
def latency(tmp_path_factory):
    out = tmp_path_factory.mktemp("prof")
    assert main(["profile", "--models", "tiny-t2i,tiny-t2v", "--out", str(out), "--reps", "1",
                 "--batches", "1,2,4,8"]) == 0
    return LatencyModel(out)


@pytest.fixture(scope="module")
def pool(forked_worker_pools):
    with WorkerPool(("tiny-t2i", "tiny-t2v"), 2) as p:
        yield p


def alone(r):
    torch.set_num_threads(1)
    ad = load_preset(r.model)
    return ad.generate(GenRequest(r.id, r.spec))


@pytest.mark.parametrize("policy", ["genserve", "fcfs"])
def test_trace_through_the_engine_finishes_everything_with_exact_outputs(policy, latency, pool):
    reqs = generate(WorkloadConfig(rate=6, duration=2, mix=MIX, slo_scale=5, seed=3), latency, 2)
    assert len(reqs) >= 6
    res = Engine(make_policy(policy), pool, latency).run(reqs)
    assert all(r.status is Status.FINISHED for r in reqs)
    assert res.decisions > 0 and set(res.outputs) == {r.id for r in reqs}
    for r in reqs:
        got, ref = res.outputs[r.id].astype(int), alone(r).astype(int)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1  # batching/SP change rounding only
        assert r.history[0][1] is Status.WAITING and r.history[-1][1] is Status.FINISHED
        assert sum(q[1] - q[0] >= 0 for q in res.timeline[r.id]) == len(res.timeline[r.id])


def test_replay_cli_writes_simulate_json_plus_timelines(latency, tmp_path, capsys):
    import json

    prof = latency.meta["profile"]
    trace = tmp_path / "t.jsonl"
    assert main(["trace", "--profile", prof, "--mix", MIX, "--rate", "4", "--duration", "1.5",
                 "--slo-scale", "5", "--gpus", "2", "--seed", "2", "--out", str(trace)]) == 0
    out = tmp_path / "r.json"
    assert main(["replay", str(trace), "--policy", "genserve", "--workers", "2", "--profile", prof,
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())["policies"]["genserve"]
    n = sum(1 for line in trace.read_text().splitlines() if '"model"' in line)
    assert res["count"] == res["finished"] == n
    assert isinstance(res["slo_attainment"], float) and set(res["image"]) >= {"slo_attainment"}
    tl = next(iter(res["timelines"].values()))
    assert tl["history"][0][1] == "waiting" and tl["history"][-1][1] == "finished"
    assert tl["quanta"] and all(s <= e for s, e, _ in tl["quanta"])
    capsys.readouterr()
    assert main(["replay", str(trace), "--profile", "h200", "--workers", "2"]) == 2
    assert "no rows in profile" in capsys.readouterr().err


def test_engine_honours_a_policy_wake_up_and_reports_a_stall(latency, pool):
    from genserve.policies import Plan, Policy
    from genserve.sim import PlanError

    class Late(Policy):
        """Holds everything back until t >= 0.2 s, asking to be woken then."""

        name = "late"

        def schedule(self, s):
            if s.now < 0.2:
                return Plan(wake_at=0.2)
            return make_policy("fcfs").schedule(s)

    class Never(Policy):
        name = "never"

        def schedule(self, s):
            return Plan()

    reqs = generate(WorkloadConfig(rate=5, duration=2, mix=MIX, slo_scale=5, seed=3), latency, 2)
    assert reqs
    Engine(Late(), pool, latency).run(reqs)
    assert all(r.status is Status.FINISHED for r in reqs)
    assert min(r.history[1][0] for r in reqs) >= 0.2  # nothing started before the wake-up
    reqs = generate(WorkloadConfig(rate=5, duration=2, mix=MIX, slo_scale=5, seed=3), latency, 2)
    with pytest.raises(PlanError, match="stalled"):
        Engine(Never(), pool, latency).run(reqs)
