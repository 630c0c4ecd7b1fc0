"""Step-adapter overhead and batch scaling on CPU, run by hand (numbers to read, not tests).

Uses the tiny random-weight presets (`tiny-t2i`: StableDiffusion3Pipeline, `tiny-t2v`:
WanPipeline).  Nothing is downloaded; the script needs only genserve and its model deps
(torch, diffusers, transformers).

1. Adapter overhead vs the bare diffusers loop, per denoising step, same model, prompt, size,
   step count and guidance.  Both sides are timed end to end with two step counts and the
   difference is divided by the step difference, which cancels everything paid once per run
   (prompt encoding, latent init, scheduler set-up):

       bare    = (t(pipe(..., N steps, output_type="latent")) - t(same, n steps)) / (N - n)
       adapter = (t(prepare + N x step([state])) - t(prepare + n x step([state]))) / (N - n)

   No VAE decode on either side.  Each t() is a median over repeats, after a warm-up run; the
   four runs (bare/adapter x n/N) are interleaved round by round so machine drift hits all of
   them alike, and the quartiles of the per-round adapter/bare ratio are printed as a noise gauge.
   The direct median of single `adapter.step([state])` calls is printed as a cross-check.
   CFG: SD3Pipeline batches [uncond, cond] into one forward like the adapter; WanPipeline runs
   cond and uncond as two forwards of batch 1 while the adapter runs one forward of batch 2, so
   the t2v ratio mixes adapter overhead with a batching difference.  The "nocfg" rows
   (guidance 1.0: one forward of batch 1 on both sides) isolate the adapter's own overhead.
   Shapes: a launch-overhead-bound small one (t2i 64x64, t2v 32x32x9) and a larger, still
   CPU-feasible one (t2i 128x128, t2v 256x256x17: the tiny Wan transformer is so narrow that
   64x64x17 is still launch bound).

2. Batch scaling: time of one `adapter.step(states)` call for 1, 2, 4, 8 states of one shape,
   each state at a different step position (state i is stepped 3*i times first), CFG on,
   small and large shape per family; batch sizes interleaved round by round.
   Printed: ms per call and the per-request cost relative to batch 1 ((t_b / b) / t_1; below 1
   means batching pays).

    cd /work/main && .venv/bin/python bench/adapter_overhead.py [--threads 2] [--quick]

About 2 minutes on 2 cores (numbers are noisy on shared VMs: read the rounds
IQR); --quick uses fewer repeats (a smoke run).
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
from genserve.request import Kind  # noqa: E402
from genserve.spec import GenSpec  # noqa: E402

# Short enough for the tiny presets' 32-token, character-level T5 tokenizer (no truncation).
PROMPT = "a fox in the snow"
# (height, width, frames).  Small: launch-overhead bound.  Large: compute starts to dominate
# (SD3 128x128: 1024 tokens; Wan 256x256x17: 5x16x16 latents, 1280 tokens).
SMALL_T2I, LARGE_T2I = (64, 64, 1), (128, 128, 1)
SMALL_T2V, LARGE_T2V = (32, 32, 9), (256, 256, 17)


def _request(adapter, h: int, w: int, frames: int, steps: int, guidance: float,
             rid: str = "r0", seed: int = 0) -> GenRequest:
    return GenRequest(rid, GenSpec(adapter.name, h, w, frames=frames, steps=steps,
                                   guidance=guidance, seed=seed, prompt=PROMPT))


def _bare_run(adapter, h: int, w: int, frames: int, steps: int, guidance: float):
    """The pipeline's own loop: encode + prepare + `steps` denoising steps, latents out."""
    pipe = adapter.pipe
    kw = {"prompt": PROMPT, "height": h, "width": w, "num_inference_steps": steps,
          "guidance_scale": guidance, "output_type": "latent", "return_dict": False,
          "max_sequence_length": adapter.max_sequence_length}
    if adapter.kind is Kind.VIDEO:
        kw["num_frames"] = frames

    def run():
        with torch.no_grad():
            pipe(**kw, generator=torch.Generator("cpu").manual_seed(0))
    return run


def _adapter_run(adapter, h: int, w: int, frames: int, steps: int, guidance: float):
    """The adapter: prepare (which encodes) + `steps` single-state step() calls, no decode."""
    req = _request(adapter, h, w, frames, steps, guidance)

    def run():
        (st,) = adapter.prepare([req])
        while not st.done:
            adapter.step([st])
    return run


