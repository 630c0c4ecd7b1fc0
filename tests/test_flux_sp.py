"""FLUX sequence parallelism on the tiny preset with gloo: SP 2 (Ulysses, 2 heads) and SP 4 (the
all-gather fallback), a degree that changes between steps, and a two-request batch give latents
allclose to SP 1; with no group the model is diffusers' own, bit for bit; two worker processes at
SP 2 give the image of one.

68x68 -> 17 x 17 = 289 image tokens (plus 32 replicated text tokens): not divisible by 2 or 4, so
the image shards are padded and the padded keys masked."""

from __future__ import annotations

import numpy as np
import pytest

from genserve.spec import GenRequest, GenSpec

torch = pytest.importorskip("torch")

PRESET = "tiny-flux"
SIDE = 68
STEPS = 6


def _requests(steps: int = STEPS) -> list[GenRequest]:
    return [GenRequest("a", GenSpec(PRESET, SIDE, SIDE, steps=steps, seed=5, prompt="a fox")),
            GenRequest("b", GenSpec(PRESET, SIDE, SIDE, steps=steps, seed=9,
                                    prompt="a cat asleep on a red mat"))]


def _reference(reqs: list[GenRequest]) -> list:
    """Latents of the unsharded model, run as one batch."""
    from genserve.models import load_preset

    torch.set_num_threads(1)
    ad = load_preset(PRESET)
    states = ad.prepare(reqs)
    while not states[0].done:
        ad.step(states)
    return [s.latents for s in states]


def _worker(rank, world, init, schedules):
    import torch
    import torch.distributed as dist

    from _spawn import pair_groups
    from genserve.models import load_preset
    from genserve.parallel.sequence import install

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        group_of = pair_groups(rank, world)
        ad = load_preset(PRESET)
        sp = install(ad.transformer)
        results = []
        for degrees in schedules:
            states = ad.prepare(_requests())
            for k in degrees:
                with sp.use(group_of(k)):
                    ad.step(states)
            results.append([s.latents.numpy() for s in states])
        return results
    finally:
        dist.destroy_process_group()


def test_flux_sp_degrees_and_switching_match_sp1(world_pool):
    schedules = [[2] * STEPS, [4] * STEPS, [1, 2, 4, 1, 4, 2]]
    job = world_pool.submit(_worker, 4, schedules, label="FLUX SP world")
    ref = _reference(_requests())  # while the world runs
    res = world_pool.wait(job)
    for rank, per_schedule in res.items():
        for degrees, lats in zip(schedules, per_schedule):
            for i, (lat, want) in enumerate(zip(lats, ref)):
                torch.testing.assert_close(
                    torch.from_numpy(lat), want, atol=1e-4, rtol=0,
                    msg=lambda m: f"rank {rank}, degrees {degrees}, request {i}: {m}")


def test_no_group_leaves_flux_unchanged():
    from genserve.models import load_preset
    from genserve.parallel.sequence import install

    a, b = load_preset(PRESET), load_preset(PRESET)
    sp = install(b.transformer)
    with pytest.raises(ValueError, match="already installed"):
        install(b.transformer)
    reqs = _requests(steps=3)
    sa, sb = a.prepare(reqs), b.prepare(reqs)
    while not sa[0].done:
        a.step(sa)
        with sp.use(None):
            b.step(sb)
    for x, y in zip(sa, sb):
        assert torch.equal(x.latents, y.latents)


def test_flux_on_two_workers_at_sp2_gives_the_image_of_one(forked_worker_pools):
    from genserve.models import load_preset
    from genserve.parallel.workers import WorkerPool

    (req,) = _requests()[:1]
    with WorkerPool(PRESET, 2) as pool:
        (s,) = pool.prepare([req])
        (s,) = pool.steps((0, 1), [s], STEPS)
        assert s.done
        (image,) = pool.decode([s])
    torch.set_num_threads(1)
    ad = load_preset(PRESET)
    (ref,) = ad.prepare([req])
    while not ref.done:
        ad.step([ref])
    torch.testing.assert_close(s.latents, ref.latents, atol=1e-4, rtol=0)
    want = ad.decode([ref])[0]
    assert image.shape == want.shape == (SIDE, SIDE, 3)
    assert np.abs(image.astype(int) - want.astype(int)).max() <= 1  # rounding to uint8 only
