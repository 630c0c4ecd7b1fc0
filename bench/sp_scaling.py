"""Sequence parallelism on CPU workers (gloo), run by hand: per-step time at degrees 1/2/4 and the
cost of moving a request to another worker set (its state travels through the driver as bytes).

On 2 CPU cores SP gives no speed-up (4 workers share 2 cores): this shows the mechanism's
overheads, not GPU scaling.  Speed is measured on GPUs (`bench/gpu_adapter_step.py`).

    python bench/sp_scaling.py [--steps 10] [--size 256x256x17]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genserve.models import GenRequest  # noqa: E402
from genserve.parallel.workers import WorkerPool  # noqa: E402
from genserve.spec import GenSpec  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", default="256x256x17", help="HxWxFRAMES for tiny-t2v")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    h, w, f = (int(x) for x in a.size.split("x"))
    with WorkerPool("tiny-t2v", 4) as pool:
        (s,) = pool.prepare([GenRequest("r",
                                        GenSpec("tiny-t2v", h, w, frames=f, steps=10_000, seed=1,
                                                prompt="a fox"))])
        state_kb = len(s.to_bytes()) / 1e3
        print(f"tiny-t2v {a.size}, state {state_kb:.0f} kB, 4 CPU workers (gloo), "
              f"{a.steps} steps per call, median of {a.reps}")
        per_step = {}
        for ranks in ((0,), (0, 1), (0, 1, 2, 3)):
            pool.steps(ranks, [s], 1)  # warm-up
            times = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                (s,) = pool.steps(ranks, [s], a.steps)
                times.append((time.perf_counter() - t0) / a.steps)
            per_step[len(ranks)] = statistics.median(times) * 1e3
        for k, ms in per_step.items():
            print(f"  degree {k}: {ms:8.2f} ms/step  ({ms / per_step[1]:.2f}x degree 1)")
        # Moving the request between worker sets: a zero-step job is exactly the state round trip
        # (driver -> workers -> driver) that every change of worker set or degree costs.
        for src, dst in (((0,), (1,)), ((0,), (2, 3)), ((2, 3), (0, 1, 2, 3)),
                         ((0, 1, 2, 3), (1,))):
            times = []
            for _ in range(a.reps):
                pool.steps(src, [s], 0)
                t0 = time.perf_counter()
                (s,) = pool.steps(dst, [s], 0)
                times.append(time.perf_counter() - t0)
            print(f"  switch {len(src)} -> {len(dst)} workers {src} -> {dst}: "
                  f"{statistics.median(times) * 1e3:7.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
