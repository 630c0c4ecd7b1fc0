"""Sequence parallelism on the tiny presets with gloo: SP 2 and 4, and a degree that changes
between steps, give latents allclose to SP 1 (float32, atol 1e-4).

The 4-process gloo worlds run on the session's shared `world_pool` (tests/_spawn.py): a fresh
world per test, in processes spawned once."""

from __future__ import annotations

import pytest

from genserve.spec import GenRequest, GenSpec

torch = pytest.importorskip("torch")

# Token counts not divisible by 2 or 4, so padding is exercised:
# tiny-t2v 32x48 x 9 frames -> 3 x 2 x 3 = 18 tokens; its 2 heads also exercise the all-gather
# fallback at degree 4.  tiny-t2i 68x68 -> 17 x 17 = 289 image tokens (+ replicated text).
SHAPES = {"tiny-t2v": dict(height=32, width=48, frames=9), "tiny-t2i": dict(height=68, width=68)}
STEPS = 6


def _request(preset: str) -> GenRequest:
    return GenRequest("r", GenSpec(preset, **SHAPES[preset], steps=STEPS, seed=5, prompt="a fox"))


def _worker(rank, world, init, preset, schedules):
    import torch
    import torch.distributed as dist

    from genserve.models import load_preset
    from genserve.parallel import GroupCache
    from genserve.parallel.sequence import install

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        groups = GroupCache(range(world))
        for k in (2, 4):  # every rank, in one order: new_group is collective
            for base in range(0, world - k + 1, k):
                groups.make(range(base, base + k))
        ad = load_preset(preset)
        sp = install(ad.transformer)
        results = []
        for degrees in schedules:
            (s,) = ad.prepare([_request(preset)])
            for k in degrees:
                if k == 1:
                    group = None
                elif k == world:
                    group = dist.group.WORLD
                else:  # every rank steps: ranks are split into groups of k, all doing the same work
                    base = rank // k * k
                    group = groups.get(tuple(range(base, base + k)))
                with sp.use(group):
                    ad.step([s])
            results.append(s.latents.numpy())
        return results
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("preset", list(SHAPES))
def test_sp_degrees_and_switching_match_sp1(preset, world_pool):
    from genserve.models import load_preset

    schedules = [[2] * STEPS, [4] * STEPS, [1, 2, 4, 1, 4, 2]]
    job = world_pool.submit(_worker, 4, preset, schedules, label=f"SP world for {preset}")
    torch.set_num_threads(1)
    ad = load_preset(preset)  # the reference, while the world runs
    (ref,) = ad.prepare([_request(preset)])
    while not ref.done:
        ad.step([ref])
    res = world_pool.wait(job)
    for rank, per_schedule in res.items():
        for degrees, lat in zip(schedules, per_schedule):
            torch.testing.assert_close(torch.from_numpy(lat), ref.latents, atol=1e-4, rtol=0,
                                       msg=lambda m: f"rank {rank}, degrees {degrees}: {m}")


@pytest.mark.parametrize("preset", list(SHAPES))
def test_no_group_leaves_the_model_unchanged(preset):
    from genserve.models import load_preset
    from genserve.parallel.sequence import install

    a, b = load_preset(preset), load_preset(preset)
    install(b.transformer)
    with pytest.raises(ValueError, match="already installed"):
        install(b.transformer)
    r = GenRequest("r", GenSpec(preset, **SHAPES[preset], steps=3, seed=2, prompt="a fox"))
    sa, sb = a.prepare([r])[0], b.prepare([r])[0]
    while not sa.done:
        a.step([sa])
        b.step([sb])
    assert torch.equal(sa.latents, sb.latents)


def test_unsupported_transformer_is_refused():
    from genserve.parallel.sequence import install

    with pytest.raises(ValueError, match="no sequence parallelism for Linear"):
        install(torch.nn.Linear(2, 2))
