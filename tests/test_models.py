"""Step-level execution on the tiny presets (CPU, float32, random weights built from config).

Exactness: a request paused after any step, serialised, moved to another process and resumed gives
bit-identical latents and output to an uninterrupted run (same batch composition, same threads).
"Another process" is rank 0 of the session's shared `world_pool` (tests/_spawn.py), spawned once
for every preset rather than once per preset; it builds the preset afresh for each resume.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from genserve.models import (GenRequest, ModelInputError, ModelLoadError, StepState,  # noqa: E402
                             load_preset)
from genserve.models.output import read_mp4, write_mp4, write_png  # noqa: E402
from genserve.spec import GenSpec  # noqa: E402

SHAPES = {"tiny-t2i": dict(height=64, width=64), "tiny-flux": dict(height=64, width=64),
          "tiny-t2v": dict(height=32, width=32, frames=9)}
STEPS = 6


@pytest.fixture(scope="module", params=list(SHAPES))
def adapter(request):
    torch.set_num_threads(1)
    return load_preset(request.param)


def req(adapter, rid="r", seed=3, prompt="a red cat", **kw):
    kw = {"steps": STEPS, "guidance": 5.0, **SHAPES[adapter.name], **kw}
    return GenRequest(rid, GenSpec(adapter.name, seed=seed, prompt=prompt, **kw))


def run_all(adapter, state):
    while not state.done:
        adapter.step([state])
    return state


def _resume_elsewhere(rank: int, world: int, init: str, name: str, blob: bytes):
    """In a pool process: build the same preset, resume the state, return latents and output."""
    import os

    import torch

    torch.set_num_threads(1)
    from genserve.models import StepState, load_preset

    ad = load_preset(name)
    state = StepState.from_bytes(blob)
    while not state.done:
        ad.step([state])
    return os.getpid(), state.latents.numpy(), ad.decode([state])[0]


def test_pause_serialise_resume_in_another_process_is_bit_identical(adapter, world_pool):
    ref = run_all(adapter, adapter.prepare([req(adapter)])[0])
    ref_out = adapter.decode([ref])[0]
    (s,) = adapter.prepare([req(adapter)])
    pause_at = int(np.random.default_rng(7).integers(1, STEPS))  # a random step boundary
    for _ in range(pause_at):
        adapter.step([s])
    blob = s.to_bytes()
    ((pid, latents, out),) = world_pool.run(_resume_elsewhere, 1, adapter.name, blob).values()
    assert pid != os.getpid()
    assert torch.equal(torch.from_numpy(latents), ref.latents)
    assert np.array_equal(out, ref_out)


def test_resume_in_process_after_every_step_is_bit_identical(adapter):
    ref = run_all(adapter, adapter.prepare([req(adapter)])[0])
    (s,) = adapter.prepare([req(adapter)])
    while not s.done:
        adapter.step([s])
        s = StepState.from_bytes(s.to_bytes())  # drop the live scheduler every step
    assert torch.equal(s.latents, ref.latents)


def test_state_moves_between_devices_and_back(adapter):
    ref = run_all(adapter, adapter.prepare([req(adapter)])[0])
    (s,) = adapter.prepare([req(adapter)])
    adapter.step([s])
    s.to("cpu")  # offload/restore path: the scheduler is rebuilt from its snapshot
    assert s.scheduler is None
    run_all(adapter, s)
    assert torch.equal(s.latents, ref.latents)


def test_batch_at_mixed_step_positions_matches_running_alone(adapter):
    reqs = [req(adapter, rid=f"r{i}", seed=10 + i, prompt=f"prompt {i}") for i in range(4)]
    alone = [run_all(adapter, adapter.prepare([r])[0]).latents for r in reqs]
    states = adapter.prepare(reqs)
    for i, s in enumerate(states):  # positions 0, 1, 2, 3
        for _ in range(i):
            adapter.step([s])
    while any(not s.done for s in states):
        adapter.step([s for s in states if not s.done])
    for s, ref in zip(states, alone):
        torch.testing.assert_close(s.latents, ref, atol=1e-5, rtol=0)


def test_adapter_matches_the_pipelines_own_loop(adapter):
    """Same latents as diffusers' pipeline call (Wan: it runs CFG as two forwards, we batch)."""
    r = req(adapter).spec
    kw = dict(height=r.height, width=r.width, num_inference_steps=r.steps,
              guidance_scale=r.guidance, output_type="latent", max_sequence_length=32,
              generator=torch.Generator().manual_seed(r.seed))
    if adapter.name == "tiny-t2v":
        theirs = adapter.pipe(r.prompt, num_frames=r.frames, **kw).frames
    else:
        theirs = adapter.pipe(r.prompt, **kw).images
    ours = run_all(adapter, adapter.prepare([req(adapter)])[0]).latents
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_cfg_and_no_cfg_states_can_share_a_call(adapter):
    if adapter.name == "tiny-flux":
        pytest.skip("FLUX is guidance-distilled: no CFG")
    a, b = adapter.prepare([req(adapter, rid="a"), req(adapter, rid="b", guidance=1.0)])
    assert a.cfg and not b.cfg
    adapter.step([a, b])
    assert a.step_index == b.step_index == 1


