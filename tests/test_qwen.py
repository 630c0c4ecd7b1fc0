"""Qwen-Image on its tiny preset: generation, the diffusers pipeline's own result (true CFG with
its norm rescaling), bit-exact pause/resume through bytes, batching at different step positions,
the negative prompt, CFG parallelism, a local checkpoint directory; sequence parallelism with gloo
(SP 2 and 4 by Ulysses, SP 3 by the all-gather fallback of 4 heads, degrees switched between
steps) allclose to SP 1, bit-identical with no group; two worker processes at SP 2 give the image
of one.

112x80 -> 7 x 5 = 35 image tokens: not divisible by 2, 3 or 4, so image shards are padded and the
padded keys masked.  Prompts of different lengths (and the shorter negative prompt under CFG) make
the batched text padded and masked too."""

from __future__ import annotations

import numpy as np
import pytest

from genserve.spec import GenRequest, GenSpec

torch = pytest.importorskip("torch")

PRESET = "tiny-qwen"
H, W = 112, 80
STEPS = 5


def _spec(**kw) -> GenSpec:
    base = dict(model=PRESET, height=H, width=W, steps=STEPS, seed=5, prompt="a fox",
                guidance=4.0, negative_prompt="blurry")
    return GenSpec(**{**base, **kw})


def _cfg_pair() -> list[GenRequest]:
    """Two CFG requests with prompts of different lengths and different guidance."""
    return [GenRequest("a", _spec()),
            GenRequest("b", _spec(seed=9, prompt="a cat asleep on a red mat", guidance=2.5))]


@pytest.fixture(scope="module")
def adapter():
    from genserve.models import load_preset

    torch.set_num_threads(1)  # tiny ops: threads only contend (as in the other multi-process tests)
    return load_preset(PRESET)


def _run(ad, reqs: list[GenRequest]) -> list:
    states = ad.prepare(reqs)
    while not states[0].done:
        ad.step(states)
    return states


def test_generate_gives_an_image_of_the_requested_size(adapter):
    image = adapter.generate(GenRequest("g", _spec(steps=2)))
    assert image.shape == (H, W, 3) and image.dtype == np.uint8


def test_one_step_is_refused(adapter):
    from genserve.models import ModelInputError

    with pytest.raises(ModelInputError, match="steps"):
        adapter.prepare([GenRequest("one", _spec(steps=1))])


def test_catalog_geometry_matches_the_models(adapter):
    """tiny-qwen's entry against the tiny model, qwen-image's against diffusers' defaults (which
    are Qwen-Image's: 8x VAE, 2x2 patches, 16 channels, 24 heads of 128, 60 blocks)."""
    import inspect

    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from genserve.catalog import get_model

    (s,) = adapter.prepare([GenRequest("t", _spec())])
    tiny = get_model(PRESET)
    assert tiny.tokens(H, W) == s.latents.shape[1] == 35
    defaults = {name: p.default for cls in (QwenImageTransformer2DModel, AutoencoderKLQwenImage)
                for name, p in inspect.signature(cls.__init__).parameters.items()}
    for spec, tr, vae in ((tiny, adapter.transformer.config, adapter.pipe.vae.config),
                          (get_model("qwen-image"), defaults, defaults)):
        assert spec.heads == tr["num_attention_heads"]
        assert spec.hidden == tr["num_attention_heads"] * tr["attention_head_dim"]
        assert spec.layers == tr["num_layers"] and spec.text_dim == tr["joint_attention_dim"]
        assert spec.patch == tr["patch_size"] and spec.latent_channels == vae["z_dim"]
        assert spec.vae_spatial == 2 ** len(vae["temperal_downsample"])


