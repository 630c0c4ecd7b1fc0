"""Wan2.2 on the tiny presets: tiny-wan22 (A14B-style, two experts switched at boundary_ratio
0.875) and tiny-ti2v (TI2V-5B-style: 48-channel 16x VAE, per-token timesteps).

At 6 steps the tiny scheduler's timesteps are 999, 937 | 857, 750, 600, 376: the high-noise expert
runs steps 0-1, the low-noise one steps 2-5.  48x48 (tiny-wan22) and 96x96 (tiny-ti2v) at 9 frames
are both 3 x 3 x 3 = 27 tokens: divisible by neither 2 nor 4, so SP pads; with 2 heads, SP 4 takes
the all-gather fallback.
"""

from __future__ import annotations

import numpy as np
import pytest

from genserve.catalog import MODELS
from genserve.spec import GenRequest, GenSpec

torch = pytest.importorskip("torch")

SHAPES = {"tiny-wan22": dict(height=48, width=48, frames=9),
          "tiny-ti2v": dict(height=96, width=96, frames=9)}
STEPS = 6
SWITCH = 2  # tiny-wan22's first low-noise step at STEPS steps


def _req(preset: str, rid: str = "r", seed: int = 3, prompt: str = "a red cat",
         steps: int = STEPS) -> GenRequest:
    return GenRequest(rid, GenSpec(preset, **SHAPES[preset], steps=steps, seed=seed,
                                   prompt=prompt))


def _run(ad, states):
    while any(not s.done for s in states):
        ad.step([s for s in states if not s.done])
    return states


@pytest.fixture(scope="module", params=list(SHAPES))
def adapter(request):
    from genserve.models import load_preset

    torch.set_num_threads(1)
    return load_preset(request.param)


@pytest.fixture(scope="module")
def a14b():
    from genserve.models import load_preset

    torch.set_num_threads(1)
    return load_preset("tiny-wan22")


def _experts_per_call(ad) -> tuple[list[int], list]:
    """Record which expert (0 high, 1 low) each transformer call runs; returns (log, handles)."""
    log: list[int] = []
    handles = [t.register_forward_pre_hook(lambda *_, i=i: log.append(i))
               for i, t in enumerate((ad.pipe.transformer, ad.pipe.transformer_2))]
    return log, handles


# ----- geometry and output -----

def test_generate_gives_frames_of_the_requested_size(adapter):
    r = _req(adapter.name)
    seen = []
    hook = adapter.transformer.blocks[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].shape[1]))
    try:
        video = adapter.generate(r)
    finally:
        hook.remove()
    s = r.spec
    assert video.shape == (s.frames, s.height, s.width, 3) and video.dtype == np.uint8
    # The catalog's token count is the transformer's sequence length.
    assert set(seen) == {MODELS[adapter.name].tokens(s.height, s.width, s.frames)} == {27}


