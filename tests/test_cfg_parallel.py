"""CFG parallelism (`Run.cfg_split`): the two branches of classifier-free guidance on two halves of
a GPU set, swapping noise predictions every step.

On tiny SD3 and Wan with gloo: a split on 2 ranks (one rank a branch) and on 4 (Ulysses 2 inside
each half), a schedule that switches between plain, Ulysses and split steps mid-request, and a
batch of two requests at different step positions and guidance values give latents allclose to
the single unsharded model (float32, atol 1e-4).  Through the worker pool: a `Run` split over two
workers gives the latents and the image of one worker.  A request without CFG (FLUX is
guidance-distilled; guidance <= 1) and an odd rank count are refused.

The 4-process worlds run on the session's shared `world_pool` (tests/_spawn.py)."""

from __future__ import annotations

import numpy as np
import pytest

from genserve.parallel.cfg import cfg_layout
from genserve.parallel.protocol import Held, New, Resident, Run
from genserve.spec import GenRequest, GenSpec

torch = pytest.importorskip("torch")

# Token counts not divisible by 2, so the Ulysses halves pad (see test_sequence_parallel).
SHAPES = {"tiny-t2v": dict(height=32, width=48, frames=9), "tiny-t2i": dict(height=68, width=68)}
STEPS = 8
ATOL = 1e-4
# One entry per step: "1" unsharded, "sp2" Ulysses over 2 ranks, "cfg2" / "cfg4" the CFG split
# over 2 ranks (a branch each) / 4 ranks (Ulysses 2 inside each half).
SCHEDULES = {
    "cfg2": ["cfg2"] * STEPS,
    "cfg4": ["cfg4"] * STEPS,
    "switch": ["1", "1", "cfg2", "cfg2", "sp2", "sp2", "cfg4", "cfg4"],
}


def _requests(preset: str) -> list[GenRequest]:
    """Two requests of different guidance (both > 1: CFG on) that batch together."""
    return [GenRequest("a", GenSpec(preset, **SHAPES[preset], steps=STEPS, seed=5,
                                    guidance=4.5, prompt="a fox")),
            GenRequest("b", GenSpec(preset, **SHAPES[preset], steps=STEPS, seed=9,
                                    guidance=7.0, prompt="a cat asleep on a red mat"))]


def _run(ad, states: list, schedule: list[str], step_as) -> None:
    """Request "a" alone for the first step, then both: a batch at different step positions."""
    first, *rest = schedule
    step_as(first, states[:1])
    for how in rest:
        step_as(how, [s for s in states if not s.done])
    while not states[1].done:  # "b" started a step late
        step_as(schedule[-1], states[1:])


def _reference(preset: str) -> dict[str, list]:
    """Latents of the unsharded model with CFG as batch doubling: request "a" alone, and the
    two-request batch."""
    from genserve.models import load_preset

    torch.set_num_threads(1)
    ad = load_preset(preset)
    (alone,) = ad.prepare(_requests(preset)[:1])
    while not alone.done:
        ad.step([alone])
    pair = ad.prepare(_requests(preset))
    _run(ad, pair, ["1"] * STEPS, lambda how, sts: ad.step(sts))
    return {"alone": [alone.latents], "batch": [s.latents for s in pair]}