@pytest.mark.parametrize("guidance", [1.0, 3.5, 5.0])
def test_the_policy_batches_on_the_key_the_adapter_groups_by(adapter, guidance):
    """One batch key (CFG on/off included): a batch the policy plans as one is one forward."""
    from genserve.request import Request

    g = req(adapter, guidance=guidance)
    (state,) = adapter.prepare([g])
    r = Request("r", adapter.kind, g.spec)
    assert r.shape == state.shape_key
    assert r.shape[-1] == state.cfg == (guidance > 1.0 and adapter.name != "tiny-flux")


def test_same_seed_same_output_different_seed_differs(adapter):
    one = adapter.generate(req(adapter, seed=1))
    assert np.array_equal(one, adapter.generate(req(adapter, seed=1)))
    assert not np.array_equal(one, adapter.generate(req(adapter, seed=2)))
    assert one.dtype == np.uint8
    expect = (9, 32, 32, 3) if adapter.name == "tiny-t2v" else (64, 64, 3)
    assert one.shape == expect


@pytest.mark.parametrize("field,kw", [
    ("height", dict(height=62)), ("width", dict(width=0)), ("steps", dict(steps=0)),
    ("guidance", dict(guidance=float("nan")))])
def test_bad_input_raises_typed_error_naming_the_field(adapter, field, kw):
    with pytest.raises(ModelInputError) as e:
        adapter.prepare([req(adapter, **kw)])
    assert e.value.field == field and field in str(e.value)


def test_frames_must_fit_the_family(adapter):
    bad = 10 if adapter.name == "tiny-t2v" else 5
    with pytest.raises(ModelInputError, match="frames"):
        adapter.prepare([req(adapter, frames=bad)])


def test_stepping_a_finished_state_or_decoding_early_is_an_error(adapter):
    (s,) = adapter.prepare([req(adapter, steps=1)])
    with pytest.raises(ModelInputError, match="step_index"):
        adapter.decode([s])
    adapter.step([s])
    with pytest.raises(ModelInputError, match="step_index"):
        adapter.step([s])


def test_unknown_preset_and_bad_checkpoint_dirs(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown preset"):
        load_preset("nope")
    with pytest.raises(ModelLoadError, match="model-path"):
        load_preset("sd3-medium")
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_preset("wan2.1-14b", str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_preset("sd3-medium", str(tmp_path))
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_preset("sd3-medium", str(tmp_path))


def test_png_and_mp4_outputs(tmp_path):
    img = (np.arange(64 * 64 * 3) % 256).astype(np.uint8).reshape(64, 64, 3)
    write_png(tmp_path / "a.png", img)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), img)
    vid = np.zeros((9, 31, 32, 3), np.uint8)  # odd height is padded for yuv420p
    vid[:, :, :16] = 200
    write_mp4(tmp_path / "a.mp4", vid)
    back = read_mp4(tmp_path / "a.mp4")
    assert back.shape == (9, 32, 32, 3)
    assert abs(float(back[:, :31].mean()) - float(vid.mean())) < 3.0
    with pytest.raises(ValueError):
        write_png(tmp_path / "b.png", img.astype(np.float32))