def test_matches_the_diffusers_pipeline(adapter):
    """Our loop against QwenImagePipeline's: no CFG bit for bit; true CFG (the pipeline runs the
    two branches unpadded, we batch them padded and masked) allclose."""
    for guidance in (1.0, 4.0):
        (s,) = _run(adapter, [GenRequest("p", _spec(guidance=guidance))])
        want = adapter.pipe(
            "a fox", negative_prompt="blurry" if guidance > 1 else None, true_cfg_scale=guidance,
            height=H, width=W, num_inference_steps=STEPS, output_type="latent",
            generator=torch.Generator().manual_seed(5)).images
        if guidance > 1:
            torch.testing.assert_close(s.latents, want, atol=1e-5, rtol=0)
        else:
            assert torch.equal(s.latents, want)


def test_pause_resume_through_bytes_is_bit_exact(adapter):
    from genserve.models.base import StepState

    req = _cfg_pair()[:1]
    (ref,) = _run(adapter, req)
    (s,) = adapter.prepare(req)
    while not s.done:
        s = StepState.from_bytes(s.to_bytes())
        adapter.step([s])
    assert torch.equal(s.latents, ref.latents)


def test_batch_at_different_step_positions_matches_each_alone(adapter):
    reqs = _cfg_pair()
    alone = [_run(adapter, [r])[0].latents for r in reqs]
    a, b = adapter.prepare(reqs)
    adapter.step([a])
    adapter.step([a])  # a two steps ahead of b from here on
    while not a.done:
        adapter.step([a, b])
    while not b.done:
        adapter.step([b])
    for s, want in zip((a, b), alone):
        torch.testing.assert_close(s.latents, want, atol=1e-5, rtol=0)
        print(f"batch vs alone, {s.request_id}: max abs diff "
              f"{(s.latents - want).abs().max().item():.2e}")


def test_negative_prompt_changes_the_output(adapter):
    plain, other = (_run(adapter, [GenRequest("n", _spec(negative_prompt=n))])[0].latents
                    for n in ("blurry", "a dog in the snow"))
    assert (plain - other).abs().max() > 1e-3