def _world(rank, world, init, preset, schedules):
    import torch
    import torch.distributed as dist

    from genserve.models import load_preset
    from genserve.models.base import CfgBranch
    from genserve.parallel import GroupCache
    from genserve.parallel.sequence import install
    from genserve.parallel.worker_main import _swap

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        groups = GroupCache(range(world))
        # Every rank, in one order (new_group is collective): the 2-rank sets (SP 2, and the
        # 2-rank splits), then what a 4-rank split needs (the whole world: made as WORLD), as
        # the pool asks the workers to make them.
        for ranks in [(0, 1), (2, 3), (0, 1, 2, 3), *cfg_layout(range(4)).groups()]:
            groups.make(ranks)
        ad = load_preset(preset)
        sp = install(ad.transformer)

        def block(n: int) -> tuple[int, ...]:
            """This rank's set of `n`: every rank steps, the sets doing the same work."""
            base = rank // n * n
            return tuple(range(base, base + n))

        def step_as(how: str, states) -> None:
            if how == "1":
                group, branch = None, None
            elif how.startswith("sp"):
                group, branch = groups.get(block(int(how[2:]))), None
            else:  # as `Worker._cfg_branch` does it
                layout = cfg_layout(block(int(how[3:])))
                half = layout.half(rank)
                group = groups.get(half) if len(half) > 1 else None
                whole = groups.get(block(int(how[3:])))
                peer = dist.get_group_rank(whole, layout.partner(rank))
                branch = CfgBranch(layout.is_cond(rank), lambda t, g=whole, p=peer: _swap(g, p, t))
            with sp.use(group):
                ad.step(states, branch)

        results = {}
        for name, schedule in schedules.items():
            (alone,) = ad.prepare(_requests(preset)[:1])
            for how in schedule:
                step_as(how, [alone])
            pair = ad.prepare(_requests(preset))
            _run(ad, pair, schedule, step_as)
            results[name] = {"alone": [alone.latents.numpy()],
                             "batch": [s.latents.numpy() for s in pair]}
        return results
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("preset", list(SHAPES))
def test_cfg_split_matches_batch_doubling(preset, world_pool):
    job = world_pool.submit(_world, 4, preset, SCHEDULES, label=f"CFG-parallel world for {preset}")
    ref = _reference(preset)  # while the world runs
    res = world_pool.wait(job)
    worst = 0.0
    for rank, per_schedule in res.items():
        for name, got in per_schedule.items():
            for case, lats in got.items():
                for i, (lat, want) in enumerate(zip(lats, ref[case])):
                    lat = torch.from_numpy(lat)
                    worst = max(worst, (lat - want).abs().max().item())
                    torch.testing.assert_close(
                        lat, want, atol=ATOL, rtol=0,
                        msg=lambda m: f"rank {rank}, {name}, {case} request {i}: {m}")
    # Every rank ends with the same latents, bit for bit: the state stays resident on all.
    for name in SCHEDULES:
        for case in ("alone", "batch"):
            for i in range(len(ref[case])):
                assert all(np.array_equal(res[0][name][case][i], res[r][name][case][i])
                           for r in res), (name, case, i)
    print(f"{preset}: max |split - batch doubling| = {worst:.2e}")


