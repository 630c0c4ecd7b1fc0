"""Image-to-video (Wan2.1 I2V, `genserve.models.i2v`) on the tiny preset, and the input image's
checks and normalisation (`genserve.input_image`).

Model level: the adapter matches diffusers' own WanImageToVideoPipeline loop; a request paused,
serialised and resumed (here and in another process) is bit-identical; a batch of requests at
different step positions is allclose to each alone; Ulysses SP 2 is allclose to SP 1 (the image
cross-attention's keys are replicated); the first frame follows the input image.
"""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

from genserve import input_image  # noqa: E402
from genserve.input_image import InputImageError  # noqa: E402
from genserve.models import GenRequest, ModelInputError, StepState, load_preset  # noqa: E402
from genserve.request import Request  # noqa: E402
from genserve.spec import GenSpec  # noqa: E402

STEPS = 4


def png(color=None, size=(48, 40), fmt="PNG") -> bytes:
    """A test image: a gradient (color None) or a flat color."""
    if color is None:
        y, x = np.mgrid[0:size[1], 0:size[0]]
        arr = np.stack([x * 255 // size[0], y * 255 // size[1], (x + y) % 256], -1)
        im = Image.fromarray(arr.astype(np.uint8), "RGB")
    else:
        im = Image.new("RGB", size, color)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def spec(image: bytes | None = None, seed=3, prompt="a red fox", **kw) -> GenSpec:
    kw = {"height": 32, "width": 32, "frames": 9, "steps": STEPS, "guidance": 5.0, **kw}
    img = input_image.encode(input_image.normalize(image or png(), kw["width"], kw["height"]))
    return GenSpec("tiny-i2v", seed=seed, prompt=prompt, image=img, **kw)


@pytest.fixture(scope="module")
def ad():
    torch.set_num_threads(1)
    return load_preset("tiny-i2v")


def run_all(ad, state):
    while not state.done:
        ad.step([state])
    return state


def test_matches_the_pipelines_own_loop(ad):
    """Same latents as WanImageToVideoPipeline's call (it runs CFG as two forwards; we batch).
    The prompt embeddings are handed over: the pipeline's own text cleaning needs ftfy."""
    s = spec(negative_prompt="blurry")
    (st,) = ad.prepare([GenRequest("r", s)])
    image = input_image.decode(s.image, s.width, s.height)
    theirs = ad.pipe(image=image, prompt_embeds=st.cond["encoder_hidden_states"],
                     negative_prompt_embeds=st.uncond["encoder_hidden_states"], height=s.height,
                     width=s.width, num_frames=s.frames, num_inference_steps=s.steps,
                     guidance_scale=s.guidance, output_type="latent",
                     generator=torch.Generator().manual_seed(s.seed)).frames
    torch.testing.assert_close(run_all(ad, st).latents, theirs, atol=1e-5, rtol=0)


def _resume_elsewhere(rank: int, world: int, init: str, blob: bytes):
    import torch

    torch.set_num_threads(1)
    from genserve.models import StepState, load_preset

    ad = load_preset("tiny-i2v")
    state = StepState.from_bytes(blob)
    while not state.done:
        ad.step([state])
    return os.getpid(), state.latents.numpy(), ad.decode([state])[0]


def test_pause_serialise_resume_is_bit_identical(ad, world_pool):
    ref = run_all(ad, ad.prepare([GenRequest("r", spec())])[0])
    ref_out = ad.decode([ref])[0]
    # here, dropping the live scheduler and every tensor's identity after every step
    (s,) = ad.prepare([GenRequest("r", spec())])
    while not s.done:
        ad.step([s])
        s = StepState.from_bytes(s.to_bytes())
    assert torch.equal(s.latents, ref.latents)
    # in another process, which builds the preset afresh
    (s,) = ad.prepare([GenRequest("r", spec())])
    ad.step([s])
    ((pid, latents, out),) = world_pool.run(_resume_elsewhere, 1, s.to_bytes()).values()
    assert pid != os.getpid()
    assert torch.equal(torch.from_numpy(latents), ref.latents)
    assert np.array_equal(out, ref_out)


def test_state_carries_the_image_once(ad):
    """The image tokens and the condition are the same tensors in both branches' inputs, so a
    state's bytes hold them once."""
    (s,) = ad.prepare([GenRequest("r", spec())])
    for key in ("condition", "encoder_hidden_states_image"):
        assert s.cond[key] is s.uncond[key]
    assert s.cond["condition"].shape == (1, 4 + 16, 3, 4, 4)  # mask + first-frame latents
    again = StepState.from_bytes(s.to_bytes())
    assert again.cond["condition"].untyped_storage().data_ptr() == (
        again.uncond["condition"].untyped_storage().data_ptr())


def test_batch_at_different_step_positions_matches_running_alone(ad):
    reqs = [GenRequest(f"r{i}", spec(png(c), seed=10 + i, prompt=f"prompt {i}"))
            for i, c in enumerate([None, (200, 30, 30)])]
    alone = [run_all(ad, ad.prepare([r])[0]).latents for r in reqs]
    states = ad.prepare(reqs)
    ad.step([states[1]])  # positions 0 and 1
    while any(not s.done for s in states):
        ad.step([s for s in states if not s.done])
    for s, ref in zip(states, alone):
        torch.testing.assert_close(s.latents, ref, atol=1e-5, rtol=0)


def test_first_frame_follows_the_input_image(ad):
    """The output's first frame depends on the image (same prompt and seed: random weights, so
    only that it changes, not how), and the same image gives the same video."""
    def first(image: bytes) -> np.ndarray:
        return ad.generate(GenRequest("r", spec(image, steps=2)))[0].astype(int)

    dark, light = first(png((10, 10, 10))), first(png((245, 245, 245)))
    assert np.abs(light - dark).max() >= 1
    assert np.array_equal(first(png((10, 10, 10))), dark)


def test_missing_or_bad_image_names_input_reference(ad):
    with pytest.raises(ModelInputError) as e:
        ad.prepare([GenRequest("r", GenSpec("tiny-i2v", 32, 32, 9, steps=2, prompt="x"))])
    assert e.value.field == "input_reference"
    with pytest.raises(ModelInputError) as e:
        ad.prepare([GenRequest("r", GenSpec("tiny-i2v", 32, 32, 9, steps=2, prompt="x",
                                            image=base64.b64encode(b"GIF89a...").decode()))])
    assert e.value.field == "input_reference"


def test_an_image_of_another_size_is_normalised_by_the_adapter(ad):
    """A spec from elsewhere than the server (the command line, a trace) may carry an image of
    any size: the adapter covers and crops it as the server would have."""
    raw = png(size=(80, 50))
    ours = GenSpec("tiny-i2v", 32, 32, 9, steps=2, prompt="x", image=input_image.encode(raw))
    server = spec(raw, steps=2, prompt="x", seed=0)
    assert np.array_equal(ad.generate(GenRequest("a", ours)), ad.generate(GenRequest("b", server)))


def test_generate_cli_takes_the_image(tmp_path, capsys):
    from genserve.cli import main

    img, out = tmp_path / "in.webp", tmp_path / "out.mp4"
    img.write_bytes(png((0, 90, 200), fmt="WEBP"))
    assert main(["generate", "--model", "tiny-i2v", "--prompt", "a fox", "--steps", "2",
                 "--image", str(img), "--out", str(out), "--quiet"]) == 0
    assert out.stat().st_size > 0
    assert main(["generate", "--model", "tiny-i2v", "--prompt", "a fox", "--steps", "2",
                 "--out", str(out), "--quiet"]) == 2
    assert "--image" in capsys.readouterr().err


def _sp_worker(rank, world, init, schedules):
    import torch
    import torch.distributed as dist

    from genserve.models import load_preset
    from genserve.parallel.sequence import install

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ad = load_preset("tiny-i2v")
        sp = install(ad.transformer)
        out = []
        for degrees in schedules:
            (s,) = ad.prepare([GenRequest("r", _SP_SPEC)])
            for k in degrees:
                with sp.use(dist.group.WORLD if k == 2 else None):
                    ad.step([s])
            out.append(s.latents.numpy())
        return out
    finally:
        dist.destroy_process_group()


# 32x48 x 9 frames: 3 x 2 x 3 = 18 patch tokens (9 per rank at SP 2); 17 image tokens, replicated.
_SP_SPEC = spec(height=32, width=48, seed=5)


def test_sp2_matches_sp1(ad, world_pool):
    schedules = [[2] * STEPS, [1, 2, 2, 1]]
    job = world_pool.submit(_sp_worker, 2, schedules, label="SP 2 world for tiny-i2v")
    ref = run_all(ad, ad.prepare([GenRequest("r", _SP_SPEC)])[0])
    for rank, per_schedule in world_pool.wait(job).items():
        for degrees, lat in zip(schedules, per_schedule):
            torch.testing.assert_close(torch.from_numpy(lat), ref.latents, atol=1e-4, rtol=0,
                                       msg=lambda m: f"rank {rank}, degrees {degrees}: {m}")


def test_real_preset_loads_a_local_diffusers_directory(ad, tmp_path):
    """wan2.1-i2v-14b's path (from_pretrained, local_files_only) on the saved tiny pipeline."""
    from genserve.models.presets import load_local

    ad.pipe.save_pretrained(tmp_path)
    real = load_local("wan2.1-i2v-14b", tmp_path, dtype=torch.float32)
    r = GenRequest("r", spec(steps=2))
    assert real.name == "wan2.1-i2v-14b" and type(real) is type(ad)
    assert np.array_equal(real.generate(r), ad.generate(r))


# ----------------------------------------------------------------------------- input images
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_normalize_covers_and_crops_to_the_request_size(fmt):
    out = input_image.normalize(png(size=(300, 100), fmt=fmt), 64, 48)
    with Image.open(io.BytesIO(out)) as im:
        assert (im.format, im.size, im.mode) == ("PNG", (64, 48), "RGB")
    # Aspect kept: the 300x100 gradient (red = x * 255 / 300) scaled to 144x48, its middle 64
    # columns (40..103) kept, which show source columns 83..215.
    arr = np.asarray(Image.open(io.BytesIO(input_image.normalize(png(size=(300, 100)), 64, 48))))
    for col, x in ((0, 40.5), (63, 103.5)):
        assert abs(int(arr[24, col, 0]) - x * 300 / 144 * 255 / 300) <= 4


@pytest.mark.parametrize("data,why", [
    (b"", "empty"), (b"not an image at all", "not an image"),
    (png(fmt="GIF"), "GIF images are not accepted"), (png(fmt="BMP"), "BMP images"),
    (png()[:60], "cannot be decoded|unreadable"),
    (png((1, 2, 3), size=(9000, 1)), "too large")])
def test_bad_images_are_refused_with_the_reason(data, why):
    with pytest.raises(InputImageError, match=why):
        input_image.normalize(data, 32, 32)


def test_the_byte_limit():
    with pytest.raises(InputImageError, match="at most 100"):
        input_image.normalize(png(), 32, 32, max_bytes=100)


def test_data_urls_only_never_a_remote_url():
    raw = png()
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    assert input_image.from_data_url(url) == raw
    for bad, why in [("https://example.com/a.png", "remote URLs are not fetched"),
                     ("http://10.0.0.1/x", "remote"), ("file:///etc/passwd", "remote"),
                     ("data:image/png,abc", "base64 data: URL"),
                     ("data:text/plain;base64,aGk=", "send an image"),
                     ("data:image/png;base64,@@@", "not valid base64"), ("just text", "data:")]:
        with pytest.raises(InputImageError, match=why):
            input_image.from_data_url(bad)


def test_the_image_travels_with_the_spec_in_traces_and_the_job_store():
    from genserve.kinds import Kind
    from genserve.server.store import spec_from_record, spec_record

    s = spec()
    r = Request("r", Kind.VIDEO, s, arrival=0.0, deadline=9.0)
    assert Request.from_trace(r.to_trace()).spec == s
    assert spec_from_record(spec_record(Kind.VIDEO, s, 1, None, "0.5"))[1] == s
    assert s.image not in repr(s)  # logs never carry the image