def test_catalog_tokens_of_the_real_geometry():
    # Wan2.1 VAE 8x / Wan2.2 VAE 16x spatial, 4x temporal; patches (1, 2, 2).
    assert MODELS["wan2.2-a14b"].tokens(480, 832, 81) == 21 * (60 // 2) * (104 // 2)
    assert MODELS["wan2.2-ti2v-5b"].tokens(704, 1280, 121) == 31 * (44 // 2) * (80 // 2)
    assert MODELS["tiny-ti2v"].tokens(64, 64, 9) == 3 * 2 * 2


def test_adapter_matches_the_pipelines_own_loop(adapter):
    s = _req(adapter.name).spec
    theirs = adapter.pipe(s.prompt, height=s.height, width=s.width, num_frames=s.frames,
                          num_inference_steps=s.steps, guidance_scale=s.guidance,
                          output_type="latent", max_sequence_length=32,
                          generator=torch.Generator().manual_seed(s.seed)).frames
    (ours,) = _run(adapter, adapter.prepare([_req(adapter.name)]))
    torch.testing.assert_close(ours.latents, theirs, atol=1e-5, rtol=0)


# ----- the A14B expert switch -----

def test_expert_switch_follows_the_pipelines_rule(a14b):
    (s,) = a14b.prepare([_req("tiny-wan22")])
    rule = [0 if t >= 0.875 * 1000 else 1 for t in s.scheduler.timesteps.tolist()]
    assert rule == [0] * SWITCH + [1] * (STEPS - SWITCH)
    assert a14b.switch_step(STEPS) == SWITCH
    log, handles = _experts_per_call(a14b)
    try:
        ours = []
        while not s.done:
            ours.append(a14b.expert_of(s))
            a14b.step([s])
        assert log == ours == rule  # CFG is one batched call per step here
        log.clear()
        r = _req("tiny-wan22").spec
        a14b.pipe(r.prompt, height=r.height, width=r.width, num_frames=r.frames,
                  num_inference_steps=STEPS, output_type="latent", max_sequence_length=32)
        assert log == [e for e in rule for _ in range(2)]  # the pipeline: cond, then uncond
    finally:
        for h in handles:
            h.remove()


def test_batch_straddling_the_boundary_equals_each_alone(a14b):
    reqs = [_req("tiny-wan22", "hi", seed=10, prompt="a fox"),
            _req("tiny-wan22", "lo", seed=11, prompt="a heron in the rain")]
    alone = [_run(a14b, a14b.prepare([r]))[0].latents for r in reqs]
    hi, lo = a14b.prepare(reqs)
    for _ in range(SWITCH):
        a14b.step([lo])
    assert (a14b.expert_of(hi), a14b.expert_of(lo)) == (0, 1)
    log, handles = _experts_per_call(a14b)
    try:
        a14b.step([hi, lo])  # one batch: each expert runs its own rows
    finally:
        for h in handles:
            h.remove()
    assert sorted(log) == [0, 1]
    _run(a14b, [hi, lo])
    for s, ref in zip((hi, lo), alone):
        torch.testing.assert_close(s.latents, ref, atol=1e-5, rtol=0)


# ----- pause and resume -----

def test_pause_and_resume_is_bit_exact_across_the_boundary(adapter):
    from genserve.models import StepState, load_preset

    (ref,) = _run(adapter, adapter.prepare([_req(adapter.name)]))
    (s,) = adapter.prepare([_req(adapter.name)])
    while s.step_index < SWITCH:  # bytes after every step: the live scheduler is rebuilt
        adapter.step([s])
        s = StepState.from_bytes(s.to_bytes())
    fresh = load_preset(adapter.name)  # resume at the switch on another instance
    s = StepState.from_bytes(s.to_bytes())
    while not s.done:
        fresh.step([s])
        s = StepState.from_bytes(s.to_bytes())
    assert torch.equal(s.latents, ref.latents)
    assert np.array_equal(fresh.decode([s])[0], adapter.decode([ref])[0])


# ----- sequence parallelism -----

def _schedule_run(ad, sp, preset, degrees, group_of):
    """Two requests at positions 0 and SWITCH (straddling tiny-wan22's boundary), stepped as one
    batch at the given degree per step; returns their latents."""
    states = ad.prepare([_req(preset, "a", seed=5, prompt="a fox"),
                         _req(preset, "b", seed=9, prompt="a cat asleep on a red mat")])
    for _ in range(SWITCH):
        ad.step(states[1:])
    for k in degrees:
        with sp.use(group_of(k)):
            ad.step([s for s in states if not s.done])
    _run(ad, states)
    return [s.latents for s in states]


def _sp_worker(rank, world, init, schedules):
    import torch
    import torch.distributed as dist

    from _spawn import pair_groups
    from genserve.models import load_preset
    from genserve.parallel.sequence import install_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        group_of = pair_groups(rank, world)
        out = {}
        for preset in SHAPES:
            ad = load_preset(preset)
            sp = install_model(ad)
            out[preset] = [[x.numpy() for x in _schedule_run(ad, sp, preset, degrees, group_of)]
                           for degrees in schedules]
        return out
    finally:
        dist.destroy_process_group()


def test_sp_2_and_4_and_degree_changes_match_sp1(world_pool):
    from genserve.models import load_preset

    schedules = [[2] * STEPS, [4] * STEPS, [1, 2, 4, 1]]  # the last: 4 batched steps, then alone
    job = world_pool.submit(_sp_worker, 4, schedules, label="Wan2.2 SP world")
    torch.set_num_threads(1)
    refs = {}
    for preset in SHAPES:  # the unsharded references, while the world runs
        ad = load_preset(preset)
        refs[preset] = [_schedule_run(ad, _NoSP, preset, d, lambda k: None) for d in schedules]
    worst = 0.0
    for rank, per_preset in world_pool.wait(job).items():
        for preset, runs in per_preset.items():
            for degrees, lats, want in zip(schedules, runs, refs[preset]):
                for i, (lat, ref) in enumerate(zip(lats, want)):
                    got = torch.from_numpy(lat)
                    worst = max(worst, float((got - ref).abs().max()))
                    torch.testing.assert_close(
                        got, ref, atol=1e-4, rtol=0,
                        msg=lambda m: f"{preset} rank {rank}, degrees {degrees}, req {i}: {m}")
    print(f"Wan2.2 SP max abs difference vs SP 1: {worst:.2e}")


class _NoSP:
    @staticmethod
    def use(group):
        from contextlib import nullcontext

        return nullcontext()


def test_sp_installs_on_both_experts_and_no_group_is_diffusers_bit_for_bit():
    from genserve.models import load_preset
    from genserve.parallel.sequence import install_model

    for preset in SHAPES:
        a, b = load_preset(preset), load_preset(preset)
        sp = install_model(b)
        n = 2 if preset == "tiny-wan22" else 1
        assert [t._genserve_sp is not None for t in b.transformers] == [True] * n
        with pytest.raises(ValueError, match="already installed"):
            install_model(b)
        sa, sb = a.prepare([_req(preset)]), b.prepare([_req(preset)])
        while not sa[0].done:
            a.step(sa)
            with sp.use(None):
                b.step(sb)
        assert torch.equal(sa[0].latents, sb[0].latents)


def test_two_workers_at_sp2_give_the_video_of_one(forked_worker_pools):
    from genserve.models import load_preset
    from genserve.parallel.workers import WorkerPool

    with WorkerPool(tuple(SHAPES), 2) as pool:
        got = {}
        for preset in SHAPES:
            (s,) = pool.prepare([_req(preset)])
            (s,) = pool.steps((0, 1), [s], SWITCH + 1)  # over the boundary at SP 2
            (s,) = pool.steps((1,), [s], 1)  # then alone, on the other worker
            (s,) = pool.steps((0, 1), [s], STEPS - SWITCH - 2)
            assert s.done
            got[preset] = (s.latents, pool.decode([s])[0])
    torch.set_num_threads(1)
    for preset, (lat, video) in got.items():
        ad = load_preset(preset)
        (ref,) = _run(ad, ad.prepare([_req(preset)]))
        torch.testing.assert_close(lat, ref.latents, atol=1e-4, rtol=0)
        want = ad.decode([ref])[0]
        assert video.shape == want.shape
        assert np.abs(video.astype(int) - want.astype(int)).max() <= 1  # uint8 rounding only


# ----- the real-checkpoint path -----

@pytest.mark.parametrize("preset,tiny", [("wan2.2-a14b", "tiny-wan22"),
                                         ("wan2.2-ti2v-5b", "tiny-ti2v")])
def test_real_presets_load_a_local_diffusers_directory(preset, tiny, tmp_path):
    """from_pretrained (local_files_only) on a saved tiny pipeline: the pipeline config carries
    boundary_ratio / expand_timesteps, and the output is the tiny preset's."""
    from genserve.models import load_preset
    from genserve.models.presets import load_local

    small = load_preset(tiny)
    small.pipe.save_pretrained(tmp_path)
    real = load_local(preset, tmp_path, dtype=torch.float32)
    real.max_sequence_length = small.max_sequence_length  # the tiny tokenizer holds 32 tokens
    assert real.name == preset and type(real) is type(small)
    assert (real.boundary, real.expand_timesteps) == (small.boundary, small.expand_timesteps)
    r = GenRequest("r", GenSpec(tiny, **SHAPES[tiny], steps=3, seed=1, prompt="a cat"))
    assert np.array_equal(real.generate(r), small.generate(r))