def test_generate_cli_writes_outputs_and_rejects_bad_arguments(tmp_path, capsys):
    from genserve.cli import main

    png, mp4 = tmp_path / "a.png", tmp_path / "a.mp4"
    assert main(["generate", "--model", "tiny-t2i", "--prompt", "a cat", "--steps", "3",
                 "--out", str(png), "--quiet"]) == 0
    assert main(["generate", "--model", "tiny-t2v", "--prompt", "a cat", "--steps", "3",
                 "--out", str(mp4), "--quiet"]) == 0
    assert read_mp4(mp4).shape == (9, 32, 32, 3)
    capsys.readouterr()
    for bad in (["--model", "tiny-t2v", "--frames", "10", "--out", str(mp4)],
                ["--model", "tiny-t2i", "--steps", "0", "--out", str(png)],
                ["--model", "tiny-t2i", "--out", str(mp4)],
                ["--model", "nope", "--out", str(png)]):
        assert main(["generate", "--prompt", "x", "--quiet", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("genserve generate: error:") and "\n" not in err


def test_an_image_and_a_video_model_load_from_one_model_path(tmp_path, capsys):
    """`--model-path` named one checkpoint for every real model, so a server could not co-serve
    an image and a video model from real weights.  Now: a directory of checkpoints named after
    the models, or MODEL=DIR pairs; a path that cannot serve them all is refused before any
    worker starts, naming the model."""
    from genserve.cli import main
    from genserve.model_paths import check_model_dirs
    from genserve.models.presets import tiny_t2i, tiny_t2v

    tiny = {"sd3-medium": tiny_t2i(), "wan2.1-1.3b": tiny_t2v()}
    for name, ad in tiny.items():
        ad.pipe.save_pretrained(tmp_path / "models" / name)
    root, pairs = str(tmp_path / "models"), ",".join(
        f"{n}={tmp_path / 'models' / n}" for n in tiny)
    for path in (root, pairs):
        check_model_dirs([*tiny, "tiny-t2i"], path)
        for name, ad in tiny.items():
            real = load_preset(name, path)
            assert real.name == name and type(real) is type(ad)
    single = str(tmp_path / "models" / "sd3-medium")  # one checkpoint: one real model only
    check_model_dirs(["sd3-medium"], single)
    with pytest.raises(ValueError, match="sd3-medium and wan2.1-1.3b would both load"):
        check_model_dirs(list(tiny), single)
    with pytest.raises(ValueError, match="no directory for wan2.1-1.3b"):
        check_model_dirs(list(tiny), f"sd3-medium={single}")
    with pytest.raises(ValueError, match="wan2.1-14b is not a diffusers checkpoint"):
        check_model_dirs(["wan2.1-14b"], str(tmp_path / "models" / "wan2.1-14b"))
    check_model_dirs(["wan2.1-14b"], str(tmp_path / "elsewhere"), local=False)  # a Ray head
    with pytest.raises(ModelLoadError, match="no directory for wan2.1-1.3b"):
        load_preset("wan2.1-1.3b", f"sd3-medium={single}")
    # The command line says so before starting anything: exit 2, one line.
    capsys.readouterr()  # the loads' progress bars
    assert main(["serve", "--models", "sd3-medium,wan2.1-1.3b", "--model-path", single]) == 2
    err = capsys.readouterr().err.strip()
    assert "would both load" in err and "\n" not in err, err


@pytest.mark.parametrize("preset", ["sd3-medium", "flux-dev", "wan2.1-1.3b"])
def test_real_presets_load_a_local_diffusers_directory(preset, tmp_path):
    """The real-checkpoint path (from_pretrained, local_files_only) on a saved tiny pipeline of the
    same family: same weights, same output."""
    from genserve.models.presets import load_local, tiny_flux, tiny_t2i, tiny_t2v

    build, name = {"sd3-medium": (tiny_t2i, "tiny-t2i"), "flux-dev": (tiny_flux, "tiny-flux"),
                   "wan2.1-1.3b": (tiny_t2v, "tiny-t2v")}[preset]
    tiny = build()
    tiny.pipe.save_pretrained(tmp_path)
    real = load_local(preset, tmp_path, dtype=torch.float32)
    real.max_sequence_length = tiny.max_sequence_length  # the tiny T5 tokenizer holds 32 tokens
    r = GenRequest("r", GenSpec(name, **SHAPES[name], steps=3, seed=1, prompt="a cat"))
    assert real.name == preset and type(real) is type(tiny)
    assert np.array_equal(real.generate(r), tiny.generate(r))
