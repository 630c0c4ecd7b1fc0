"""`genserve profile`: measure the step-latency table on the hardware at hand.

Writes the two files `LatencyModel` reads, in the format of the shipped H200 profile:
`<name>_diffusers_forward.json` (one step per shape and transformer batch: the forward plus the
guidance and scheduler updates the engine runs with it, which matter on small models) and
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


def probe_image(model: str, width: int, height: int) -> str:
    """`GenSpec.image` for a timing request: a fixed image where the model requires one."""
    if get_model(model).image_input != "required":
        return ""
    from .input_image import probe

    return probe(width, height)


def size_label(width: int, height: int, frames: int) -> str:
    return f"{width}x{height}x{frames}"


def profile(presets: list[str], batches: tuple[int, ...] = (1, 2, 4), reps: int = 5,
            device: str = "cpu", model_path: str | None = None,
            adapters: dict | None = None) -> tuple[list, list, dict]:
    """Measure every preset at its catalog sizes; returns (forward rows, block rows, meta).
    `adapters` (preset -> loaded adapter) skips loading, e.g. inside a worker."""
    import torch

    from .models import GenRequest, GenSpec, load_preset
    from .models.base import StepState

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    fwd_rows, blk_rows = [], []
    meta = {"device": device if device != "cpu" else f"cpu ({platform.processor() or 'x86_64'}, "
                                                     f"{torch.get_num_threads()} threads)",
            "torch": torch.__version__, "note": "genserve profile: one adapter step (transformer "
            "forward, guidance, scheduler updates) per transformer batch, median of reps; "
            "encode/decode per request", "encode_ms": {}, "decode_ms": {}}
    for name in presets:
        spec = get_model(name)
        adapter = (adapters or {}).get(name) or load_preset(name, model_path, device)
        meta["dtype"] = str(adapter.dtype)
        params = sum(p.numel() for p in adapter.transformer.parameters())
        for (w, h, f) in spec.sizes:
            label = size_label(w, h, f)
            req = GenRequest("profile", GenSpec(name, h, w, f, steps=1000,
                                                guidance=5.0 if spec.cfg else 3.5,
                                                prompt="a photo of a fox in the snow",
                                                image=probe_image(name, w, h)))
            enc = adapter.encode([req])
            meta["encode_ms"][name] = round(_median_ms(lambda: adapter.encode([req]), reps, sync), 4)
            (state,) = adapter.prepare([req], enc)
            emb = adapter._embeds([state])  # [uncond, cond] under CFG: a transformer batch of 2
            per_request = len(next(iter(emb.values())))  # 2 under CFG
            blob = state.to_bytes()
            for b in batches:
                if b % per_request:
                    continue  # a CFG request is a transformer batch of 2: only even batches
                # The whole step the engine runs (forward, guidance, each request's scheduler
                # update), not the bare forward: on small models the rest is not negligible.
                states = [StepState.from_bytes(blob).to(device) for _ in range(b // per_request)]
                for i, st in enumerate(states):
                    st.request_id = f"profile-{i}"
                ms = _median_ms(lambda: adapter.step(states), reps, sync)
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


def profile_workers(presets: list[str], batches: tuple[int, ...] = (1, 2, 4), reps: int = 5, *,
                    pool) -> tuple[list, list, dict]:
    """`profile` run inside every worker process of `pool` (a running `PoolBase`) at once (same
    threads, same process layout and load as serving), plus the engine's fixed cost per quantum
    (`dispatch_ms`): a job that steps a resident state zero times, submitted and collected the
    way the engine does.  (This module does not start pools: a worker imports it to profile.)"""
    from .spec import GenSpec
    from .parallel.protocol import New, Profile, Resident, Run

    # Every worker profiles at once, as under load (CPU workers share cores and memory
    # bandwidth; GPU workers do not notice); the table is the median over workers.
    jobs = [pool.submit((r,), Profile(tuple(presets), tuple(batches), reps))
            for r in range(pool.n)]
    runs = [pool.wait(j) for j in jobs]
    fwd, blk, meta = runs[0]
    for i, row in enumerate(fwd):
        row["forward_ms"] = statistics.median(run[0][i]["forward_ms"] for run in runs)
    for i, row in enumerate(blk):
        row["step_ms"] = statistics.median(run[1][i]["step_ms"] for run in runs)
        row["block_ms"] = row["step_ms"] / row["layers"]
    for key in ("encode_ms", "decode_ms"):
        for k in meta[key]:
            meta[key][k] = round(statistics.median(run[2][key][k] for run in runs), 4)
    spec = get_model(presets[0])
    w, h, f = spec.sizes[0]
    rid, gen = "dispatch-probe", GenSpec(presets[0], h, w, f, steps=1000, prompt="a fox",
                                         image=probe_image(presets[0], w, h))
    pool.wait(pool.submit((0,), Run(presets[0], (New(rid, gen),), steps=1)))
    probe = Run(presets[0], (Resident(rid),), steps=0)
    times = []
    for _ in range(max(20, 4 * reps)):
        t0 = time.perf_counter()
        job = pool.submit((0,), probe)
        while job not in pool.finished(timeout_s=0.005):
            pass
        pool.result(job)
        times.append((time.perf_counter() - t0) * 1e3)
    pool.drop((0,), [rid])
    meta["dispatch_ms"] = round(statistics.median(times[2:]), 4)
    meta["workers"] = pool.n
    return fwd, blk, meta


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