def _direct_step_ms(adapter, h, w, frames, guidance, repeats) -> float:
    """Median of single adapter.step([state]) calls (after prepare), in ms."""
    (st,) = adapter.prepare([_request(adapter, h, w, frames, repeats + 3, guidance)])
    adapter.step([st])  # warm-up; also leaves UniPC's first (lower-order) step behind
    ts = []
    while not st.done:
        t0 = time.perf_counter()
        adapter.step([st])
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def overhead(adapter, label: str, h: int, w: int, frames: int, guidance: float,
             n: int, N: int, repeats: int) -> None:
    runs = {(side, k): make(adapter, h, w, frames, k, guidance)
            for side, make in (("bare", _bare_run), ("adapter", _adapter_run)) for k in (n, N)}
    keys = list(runs)
    for key in keys:  # warm-up (allocations, oneDNN primitives for this shape)
        runs[key]()
    times = {key: [] for key in keys}
    for r in range(repeats):  # interleaved rounds, rotated order: drift hits all four alike
        for key in keys[r % 4:] + keys[:r % 4]:
            t0 = time.perf_counter()
            runs[key]()
            times[key].append(time.perf_counter() - t0)
    med = {key: statistics.median(v) for key, v in times.items()}
    per = {side: 1e3 * (med[(side, N)] - med[(side, n)]) / (N - n) for side in ("bare", "adapter")}
    rounds = [(times[("adapter", N)][i] - times[("adapter", n)][i])
              / (times[("bare", N)][i] - times[("bare", n)][i]) for i in range(repeats)]
    q1, _, q3 = statistics.quantiles(rounds, n=4)
    direct = _direct_step_ms(adapter, h, w, frames, guidance, max(N, 8))
    shape = f"{h}x{w}" + (f"x{frames}f" if frames > 1 else "")
    cfg = "cfg" if guidance > 1.0 else "nocfg"
    print(f"  {label:8s} {shape:11s} {cfg:5s} {n:>2d}->{N:<3d} "
          f"bare {per['bare']:7.2f}  adapter {per['adapter']:7.2f}  (direct {direct:7.2f})  "
          f"adapter/bare {per['adapter'] / per['bare']:5.2f}  "
          f"[rounds IQR {q1:.2f}-{q3:.2f}]")


def batch_scaling(adapter, label: str, h: int, w: int, frames: int, repeats: int,
                  sizes=(1, 2, 4, 8)) -> None:
    bmax, offset, warmup = max(sizes), 3, 2
    steps = offset * (bmax - 1) + (warmup + repeats) * len(sizes) + 2
    reqs = [_request(adapter, h, w, frames, steps, 5.0, rid=f"r{i}", seed=i)
            for i in range(bmax)]
    states = adapter.prepare(reqs)
    for i, s in enumerate(states):  # state i starts at step offset*i
        for _ in range(offset * i):
            adapter.step([s])
    for b in sizes:
        for _ in range(warmup):
            adapter.step(states[:b])
    times = {b: [] for b in sizes}
    for _ in range(repeats):  # interleaved rounds over batch sizes
        for b in sizes:
            batch = states[:b]
            t0 = time.perf_counter()
            adapter.step(batch)
            times[b].append(time.perf_counter() - t0)
    ms = {b: 1e3 * statistics.median(v) for b, v in times.items()}
    shape = f"{h}x{w}" + (f"x{frames}f" if frames > 1 else "")
    cells = [f"b={b}: {ms[b]:7.2f} ms ({ms[b] / b / ms[sizes[0]]:4.2f}x/req)" for b in sizes]
    print(f"  {label:8s} {shape:11s} " + "  ".join(cells))
    print(f"  {'':8s} {'':11s} (step positions at the end: "
          f"{[s.step_index for s in states]} of {steps})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reps = 3 if args.quick else 9
    t_start = time.perf_counter()

    t2i, t2v = load_preset("tiny-t2i"), load_preset("tiny-t2v")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"repeats {reps} (medians)")

    print("\n1. per-step ms, adapter.step([state]) vs the pipeline's own loop, "
          "(t(N steps) - t(n steps)) / (N - n);")
    print("   direct = median single step() call; rounds IQR = quartiles of the "
          "per-round adapter/bare ratio")
    # (adapter, label, h, w, frames, guidance, n, N)
    cases = [
        (t2i, "tiny-t2i", *SMALL_T2I, 5.0, 2, 42),
        (t2i, "tiny-t2i", *SMALL_T2I, 1.0, 2, 42),
        (t2i, "tiny-t2i", *LARGE_T2I, 5.0, 2, 17),
        (t2v, "tiny-t2v", *SMALL_T2V, 5.0, 2, 42),
        (t2v, "tiny-t2v", *SMALL_T2V, 1.0, 2, 42),
        (t2v, "tiny-t2v", *LARGE_T2V, 5.0, 2, 17),
        (t2v, "tiny-t2v", *LARGE_T2V, 1.0, 2, 17),
    ]
    for adapter, label, h, w, f, g, n, N in cases:
        overhead(adapter, label, h, w, f, g, n, N, reps)

    print("\n2. batch scaling: one adapter.step(states) call, states at different step "
          "positions, CFG on;")
    print("   x/req = (t_b / b) / t_1")
    for adapter, label, shape in ((t2i, "tiny-t2i", SMALL_T2I), (t2i, "tiny-t2i", LARGE_T2I),
                                  (t2v, "tiny-t2v", SMALL_T2V), (t2v, "tiny-t2v", LARGE_T2V)):
        batch_scaling(adapter, label, *shape, reps * 2)

    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
