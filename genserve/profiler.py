"""`genserve profile`: measure the step-latency table on the hardware at hand.

Writes the two files `LatencyModel` reads, in the format of the shipped H200 profile:
`<name>_diffusers_forward.json` (one transformer forward per shape and transformer batch) and
`<name>_dit_blocks.json` (the same step at SP 1, so the calibration is 1 by construction; SP rows
are left to GPU runs).  Text-encode and VAE-decode times, which the shipped profile lacks, are
measured too and stored in the forward file's meta, where `LatencyModel` prefers them to its
estimates.  Tiny presets on CPU here; real presets on GPUs.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

from .catalog import get_model
from .latency import BLOCKS_SUFFIX, FORWARD_SUFFIX


def _median_ms(fn, reps: int, sync) -> float:
    fn()  # warm-up
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def size_label(width: int, height: int, frames: int) -> str:
    return f"{width}x{height}x{frames}"


def profile(presets: list[str], batches: tuple[int, ...] = (1, 2, 4), reps: int = 5,
            device: str = "cpu", model_path: str | None = None,
            adapters: dict | None = None) -> tuple[list, list, dict]:
    """Measure every preset at its catalog sizes; returns (forward rows, block rows, meta).
    `adapters` (preset -> loaded adapter) skips loading, e.g. inside a worker."""
    import torch

    from .models import GenRequest, load_preset

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    fwd_rows, blk_rows = [], []
    meta = {"device": device if device != "cpu" else f"cpu ({platform.processor() or 'x86_64'}, "
                                                     f"{torch.get_num_threads()} threads)",
            "torch": torch.__version__, "note": "genserve profile: one transformer forward, "
            "median of reps; encode/decode per request", "encode_ms": {}, "decode_ms": {}}
    for name in presets:
        spec = get_model(name)
        adapter = (adapters or {}).get(name) or load_preset(name, model_path, device)
        meta["dtype"] = str(adapter.dtype)
        params = sum(p.numel() for p in adapter.transformer.parameters())
        for (w, h, f) in spec.sizes:
            label = size_label(w, h, f)
            req = GenRequest("profile", "a photo of a fox in the snow", h, w, f, steps=1000,
                             guidance=5.0 if spec.cfg else 3.5)
            enc = adapter.encode([req])
            meta["encode_ms"][name] = round(_median_ms(lambda: adapter.encode([req]), reps, sync), 4)
            (state,) = adapter.prepare([req], enc)
            emb = adapter._embeds([state])  # [uncond, cond] under CFG: a transformer batch of 2
            t1 = adapter._live_scheduler(state).timesteps[:1]
            per_request = len(next(iter(emb.values())))  # 2 under CFG
            for b in batches:
                if b % per_request:
                    continue  # a CFG request is a transformer batch of 2: only even batches
                x = state.latents.repeat(b, *([1] * (state.latents.dim() - 1)))
                e = {k: v.repeat(b // per_request, *([1] * (v.dim() - 1))) for k, v in emb.items()}
                t = t1.repeat(b)
                with torch.no_grad():
                    ms = _median_ms(lambda: adapter._forward(x, t, e, [state] * b), reps, sync)
                fwd_rows.append({"model": name, "size": label, "batch": b, "forward_ms": ms,
                                 "params": params})
                blk_rows.append({"model": name, "kind": "t2v" if f > 1 else "t2i",
                                 "size": label, "tokens": spec.tokens(h, w, f), "batch": b,
                                 "sp": 1, "block_ms": ms / spec.layers, "layers": spec.layers,
                                 "step_ms": ms, "alltoall_bytes_per_layer_per_rank": 0})
            state.step_index = state.steps  # decode cost does not depend on the content
            meta["decode_ms"][f"{name}@{label}"] = round(
                _median_ms(lambda: adapter.decode([state]), reps, sync), 4)
    return fwd_rows, blk_rows, meta


def profile_workers(presets: list[str], batches: tuple[int, ...] = (1, 2, 4), reps: int = 5,
                    workers: int = 1, device: str = "cpu", model_path: str | None = None,
                    pool=None) -> tuple[list, list, dict]:
    """`profile` run inside a worker process of the engine's pool (same threads, same process
    layout as serving), plus the engine's fixed cost per quantum (`dispatch_ms`): a job that steps
    a resident state zero times, submitted and collected the way the engine does.  Pass `pool` to
    measure on a running pool."""
    from .models import GenRequest
    from .parallel.workers import WorkerPool

    own = pool is None
    if own:
        pool = WorkerPool(tuple(presets), workers, model_path, device)
    try:
        fwd, blk, meta = pool.wait(pool.submit("profile", (0,), (presets, batches, reps)))
        spec = get_model(presets[0])
        w, h, f = spec.sizes[0]
        req = GenRequest("dispatch-probe", "a fox", h, w, f, steps=1000)
        pool.wait(pool.submit("run", (0,), {"model": presets[0], "members": [(req.id, req)],
                                            "n": 1}))
        probe = {"model": presets[0], "members": [(req.id, None)], "n": 0}
        times = []
        for _ in range(max(20, 4 * reps)):
            t0 = time.perf_counter()
            job = pool.submit("run", (0,), probe)
            while job not in pool.finished(timeout_s=0.005):
                pass
            pool.result(job)
            times.append((time.perf_counter() - t0) * 1e3)
        pool.drop((0,), [req.id])
        meta["dispatch_ms"] = round(statistics.median(times[2:]), 4)
        meta["workers"] = pool.n
        return fwd, blk, meta
    finally:
        if own:
            pool.close()


def write_profile(out_dir: str | Path, name: str, fwd_rows: list, blk_rows: list,
                  meta: dict) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fwd = out / (name + FORWARD_SUFFIX)
    blk = out / (name + BLOCKS_SUFFIX)
    fwd.write_text(json.dumps({"meta": meta, "rows": fwd_rows}, indent=1))
    blk.write_text(json.dumps({"meta": {k: meta[k] for k in ("device", "torch", "dtype")},
                               "rows": blk_rows}, indent=1))
    return fwd, blk
