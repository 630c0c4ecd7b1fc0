"""Run a function on `world` spawned processes joined by a file rendezvous; collect their results.

`target(rank, world, init_method, *args, out_queue)` must put `(rank, result)` on the queue.
"""

from __future__ import annotations

import multiprocessing as mp
import os


def run_world(target, world: int, tmp_path, *args, timeout_s: float = 300.0) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = f"file://{os.path.join(tmp_path, 'rdzv')}"
    procs = [ctx.Process(target=target, args=(r, world, init, *args, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=timeout_s) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return res
