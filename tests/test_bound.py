"""The upper bound on SLO attainment (genserve/bound.py): never below what any schedule attains."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genserve.bound import BoundConfig, _Costs, _Options, needs, upper_bound
from genserve.latency import LatencyModel
from genserve.policies import Cluster, make_policy
from genserve.policies.base import Assignment, Plan, Policy, SchedulerState, policy_names
from genserve.policies.common import tokens_of
from genserve.request import Kind, Request
from genserve.sim import SimConfig, Simulator
from genserve.spec import GenSpec
from genserve.workload import WorkloadConfig, generate

LAT = LatencyModel("h200")


def met(reqs: list[Request]) -> int:
    return sum(r.met_deadline for r in reqs)


def simulate(policy: Policy, reqs: list[Request], gpus: int, per_node: int = 8) -> int:
    Simulator(Cluster(gpus, per_node), LAT, policy, SimConfig()).run(reqs)
    return met(reqs)


def fresh(reqs: list[Request]) -> list[Request]:
    return [Request.from_trace(r.to_trace()) for r in reqs]


def video(i: int, arrival: float, slo: float, model: str = "wan2.1-1.3b", size=(480, 832),
          frames: int = 81) -> Request:
    r = Request(f"v{i}", Kind.VIDEO, GenSpec(model, size[0], size[1], frames=frames, steps=50,
                                             guidance=5.0, seed=i, prompt="v"), arrival=arrival)
    r.standalone = LAT.standalone(r, 1)
    r.deadline = arrival + slo * r.standalone
    return r


def image(i: int, arrival: float, slo: float, size: int = 1024, model: str = "sd3-medium"
          ) -> Request:
    r = Request(f"i{i}", Kind.IMAGE, GenSpec(model, size, size, steps=28, guidance=5.0, seed=i,
                                             prompt="i"), arrival=arrival)
    r.standalone = LAT.standalone(r, 1)
    r.deadline = arrival + slo * r.standalone
    return r


# ----- an exhaustive search over list schedules -----
class Listed(Policy):
    """Runs `order`'s requests to completion, each on its degree, as soon as GPUs allow, in that
    order (a later one starts first if the earlier does not fit: list scheduling); the requests not
    in `order` only once those are all done."""

    name = "listed"

    def __init__(self, order: list[str], degree: dict[str, int]):
        super().__init__()
        self.order, self.degree = order, degree

    def schedule(self, s: SchedulerState) -> Plan:
        plan, free = Plan(), list(s.free_gpus)
        pending = {r.id for r in s.queue} | {r.id for r in s.running}
        first = [rid for rid in self.order if rid in pending]
        rest = sorted(pending - set(self.order))
        by_id = {r.id: r for r in s.queue}
        for rid in first + (rest if not first else []):
            r = by_id.get(rid)
            if r is None:
                continue
            k = self.degree.get(rid, 1)
            if k <= len(free):
                gpus, free = tuple(free[:k]), free[k:]
                plan.assignments.append(Assignment(gpus, (rid,), r.remaining_steps))
        return plan


def exhaustive(reqs: list[Request], gpus: int, degrees: tuple[int, ...]) -> int:
    """Most deadlines any list schedule over every subset, order and degree choice meets."""
    best = 0
    ids = [r.id for r in reqs]
    for n in range(len(ids), 0, -1):
        for subset in itertools.permutations(ids, n):
            for degs in itertools.product(degrees, repeat=n):
                got = simulate(Listed(list(subset), dict(zip(subset, degs))), fresh(reqs), gpus)
                best = max(best, got)
    return best


def test_bound_is_at_least_an_exhaustive_search_and_sees_the_conflict():
    # Three 1.3B videos within a second on 2 GPUs, each due at 1.3x its time on one GPU, and an
    # image: no two of the videos can share a GPU, and 2 GPUs cannot run three videos in time.
    reqs = [video(0, 0.0, 1.3), video(1, 0.0, 1.3), video(2, 1.0, 1.3), image(3, 5.0, 2.0)]
    searched = exhaustive(reqs, 2, (1, 2))
    policies = max(simulate(make_policy(p), fresh(reqs), 2) for p in policy_names())
    b = upper_bound(fresh(reqs), Cluster(2), LAT)
    assert b.alone == 4
    assert 2 <= max(searched, policies) <= b.met < 4, (searched, policies, b)


def test_a_request_that_cannot_make_it_alone_is_not_counted():
    r = image(0, 0.0, 2.0)
    r.deadline = r.arrival + 0.5 * LAT.standalone(r, 8)  # faster than the fastest degree
    ok = image(1, 0.0, 2.0)
    b = upper_bound([r, ok], Cluster(8), LAT)
    assert (b.alone, b.met, b.attainment) == (1, 1, 0.5)


def test_capacity_not_only_latency_limits_the_bound():
    # 40 FLUX images at once, each due at 1.5x its time alone, on one GPU: alone each is fine, but
    # together they cannot all fit in the window (batching FLUX 1024 is nearly linear).
    reqs = [image(i, 0.0, 1.5, model="flux-dev") for i in range(40)]
    b = upper_bound(reqs, Cluster(1), LAT)
    assert b.alone == 40
    assert 1 <= b.met < 10
    got = max(simulate(make_policy(p), fresh(reqs), 1) for p in ("genserve", "edf"))
    assert got <= b.met


def test_batching_credit_keeps_the_bound_above_a_batching_policy():
    # 8 small SD3 images at once on one GPU, due at 1.3x alone: only batching meets most of them.
    reqs = [image(i, 0.0, 1.3, size=512) for i in range(8)]
    got = simulate(make_policy("genserve"), fresh(reqs), 1)
    unbatched = simulate(make_policy("genserve-nobatch"), fresh(reqs), 1)
    b = upper_bound(reqs, Cluster(1), LAT)
    assert unbatched < got <= b.met


@pytest.mark.parametrize("seed", range(4))
def test_bound_is_at_least_every_policy_on_small_random_traces(seed):
    gpus = (2, 4, 8, 16)[seed]
    wl = WorkloadConfig(rate=(0.03, 0.08, 0.2, 0.5)[seed] * gpus / 8,
                        duration=(900, 900, 900, 300)[seed],
                        arrival="gamma", cv=2.0, video_share=(0.5, 0.2, 0.5, 0.2)[seed],
                        slo_scale=(1.5, 2.0, 1.2, 3.0)[seed], seed=seed)
    reqs = generate(wl, LAT, gpus)
    b = upper_bound(reqs, Cluster(gpus, 8), LAT)
    got = {p: simulate(make_policy(p), fresh(reqs), gpus) for p in policy_names()}
    assert max(got.values()) <= b.met, (got, b)
    assert b.met <= b.alone <= len(reqs)


def test_finer_coarse_buckets_do_not_loosen_the_bound():
    wl = WorkloadConfig(rate=0.2, duration=1200, arrival="gamma", cv=2.0, video_share=0.5,
                        slo_scale=1.5, seed=3)
    reqs = generate(wl, LAT, 8)
    coarse = upper_bound(reqs, Cluster(8), LAT, BoundConfig(coarse_buckets=4))
    fine = upper_bound(reqs, Cluster(8), LAT, BoundConfig(coarse_buckets=200))
    none = upper_bound(reqs, Cluster(8), LAT, BoundConfig(lp=False))
    assert fine.lp_value <= coarse.lp_value + 1e-6
    assert fine.met <= coarse.met <= none.met == none.alone
    assert fine.met < none.met  # the capacity LP bites at this load


pts = st.lists(st.tuples(st.floats(0.01, 10.0), st.floats(0.01, 50.0)), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(pts, st.floats(0.0, 1.0))
def test_the_hull_gives_the_cheapest_mix_of_two_options(points, frac):
    """per_step(tau) is the LP min { sum s_o c_o : sum s_o = 1, sum s_o t_o <= tau }, which an
    optimal solution reaches with at most two options: check it against every pair."""
    o = _Options(points)
    fastest, slowest = min(t for t, _ in points), max(t for t, _ in points)
    tau = fastest + frac * (slowest - fastest)
    best = min(c for t, c in points if t <= tau + 1e-12)
    for (t1, c1), (t2, c2) in itertools.product(points, points):
        if t1 < tau < t2:
            a = (t2 - tau) / (t2 - t1)  # share of steps on the fast option
            best = min(best, a * c1 + (1 - a) * c2)
    assert o.per_step(tau) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_needs_charge_the_deadline_not_only_the_cheapest_degree():
    # An SD3 1024 image due at 1.2x its time on 8 GPUs must run most steps on 8, which costs
    # 2.3x the GPU-seconds of a step on one (2.1x as a CFG split of 4 + 4): its least work is
    # well above a loose one's.
    tight, loose = image(0, 0.0, 1.0), image(1, 0.0, 1.0)
    tight.deadline = 1.2 * LAT.standalone(tight, 8)
    loose.deadline = 10 * LAT.standalone(loose, 1)
    tight_need, loose_need = needs([tight, loose], Cluster(8), LAT)
    assert tight_need.work > 1.35 * loose_need.work
    assert tight_need.rate == loose_need.rate == 8


def test_cfg_split_configurations_are_options_of_the_bound():
    """A CFG split is a way to run a step (genserve uses it), so the bound must price it: an
    SD3 1024 image under CFG has 8-GPU split options, one without CFG (guidance 1) has none, and
    a Wan 1.3B video (SP up to 4: 12 heads) may use 8 GPUs as a split of 4 + 4."""
    costs = _Costs(Cluster(8), LAT)
    cfg = image(0, 0.0, 1.0)
    assert (8, True) in costs.configs(cfg) and (2, True) in costs.configs(cfg)
    plain = Request("p", Kind.IMAGE, GenSpec("sd3-medium", 1024, 1024, steps=28, guidance=1.0),
                    arrival=0.0, deadline=1.0)
    assert not any(split for _, split in costs.configs(plain))
    wan = Request("w", Kind.VIDEO, GenSpec("wan2.1-1.3b", 480, 832, 81, steps=50))
    assert max(k for k, _ in costs.configs(wan)) == 8
    # The fastest option of the bound is the split's step time where that is the fastest.
    t = tokens_of(cfg)
    assert costs.options(cfg, 1).fastest == pytest.approx(
        LAT.step_time("sd3-medium", t, 1, 8, False, True))


# ----- found by an adversarial run (each failed before its fix) -----
def test_window_ends_closer_than_the_cut_merge_do_not_crash():
    # Gamma arrivals put deadlines 1e-7..1e-6 apart; the last fine cut used to fall short.
    a, b = image(0, 0.0, 2.0), image(1, 0.0, 2.0)
    b.deadline = a.deadline + 5e-7
    assert upper_bound([a, b], Cluster(4), LAT).met == 2
    wl = WorkloadConfig(rate=0.025, duration=400, arrival="gamma", cv=2.0, video_share=0,
                        slo_scale=2.0, seed=179)
    reqs = generate(wl, LAT, 1)
    assert upper_bound(reqs, Cluster(1, 4), LAT).met >= simulate(make_policy("genserve"),
                                                                 fresh(reqs), 1, 4)


def test_no_deadline_and_nothing_left_to_do_are_met():
    r = Request("x", Kind.IMAGE, GenSpec("sd3-medium", 1024, 1024, steps=28))  # deadline inf
    done = image(1, 0.0, 2.0)
    done.steps_done = done.steps
    b = upper_bound([r, done, image(2, 0.0, 2.0)], Cluster(4), LAT)
    assert (b.alone, b.met) == (3, 3)


def test_a_cross_node_link_faster_than_nvlink_is_priced_as_such():
    from genserve.latency import Bandwidth

    lat = LatencyModel("h200", bandwidth=Bandwidth(intra_node=5e9, cross_node=450e9))
    r = image(0, 0.0, 1.0)
    r.deadline = (lat.encode_time(r.model) + r.steps * lat.step_time(r.model, 4096, 1, 2, True)
                  + lat.decode_time(r.model, r.height, r.width))
    assert upper_bound([r], Cluster(3, 2), lat).met == 1  # degree 2 over nodes {0, 1} and {2}


def test_epoch_scale_clocks_keep_requests_due_exactly_at_their_fastest():
    base = 1.7e9
    r = image(0, base, 1.0)
    lat = LAT
    r.deadline = base + (lat.encode_time(r.model) + r.steps * min(
        lat.step_time(r.model, 4096, 1, k) for k in lat.degrees(r.model))
        + lat.decode_time(r.model, r.height, r.width))
    assert upper_bound([r], Cluster(8), LAT).met == 1


def test_batch_credit_reaches_the_profiles_largest_batch():
    costs = _Costs(Cluster(1), LAT)
    prof = LAT.profile_of("sd3-medium")
    top = max(b for row in prof.f1.rows for b, _ in row)
    assert costs.batch_limit("sd3-medium") * prof.spec.cfg_factor >= top
