"""GPU check (issue 3): the adapter's step at the real configs vs the bare transformer forward.

Random weights, bf16, eager, at the published configs of SD3-medium (512 and 1024) and
Wan2.1-1.3B (480p, 81 frames), the same shapes as `h200_diffusers_forward.json`.  One CFG request:
the bare forward runs batch 2; the adapter's step adds the batch concat, guidance and the
scheduler update.  Text encoders are not built (embeddings are random tensors of the right shape):
the step does not use them.  Run by hand on a GPU machine:

    python bench/gpu_adapter_step.py [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from genserve.spec import GenRequest, GenSpec  # noqa: E402
from genserve.models.families import SD3Adapter, WanAdapter  # noqa: E402

PROFILES = Path(__file__).resolve().parents[1] / "genserve/data/profiles"
PROFILE = PROFILES / "h200_diffusers_forward.json"
BLOCKS = PROFILES / "h200_dit_blocks.json"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    _sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3


def sd3(dev):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)

    tr = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                               attention_head_dim=64, num_attention_heads=24,
                               joint_attention_dim=4096, caption_projection_dim=1536,
                               pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=1.5305, shift_factor=0.0609)
    pipe = StableDiffusion3Pipeline(transformer=tr, vae=vae,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    return SD3Adapter(pipe.to(dev, torch.bfloat16), "sd3-medium", dev)


def wan(dev):
    from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline,
                           WanTransformer3DModel)

    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12,
                               attention_head_dim=128, in_channels=16, out_channels=16,
                               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                               rope_max_seq_len=1024)
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                    num_train_timesteps=1000, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=tr,
                       vae=AutoencoderKLWan(), scheduler=sched)
    return WanAdapter(pipe.to(dev, torch.bfloat16), "wan2.1-1.3b", dev)


def measure(ad, req: GenRequest, text_len: int, text_dim: int, pooled: int | None,
            reps: int) -> tuple[float, float]:
    dev, dt = ad.device, ad.dtype
    cond = {"encoder_hidden_states": torch.randn(1, text_len, text_dim, device=dev, dtype=dt)}
    if pooled:
        cond["pooled_projections"] = torch.randn(1, pooled, device=dev, dtype=dt)
    uncond = {k: torch.randn_like(v) for k, v in cond.items()}
    # A schedule longer than warm-up + reps, so every timed step is a real one.
    (state,) = ad.prepare([req], encoded=[(cond, uncond)])
    x = torch.cat([state.latents, state.latents]).to(dt)
    kw = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    t = torch.full((2,), 500.0, device=dev)
    def bare_fn():
        with torch.no_grad():
            ad.transformer(hidden_states=x, timestep=t, return_dict=False, **kw)

    # Interleave: the first timed kernel on a fresh GPU runs at idle clocks.
    bares, steps = [], []
    for _ in range(3):
        bares.append(timed(bare_fn, reps))
        steps.append(timed(lambda: ad.step([state]), reps))
    return min(bares), min(steps)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    dev = torch.device("cuda")
    prof = {(r["model"], r["size"], r["batch"]): r["forward_ms"]
            for r in json.loads(PROFILE.read_text())["rows"]}
    blocks = {(r["model"], r["size"], r["batch"], r["sp"]): r["step_ms"]
              for r in json.loads(BLOCKS.read_text())["rows"]}
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    sd3_512, sd3_1024 = GenSpec("sd3-medium", 512, 512, steps=1000), GenSpec(
        "sd3-medium", 1024, 1024, steps=1000)
    wan_480p = GenSpec("wan2.1-1.3b", 480, 832, 81, steps=1000)
    cases = [("sd3-medium", "512", sd3, GenRequest("a", sd3_512), 333, 2048),
             ("sd3-medium", "1024", sd3, GenRequest("b", sd3_1024), 333, 2048),
             ("wan2.1-1.3b", "480p-81f", wan, GenRequest("c", wan_480p), 512, None)]
    ad = None
    for model, size, build, req, text_len, pooled in cases:
        if build is not None:
            del ad
            torch.cuda.empty_cache()
            ad = build(dev)
        reps = a.reps if model.startswith("sd3") else max(3, a.reps // 5)
        bare, step = measure(ad, req, text_len, 4096, pooled, reps)
        ref = prof.get((model, size, 2))
        print(f"{model} {size}: bare forward (batch 2) {bare:8.2f} ms, adapter step {step:8.2f} ms, "
              f"overhead {100 * (step / bare - 1):+5.2f}%; H200 profile forward {ref:.2f} ms "
              f"(this card / profile {bare / ref:.2f}x)", flush=True)
        # Issue 4: degree 1 with genserve's sequence-parallel processors installed, against the
        # per-block compute figures (blocks x layers) at SP 1.
        from genserve.parallel.sequence import install

        if getattr(ad.transformer, "_genserve_sp", None) is None:
            install(ad.transformer)
        _, sp_step = measure(ad, req, text_len, 4096, pooled, reps)
        blk = blocks.get((model, size, 2, 1))
        print(f"    with SP processors (degree 1): adapter step {sp_step:8.2f} ms "
              f"({100 * (sp_step / step - 1):+5.2f}% vs diffusers processors); blocks file "
              f"step (SP 1, batch 2) {blk:.2f} ms -> full step / blocks {sp_step / blk:.2f}x",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
