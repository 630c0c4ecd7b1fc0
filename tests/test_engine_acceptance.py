"""Acceptance of the real engine: with 4 CPU workers and the tiny presets, a mixed trace of ~100
requests under the `genserve` policy: every request ends finished, and each output equals that of
running the request alone (exactness survives preemption, batching and SP changes).

The latency profile is measured inside worker 0 of the pool.  CPU runs profile SP 1 only, so
tiny-t2v gets synthetic SP-2 rows claiming a 2x speed-up: the policy then widens late videos to
2-GPU groups and narrows them again (on CPU an SP-2 step is in fact slower, which only makes the
videos later; the outputs must not change).
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from genserve.engine import Engine  # noqa: E402
from genserve.latency import LatencyModel  # noqa: E402
from genserve.models import GenRequest, load_preset  # noqa: E402
from genserve.parallel.workers import WorkerPool  # noqa: E402
from genserve.policies import make_policy  # noqa: E402
from genserve.profiler import profile_workers, write_profile  # noqa: E402
from genserve.request import Kind, Status  # noqa: E402
from genserve.workload import WorkloadConfig, generate  # noqa: E402

PRESETS = ("tiny-t2i", "tiny-t2v")
MIX = "tiny-t2i@64x64=4,tiny-t2v@32x32x9=1"
WORKERS = 4


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(PRESETS, WORKERS) as p:
        yield p


@pytest.fixture(scope="module")
def latency(pool, tmp_path_factory):
    fwd, blk, meta = profile_workers(list(PRESETS), batches=(2, 4, 8), reps=3, pool=pool)
    blk = blk + [{**r, "sp": 2, "step_ms": r["step_ms"] / 2, "block_ms": r["block_ms"] / 2}
                 for r in blk if r["model"] == "tiny-t2v"]
    out = tmp_path_factory.mktemp("accept-prof")
    write_profile(out, "local", fwd, blk, meta)
    lat = LatencyModel(out)
    assert lat.degrees("tiny-t2v") == (1, 2)
    return lat


def test_mixed_trace_of_100_requests_finishes_with_outputs_equal_to_running_alone(pool, latency):
    # Seed 3 gives 99 requests (83 images, 16 videos) over 10 s; SLO scale 2 keeps the 4 workers
    # busy enough that videos get paused for images (7-14 preemptions in every trial run).
    reqs = generate(WorkloadConfig(rate=10, duration=10, mix=MIX, slo_scale=2, seed=3),
                    latency, WORKERS)
    assert 90 <= len(reqs) <= 110
    assert {r.kind for r in reqs} == {Kind.IMAGE, Kind.VIDEO}
    t0 = time.monotonic()
    res = Engine(make_policy("genserve"), pool, latency).run(reqs)
    wall = time.monotonic() - t0

    for r in reqs:
        states = [s for _, s in r.history]
        assert states[0] is Status.WAITING and states[-1] is Status.FINISHED, (r.id, states)
        assert sum(s.is_final for s in states) == 1, (r.id, states)
        assert r.steps_done == r.steps
    assert set(res.outputs) == {r.id for r in reqs}

    # What the run exercised.  A batched job shows up as one (start, end, GPUs) quantum shared by
    # several requests.
    jobs = Counter(q for tl in res.timeline.values() for q in tl)
    batched = sum(n > 1 for n in jobs.values())
    sp_jobs = sum(len(q[2]) > 1 for q in jobs)
    sp_changed = sum(len({len(q[2]) for q in res.timeline[r.id]}) > 1 for r in reqs)
    paused = sum(Status.PREEMPTED in [s for _, s in r.history] for r in reqs)
    print(f"\n{len(reqs)} requests in {wall:.1f} s: {res.preemptions} preemptions "
          f"({paused} requests paused), {res.migrations} migrations "
          f"({res.moves_bytes} bytes moved), {batched} batched jobs, {sp_jobs} SP-2 jobs, "
          f"{sp_changed} requests changed SP degree, {res.decisions} decisions")
    assert res.preemptions > 0 and paused > 0

    # Exactness: each output equals the request run alone (one adapter per preset, reused).
    torch.set_num_threads(1)
    adapters = {m: load_preset(m) for m in PRESETS}
    worst = 0
    for r in reqs:
        ref = adapters[r.model].generate(GenRequest(r.id, r.spec))
        got = res.outputs[r.id]
        assert got.shape == ref.shape, r.id
        diff = int(np.abs(got.astype(int) - ref.astype(int)).max())
        assert diff <= 1, (r.id, diff, [s.value for _, s in r.history])
        worst = max(worst, diff)
    print(f"largest pixel difference to running alone: {worst}")