def test_cfg_split_in_threads_applies_true_cfg_like_batch_doubling(adapter):
    """CFG parallelism: each branch in its own adapter (threads swapping predictions) ends both
    copies of a two-request batch identical and allclose to batch doubling."""
    import queue
    import threading

    from genserve.models import load_preset
    from genserve.models.base import CfgBranch

    pair = (load_preset(PRESET), load_preset(PRESET))
    reqs = _cfg_pair()
    ref = _run(adapter, reqs)
    states = [ad.prepare(reqs) for ad in pair]
    boxes = (queue.Queue(), queue.Queue())

    def branch(i: int) -> None:
        def swap(t):
            boxes[1 - i].put(t)
            return boxes[i].get(timeout=60)

        while not states[i][0].done:
            pair[i].step(states[i], CfgBranch(bool(i), swap))

    threads = [threading.Thread(target=branch, args=(i,), daemon=True) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for u, c, want in zip(*states, ref):
        assert c.done and torch.equal(u.latents, c.latents)
        torch.testing.assert_close(c.latents, want.latents, atol=1e-5, rtol=0)


def test_a_local_checkpoint_directory_loads_as_qwen_image(adapter, tmp_path):
    """The real preset's path (diffusers layout, `from_pretrained`) on the tiny weights saved to
    disk: in float32 the tiny preset's image exactly; by default bf16."""
    from genserve.models import load_preset
    from genserve.models.presets import load_local

    adapter.pipe.save_pretrained(tmp_path)
    req = GenRequest("r", _spec(steps=2))
    real = load_local("qwen-image", tmp_path, dtype=torch.float32)
    assert real.name == "qwen-image" and type(real) is type(adapter)
    # The template's system part is 34 tokens for Qwen's tokenizer (the pipeline's constant).
    assert real.pipe.prompt_template_encode_start_idx == 34
    real.pipe.prompt_template_encode_start_idx = adapter.pipe.prompt_template_encode_start_idx
    assert np.array_equal(real.generate(req), adapter.generate(req))
    bf16 = load_preset("qwen-image", model_path=str(tmp_path))
    assert bf16.dtype == torch.bfloat16 and bf16.generate(req).shape == (H, W, 3)


def _sp_batches() -> list[list[GenRequest]]:
    """The CFG pair (text masked) and one request without CFG (one prompt: no text mask)."""
    return [_cfg_pair(), [GenRequest("c", _spec(guidance=1.0, prompt="a lighthouse"))]]


def _sp_worker(rank, world, init, schedules):
    import torch
    import torch.distributed as dist

    from genserve.models import load_preset
    from genserve.parallel import GroupCache
    from genserve.parallel.sequence import install

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        groups = GroupCache(range(world))
        for ranks in ((0, 1), (2, 3), (0, 1, 2), (0, 1, 2, 3)):  # collective: one order
            groups.make(ranks)

        def group_of(k):
            if k == 1 or (k == 3 and rank == 3):  # rank 3 runs SP 3's work alone meanwhile
                return None
            return groups.get({2: (rank // 2 * 2, rank // 2 * 2 + 1), 3: (0, 1, 2),
                               4: (0, 1, 2, 3)}[k])

        ad = load_preset(PRESET)
        sp = install(ad.transformer)
        results = []
        for degrees in schedules:
            for reqs in _sp_batches():
                states = ad.prepare(reqs)
                for k in degrees:
                    with sp.use(group_of(k)):
                        ad.step(states)
                results.append([s.latents.numpy() for s in states])
        return results
    finally:
        dist.destroy_process_group()


def test_sp_degrees_and_switching_match_sp1(world_pool, adapter):
    schedules = [[2] * STEPS, [4] * STEPS, [3] * STEPS, [1, 2, 4, 3, 2]]
    job = world_pool.submit(_sp_worker, 4, schedules, label="Qwen-Image SP world")
    refs = [[s.latents for s in _run(adapter, reqs)] for reqs in _sp_batches()]  # meanwhile
    res = world_pool.wait(job)
    worst = 0.0
    for rank, got in res.items():
        got = iter(got)
        for degrees in schedules:
            for ref in refs:
                for i, (lat, want) in enumerate(zip(next(got), ref)):
                    lat = torch.from_numpy(lat)
                    worst = max(worst, (lat - want).abs().max().item())
                    torch.testing.assert_close(
                        lat, want, atol=1e-4, rtol=0,
                        msg=lambda m: f"rank {rank}, degrees {degrees}, request {i}: {m}")
    print(f"SP vs SP 1: max abs diff {worst:.2e}")


def test_no_group_leaves_qwen_unchanged(adapter):
    from genserve.models import load_preset
    from genserve.parallel.sequence import install

    b = load_preset(PRESET)
    sp = install(b.transformer)
    with pytest.raises(ValueError, match="already installed"):
        install(b.transformer)
    reqs = _cfg_pair()
    sa, sb = adapter.prepare(reqs), b.prepare(reqs)
    for _ in range(3):
        adapter.step(sa)
        with sp.use(None):
            b.step(sb)
    for x, y in zip(sa, sb):
        assert torch.equal(x.latents, y.latents)


def test_qwen_on_two_workers_at_sp2_gives_the_image_of_one(forked_worker_pools, adapter):
    from genserve.parallel.workers import WorkerPool

    (req,) = _cfg_pair()[:1]
    with WorkerPool(PRESET, 2) as pool:
        (s,) = pool.prepare([req])
        (s,) = pool.steps((0, 1), [s], 2)
        (s,) = pool.steps((0,), [s], 1)  # and a degree change between steps
        (s,) = pool.steps((0, 1), [s], STEPS - 3)
        assert s.done
        (image,) = pool.decode([s])
    (ref,) = _run(adapter, [req])
    torch.testing.assert_close(s.latents, ref.latents, atol=1e-4, rtol=0)
    want = adapter.decode([ref])[0]
    assert image.shape == want.shape == (H, W, 3)
    assert np.abs(image.astype(int) - want.astype(int)).max() <= 1  # rounding to uint8 only
