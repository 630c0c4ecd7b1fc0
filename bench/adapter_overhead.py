"""Step-adapter overhead and batch scaling on CPU, run by hand (numbers to read, not tests).

Uses the tiny random-weight presets (`tiny-t2i`: StableDiffusion3Pipeline, `tiny-t2v`:
WanPipeline).  Nothing is downloaded; the script needs only genserve and its model deps
(torch, diffusers, transformers).

1. Adapter overhead vs the bare diffusers loop, per denoising step, same model, prompt, size,
   step count and guidance.  Both sides are timed end to end with two step counts and the
   difference is divided by the step difference, which cancels everything paid once per run
   (prompt encoding, latent init, scheduler set-up):

       per_step_bare    = (t(pipe(..., N steps, output_type="latent")) - t(pipe(..., n steps))) / (N - n)
       per_step_adapter = (t(prepare + N x step([state])) - t(prepare + n x step([state]))) / (N - n)

   No VAE decode on either side.  Each t() is a median over repeats, after a warm-up run.  The
   direct median of single `adapter.step([state])` calls is printed as a cross-check.
   CFG: SD3Pipeline batches [uncond, cond] into one forward like the adapter; WanPipeline runs
   cond and uncond as two forwards of batch 1 while the adapter runs one forward of batch 2, so
   the t2v ratio mixes adapter overhead with a batching difference.  The "nocfg" rows
   (guidance 1.0: one forward of batch 1 on both sides) isolate the adapter's own overhead.
   Shapes: a launch-overhead-bound small one and a larger (still CPU-feasible) one per family.

2. Batch scaling: time of one `adapter.step(states)` call for 1, 2, 4, 8 states of one shape,
   each state at a different step position (state i is stepped 3*i times first), CFG on.
   Printed: ms per call and the per-request cost relative to batch 1 ((t_b / b) / t_1; below 1
   means batching pays).

    cd /work/main && .venv/bin/python bench/adapter_overhead.py [--threads 2] [--quick]

About 2 minutes on 2 cores; --quick uses fewer repeats (a smoke run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from genserve.models import GenRequest, load_preset  # noqa: E402

PROMPT = "a red fox running through fresh snow"


def _median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _request(h: int, w: int, frames: int, steps: int, guidance: float, rid: str = "r0",
             seed: int = 0) -> GenRequest:
    return GenRequest(id=rid, prompt=PROMPT, height=h, width=w, frames=frames, steps=steps,
                      guidance=guidance, seed=seed)


def _bare_run(adapter, h: int, w: int, frames: int, steps: int, guidance: float):
    """The pipeline's own loop: encode + prepare + `steps` denoising steps, latents out."""
    pipe = adapter.pipe
    kw = dict(prompt=PROMPT, height=h, width=w, num_inference_steps=steps,
              guidance_scale=guidance, output_type="latent", return_dict=False,
              generator=torch.Generator("cpu").manual_seed(0),
              max_sequence_length=adapter.max_sequence_length)
    if adapter.kind.name == "VIDEO":
        kw["num_frames"] = frames

    def run():
        with torch.no_grad():
            pipe(**kw)
    return run


def _adapter_run(adapter, h: int, w: int, frames: int, steps: int, guidance: float):
    """The adapter: prepare (which encodes) + `steps` single-state step() calls, no decode."""
    req = _request(h, w, frames, steps, guidance)

    def run():
        (st,) = adapter.prepare([req])
        while not st.done:
            adapter.step([st])
    return run


def _direct_step_ms(adapter, h, w, frames, guidance, repeats) -> float:
    """Median of single adapter.step([state]) calls (after prepare), in ms."""
    (st,) = adapter.prepare([_request(h, w, frames, repeats + 3, guidance)])
    adapter.step([st])  # warm-up; also leaves UniPC's first (lower-order) step behind
    ts = []
    while not st.done:
        t0 = time.perf_counter()
        adapter.step([st])
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def overhead(adapter, label: str, h: int, w: int, frames: int, guidance: float,
             n: int, N: int, repeats: int) -> None:
    per = {}
    for side, make in (("bare", _bare_run), ("adapter", _adapter_run)):
        t_small = _median_time(make(adapter, h, w, frames, n, guidance), repeats)
        t_big = _median_time(make(adapter, h, w, frames, N, guidance), repeats)
        per[side] = 1e3 * (t_big - t_small) / (N - n)
    direct = _direct_step_ms(adapter, h, w, frames, guidance, max(N, 8))
    shape = f"{h}x{w}" + (f"x{frames}f" if frames > 1 else "")
    cfg = "cfg" if guidance > 1.0 else "nocfg"
    print(f"  {label:9s} {shape:11s} {cfg:5s}  steps {n:>2d}->{N:<3d}  "
          f"bare {per['bare']:8.2f} ms/step   adapter {per['adapter']:8.2f} ms/step "
          f"(direct {direct:8.2f})   adapter/bare {per['adapter'] / per['bare']:5.2f}")


def batch_scaling(adapter, label: str, h: int, w: int, frames: int, repeats: int,
                  sizes=(1, 2, 4, 8)) -> None:
    bmax = max(sizes)
    offset = 3
    steps = offset * (bmax - 1) + (len(sizes) * (repeats + 1)) + 5
    reqs = [_request(h, w, frames, steps, 5.0, rid=f"r{i}", seed=i) for i in range(bmax)]
    states = adapter.prepare(reqs)
    for i, s in enumerate(states):  # state i at step offset*i
        for _ in range(offset * i):
            adapter.step([s])
    shape = f"{h}x{w}" + (f"x{frames}f" if frames > 1 else "")
    base = None
    cells = []
    for b in sizes:
        batch = states[:b]
        ms = 1e3 * _median_time(lambda: adapter.step(batch), repeats)
        base = base if base is not None else ms
        cells.append(f"b={b}: {ms:7.2f} ms ({ms / b / base:4.2f}x/req)")
    positions = [s.step_index for s in states]
    print(f"  {label:9s} {shape:11s}  " + "   ".join(cells))
    print(f"  {'':9s} {'':11s}  (step positions after the run: {positions})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reps = 2 if args.quick else 5
    t_start = time.perf_counter()

    t2i, t2v = load_preset("tiny-t2i"), load_preset("tiny-t2v")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"repeats {reps} (medians)")

    print("\n1. per-step time, adapter.step([state]) vs the pipeline's own loop "
          "(differenced over step counts)")
    # (adapter, label, h, w, frames, guidance, n, N)
    cases = [
        (t2i, "tiny-t2i", 64, 64, 1, 5.0, 2, 22),
        (t2i, "tiny-t2i", 64, 64, 1, 1.0, 2, 22),
        (t2i, "tiny-t2i", 128, 128, 1, 5.0, 2, 12),
        (t2v, "tiny-t2v", 32, 32, 9, 5.0, 2, 22),
        (t2v, "tiny-t2v", 32, 32, 9, 1.0, 2, 22),
        (t2v, "tiny-t2v", 64, 64, 17, 5.0, 2, 12),
    ]
    for adapter, label, h, w, f, g, n, N in cases:
        overhead(adapter, label, h, w, f, g, n, N, reps)

    print("\n2. batch scaling: one adapter.step(states) call, states at different step "
          "positions, CFG on")
    for adapter, label, h, w, f in ((t2i, "tiny-t2i", 64, 64, 1), (t2i, "tiny-t2i", 128, 128, 1),
                                    (t2v, "tiny-t2v", 32, 32, 9), (t2v, "tiny-t2v", 64, 64, 17)):
        batch_scaling(adapter, label, h, w, f, reps * 2)

    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