def _split_step(pair_of_adapters, pair_of_states) -> None:
    """One CFG-parallel step in this process: a thread per branch, each with its own adapter
    and copy of the states, swapping predictions through queues."""
    import queue
    import threading

    from genserve.models.base import CfgBranch

    boxes = (queue.Queue(), queue.Queue())
    errors = []

    def branch(i: int) -> None:
        def swap(t):
            boxes[1 - i].put(t)
            return boxes[i].get(timeout=60)

        try:
            pair_of_adapters[i].step(pair_of_states[i], CfgBranch(bool(i), swap))
        except Exception as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)
            boxes[1 - i].put(None)

    threads = [threading.Thread(target=branch, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_adapter_branches_in_threads_match_and_plain_steps_stay_bit_exact():
    """Plain steps with no branch are the plain step bit for bit (and the embeddings cache,
    which held one branch's embeddings in between, is not reused for them); split steps of a
    batch at two guidance values are allclose to batch doubling and identical in both
    branches."""
    from genserve.models import load_preset

    preset = "tiny-t2i"
    torch.set_num_threads(1)
    ref, u, c = (load_preset(preset) for _ in range(3))
    reqs = _requests(preset)
    sr, su, sc = ref.prepare(reqs), u.prepare(reqs), c.prepare(reqs)
    for i in range(STEPS):
        ref.step(sr)
        if i % 3 == 1:
            _split_step((u, c), (su, sc))
        else:
            u.step(su)
            c.step(sc, None)
        for x, y, z in zip(sr, su, sc):
            assert torch.equal(y.latents, z.latents)
            if i == 0:
                assert torch.equal(x.latents, y.latents)
            torch.testing.assert_close(y.latents, x.latents, atol=ATOL, rtol=0)


@pytest.mark.parametrize("preset,guidance", [("tiny-flux", 3.5), ("tiny-t2i", 1.0)])
def test_cfg_split_is_refused_without_cfg(preset, guidance):
    from genserve.models import ModelInputError, load_preset
    from genserve.models.base import CfgBranch

    ad = load_preset(preset)
    (s,) = ad.prepare([GenRequest("r", GenSpec(preset, 64, 64, steps=2, guidance=guidance,
                                               prompt="a fox"))])
    swapped = []
    with pytest.raises(ModelInputError, match="no classifier-free guidance to split.*"
                                              "guidance-distilled"):
        ad.step([s], CfgBranch(False, swapped.append))
    assert not swapped and s.step_index == 0  # refused before any forward or exchange


def test_layout_halves_pairs_and_group_order():
    from genserve.parallel.workers import _group_sets

    lay = cfg_layout((6, 1, 4, 3))
    assert (lay.uncond, lay.cond) == ((1, 3), (4, 6))
    assert lay.pairs == ((1, 4), (3, 6))
    assert [lay.half(r) for r in (1, 6)] == [(1, 3), (4, 6)]
    assert [lay.pair(r) for r in (3, 6)] == [(3, 6), (3, 6)]
    assert [lay.is_cond(r) for r in (1, 3, 4, 6)] == [False, False, True, True]
    with pytest.raises(ValueError, match="not in the CFG-parallel set"):
        lay.half(2)
    for bad in ((0,), (0, 1, 2)):
        with pytest.raises(ValueError, match="even number of ranks"):
            cfg_layout(bad)
    run = Run("tiny-t2i", (), 1, cfg_split=True)
    assert [lay.partner(r) for r in (1, 3, 4, 6)] == [4, 6, 1, 3]
    # Partners swap over the whole set's group: no group per pair.
    assert _group_sets((0, 1, 2, 3), run) == ((0, 1, 2, 3), (0, 1), (2, 3))
    assert _group_sets((0, 1), run) == ((0, 1),)  # k = 1: halves of one, the pair is the set
    assert _group_sets((0, 1, 2, 3), Run("tiny-t2i", (), 1)) == ((0, 1, 2, 3),)
    assert _group_sets((0,), Run("tiny-t2i", (), 1)) == ()


def test_worker_pool_cfg_split_run_matches_one_worker(forked_worker_pools):
    """Steps 0-1 on worker 0, 2-3 split over both (the state held by 0: broadcast), 4-5 Ulysses
    over both (resident), the rest split again: the image of one worker, and the latents before
    the last step allclose.  Refusals leave the workers usable."""
    from genserve.models import load_preset
    from genserve.models.base import StepState
    from genserve.parallel.workers import WorkerError, WorkerPool

    preset = "tiny-t2i"
    req = _requests(preset)[0]
    torch.set_num_threads(1)
    ad = load_preset(preset)
    (ref,) = ad.prepare([req])
    for _ in range(STEPS - 1):
        ad.step([ref])
    before_last = ref.latents.clone()
    while not ref.done:
        ad.step([ref])
    want = ad.decode([ref])[0]

    flux = GenRequest("f", GenSpec("tiny-flux", 64, 64, steps=2, prompt="a fox"))
    with WorkerPool((preset, "tiny-flux"), 3, collective_timeout_s=30) as pool:
        def run(ranks, job):
            return pool.wait(pool.submit(ranks, job))

        r = req.id
        run((0,), Run(preset, (New(r, req.spec),), 2))
        run((0, 1), Run(preset, (Held(r, 0),), 2, cfg_split=True))
        run((0, 1), Run(preset, (Resident(r),), 2))
        out = run((0, 1), Run(preset, (Resident(r),), 1, want=(r,), cfg_split=True))
        mid = StepState.from_bytes(out.blobs[r])
        out = run((0, 1), Run(preset, (Resident(r),), 1, cfg_split=True))
        assert out.steps == {r: STEPS}
        images = [out.outputs[r]]

        with pytest.raises(ValueError, match="even number of ranks"):
            pool.submit((0, 1, 2), Run(preset, (New("odd", req.spec),), 1, cfg_split=True))
        with pytest.raises(WorkerError, match="cfg_split.*guidance-distilled"):
            run((1, 2), Run("tiny-flux", (New(flux.id, flux.spec),), 1, cfg_split=True))
        # The same workers then split a CFG request again (pair (1, 2): groups made on demand).
        again = GenRequest("g", req.spec)
        out = run((1, 2), Run(preset, (New(again.id, again.spec),), STEPS, cfg_split=True))
        images.append(out.outputs[again.id])
    assert mid.step_index == STEPS - 1
    torch.testing.assert_close(mid.latents, before_last, atol=ATOL, rtol=0)
    for image in images:
        assert image.shape == want.shape
        assert np.abs(image.astype(int) - want.astype(int)).max() <= 1  # rounding to uint8 only
