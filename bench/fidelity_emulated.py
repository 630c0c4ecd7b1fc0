"""Fidelity at scale (issue 14), run by hand: the same trace, the same H200 profile, through the
simulator (virtual clock) and through the real engine driving emulated GPUs (worker processes
that take their times from the profile, states and outputs of real sizes), time-scaled.

Per setting (8 GPUs on one node, 64 GPUs over 8 nodes) and policy it prints SLO attainment sim vs
engine (goal: within 2 points), the median per-request latency error (goal: <= 3%), the engine's
overhead per quantum (held minus predicted) as a share of the mean step time, and the driver's
CPU share.  Then, at 64 GPUs with a backlog of several hundred requests, the engine's whole
decision time (state, policy, validation, dispatch) p50 / p99 (goal p99 < 5 ms), with the cores
shared by everything and with the driver on a core of its own (`--policies ''`: the backlog
only).  Last, the
highest rate of image requests the HTTP server + engine sustain before their latency grows
(`genserve serve --emulate`, cheap images at a high time scale, open loop).

    python bench/fidelity_emulated.py [--time-scale S] [--duration 900] [--seeds 3] [--skip-http]

All times in the report are trace seconds unless marked wall.  Machines are noisy: compare
within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genserve.emulate import Emulation  # noqa: E402
from genserve.emulate.calibrate import DispatchCost, dispatch_cost  # noqa: E402
from genserve.engine import Engine  # noqa: E402
from genserve.latency import LatencyModel  # noqa: E402
from genserve.metrics import summarize  # noqa: E402
from genserve.parallel.protocol import OutputFormat  # noqa: E402
from genserve.parallel.workers import WorkerPool  # noqa: E402
from genserve.policies import Cluster, make_policy  # noqa: E402
from genserve.sim import SimConfig, Simulator  # noqa: E402
from genserve.workload import WorkloadConfig, generate  # noqa: E402

MODELS = ("sd3-medium", "flux-dev", "wan2.1-1.3b", "wan2.1-14b")


def memory_mb(pids: list[int]) -> float:
    """Proportional set size of these processes (Linux), in MB."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    return total / 1024


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def compare(name: str, lat: LatencyModel, pool: WorkerPool, wl: WorkloadConfig, gpus: int,
            per_node: int, scale: float, ck: int) -> tuple[float, float, float]:
    """Prints one trace's figures; returns (sim SLO, engine SLO, median latency error)."""
    sim_reqs = generate(wl, lat, gpus)
    sim = Simulator(Cluster(gpus, per_node), lat, make_policy(name),
                    SimConfig(drain=True)).run(sim_reqs)
    eng_reqs = generate(wl, lat, gpus)
    engine = Engine(make_policy(name), pool, lat, per_node, time_scale=scale,
                    output=OutputFormat(), checkpoint_every=ck)
    w0, c0 = time.monotonic(), time.process_time()
    res = engine.run(eng_reqs)
    wall, cpu = time.monotonic() - w0, time.process_time() - c0
    ms, me = summarize(sim), summarize(res)
    pairs = [(s.latency, r.latency) for s, r in zip(sim_reqs, eng_reqs)
             if s.latency is not None and r.latency is not None]
    errs = [abs(r - s) / s for s, r in pairs]
    signed = statistics.median((r - s) / s for s, r in pairs)
    over = [ran - cost for cost, ran, _ in res.quanta_log]
    step = sum(c for c, _, _ in res.quanta_log) / sum(k for _, _, k in res.quanta_log)
    print(f"  {name:9s} SLO sim {ms['slo_attainment']:.3f} engine {me['slo_attainment']:.3f} "
          f"({100 * (me['slo_attainment'] - ms['slo_attainment']):+.1f} points; image "
          f"{ms['image']['slo_attainment']:.3f}/{me['image']['slo_attainment']:.3f}, video "
          f"{ms['video']['slo_attainment']:.3f}/{me['video']['slo_attainment']:.3f})")
    print(f"            median latency error {100 * statistics.median(errs):.1f}% (signed "
          f"{100 * signed:+.1f}%) over {len(errs)} requests; quanta {len(over)}: overhead "
          f"mean {1e3 * statistics.mean(over):.0f} ms p99 {1e3 * pct(over, .99):.0f} ms = "
          f"{100 * statistics.mean(over) / step:.1f}% of the mean step ({1e3 * step:.0f} ms)")
    print(f"            preemptions sim {sim.preemptions} engine {res.preemptions}; decisions "
          f"p50 {1e3 * statistics.median(res.decide_wall_s):.2f} ms p99 "
          f"{1e3 * pct(res.decide_wall_s, .99):.2f} ms wall (the policy's call alone p99 "
          f"{1e3 * pct(res.decision_wall_s, .99):.2f} ms); driver CPU {100 * cpu / wall:.0f}% "
          f"of one core over {wall:.0f} s wall")
    return ms["slo_attainment"], me["slo_attainment"], statistics.median(errs)


def backlog(pool: WorkerPool, lat: LatencyModel, gpus: int, per_node: int, scale: float,
            n: int, seed: int) -> None:
    """Decision time with hundreds of requests in the system: `n` requests arrive within 20 s
    on `gpus` GPUs; only the decisions taken with >= 400 known requests are counted.  Twice:
    with the driver's thread on a core of its own and the workers on the others, as on a GPU
    node, where workers wait on their GPUs and the driver does not compete with dozens of
    processes for two cores; then with every core shared by all."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:
        _pinned(pool, lat, gpus, per_node, scale, n, seed, cores)
        time.sleep(10.0)  # the halted run's jobs end (their results are ignored)
    _backlog(pool, lat, gpus, per_node, scale, n, seed, "cores shared")


def _pinned(pool: WorkerPool, lat: LatencyModel, gpus: int, per_node: int, scale: float,
            n: int, seed: int, cores: list[int]) -> None:
    # Every thread of every worker (an affinity is a thread's: the workers' encoder, control and
    # transfer threads started before this would stay on every core).
    tids = [int(t) for p in pool.procs for t in os.listdir(f"/proc/{p.pid}/task")]
    before = {tid: os.sched_getaffinity(tid) for tid in tids}
    os.sched_setaffinity(0, {cores[0]})  # this (the engine's) thread
    for tid in tids:
        os.sched_setaffinity(tid, set(cores[1:]))
    try:
        _backlog(pool, lat, gpus, per_node, scale, n, seed,
                 f"driver alone on core {cores[0]}, workers on {len(cores) - 1}")
    finally:
        os.sched_setaffinity(0, set(cores))
        for tid, mask in before.items():
            try:
                os.sched_setaffinity(tid, mask)
            except ProcessLookupError:
                pass


def _backlog(pool: WorkerPool, lat: LatencyModel, gpus: int, per_node: int, scale: float,
             n: int, seed: int, how: str) -> None:
    wl = WorkloadConfig(rate=n / 20.0, duration=20.0, video_share=0.2, slo_scale=2.0, seed=seed)
    reqs = generate(wl, lat, gpus)
    engine = Engine(make_policy("genserve"), pool, lat, per_node, time_scale=scale,
                    output=OutputFormat(), checkpoint_every=4)
    w0, c0 = time.monotonic(), time.process_time()
    horizon = 240.0  # trace seconds: long enough for the backlog to build and drain partly
    import threading
    threading.Timer(horizon / scale, engine.halt).start()
    res = engine.run(reqs)
    wall, cpu = time.monotonic() - w0, time.process_time() - c0
    loaded = [w for w, k in zip(res.decide_wall_s, res.decide_load) if k >= 400]
    print(f"  backlog ({how}): {len(reqs)} requests in 20 s on {gpus} GPUs, {res.decisions} "
          f"decisions, most known at once {max(res.decide_load)}")
    if loaded:
        print(f"  decisions with >= 400 requests known: {len(loaded)}, whole decision p50 "
              f"{1e3 * statistics.median(loaded):.2f} ms p99 {1e3 * pct(loaded, .99):.2f} ms "
              f"max {1e3 * max(loaded):.2f} ms wall (policy call alone p99 "
              f"{1e3 * pct(res.decision_wall_s, .99):.2f} ms over all decisions)")
    print(f"  driver CPU {100 * cpu / wall:.0f}% of one core over {wall:.0f} s wall")


# ----- the HTTP server's sustained image rate -----
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _open_loop(base: str, rate: float, seconds: float) -> tuple[list[float], int, int]:
    import httpx

    lat: list[float] = []
    bad = 0
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
        async def one(i: int) -> None:
            nonlocal bad
            t = time.monotonic()
            r = await c.post("/v1/images/generations",
                             json={"model": "sd3-medium", "prompt": f"p{i}", "size": "512x512",
                                   "steps": 4, "seed": i})
            if r.status_code == 200:
                lat.append(time.monotonic() - t)
            else:
                bad += 1

        t0, tasks = time.monotonic(), []
        n = int(rate * seconds)
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return lat, n, bad


def http_rate(scale: float, gpus: int, rates: list[float], seconds: float) -> None:
    port = _port()
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.Popen(
            [sys.executable, "-m", "genserve.cli", "serve", "--emulate", "--gpus", str(gpus),
             "--time-scale", str(scale), "--port", str(port), "--results-dir", d,
             "--max-waiting-images", "100000", "--checkpoint-steps", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            import httpx
            base = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if httpx.get(base + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            lat = LatencyModel("h200")
            from genserve.request import Kind, Request
            from genserve.spec import GenSpec
            alone = lat.standalone(Request("x", Kind.IMAGE, GenSpec("sd3-medium", 512, 512,
                                                                     steps=4)), 1) / scale
            print(f"  {gpus} emulated GPUs at time scale {scale:g}: sd3-medium 512x512 4 steps, "
                  f"{1e3 * alone:.1f} ms wall alone; GPU capacity {gpus / alone:.0f} images/s")
            base_p50 = None
            for rate in rates:
                got, n, bad = asyncio.run(_open_loop(base, rate, seconds))
                p50, p99 = statistics.median(got), pct(got, .99)
                base_p50 = base_p50 or p50
                print(f"  {rate:6.0f} images/s offered: {len(got)}/{n} answered ({bad} errors), "
                      f"latency p50 {1e3 * p50:.0f} ms p99 {1e3 * p99:.0f} ms wall "
                      f"({p50 / base_p50:.1f}x the lowest rate's p50)")
                if p50 > 3 * base_p50 or bad:
                    break
        finally:
            proc.terminate()
            proc.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-scale", type=float, default=None,
                    help="default: 5 at 8 GPUs, 2 at more.  This machine's own work (the "
                         "engine, 64 worker processes' messages, encodes and checkpoint files on "
                         "2 cores) is not scaled: at 64 GPUs and scale 5 it made quanta late "
                         "(engine - sim -6.2 points; -0.6 at scale 2)")
    ap.add_argument("--duration", type=float, default=900.0, help="trace seconds of arrivals")
    ap.add_argument("--rate", type=float, default=0.1, help="requests/s per 8 GPUs")
    ap.add_argument("--video-share", type=float, default=0.2)
    ap.add_argument("--slo-scale", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=1,
                    help="traces per policy (seeds SEED, SEED+1, ...); with more than one, the "
                         "mean is printed too (the evaluation protocol's 3 where a claim "
                         "depends on a few points)")
    ap.add_argument("--policies", default="genserve,fcfs")
    ap.add_argument("--checkpoint-every", type=int, default=4)
    ap.add_argument("--settings", default="8,64", help="GPU counts (8 per node)")
    ap.add_argument("--backlog", type=int, default=1000, help="requests for the decision test at 64 GPUs (0: none)")
    ap.add_argument("--dispatch-ms", default="auto",
                    help="the engine's cost per quantum in trace ms, for the simulator and the "
                         "policy (LatencyModel.dispatch_time; the shipped profile has 0); "
                         "'auto': measured on the emulated GPUs first (emulate/calibrate.py), "
                         "as `serve --emulate` does")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--http-rates", default="25,50,100,200,400,800")
    a = ap.parse_args()
    for gpus in (int(x) for x in a.settings.split(",")):
        nodes = max(1, gpus // 8)
        scale = a.time_scale or (5.0 if gpus <= 8 else 2.0)
        t0 = time.monotonic()
        with WorkerPool(MODELS, gpus, emulate=Emulation("h200", scale, 8)) as pool:
            print(f"{gpus} emulated H200s over {nodes} node(s), up in "
                  f"{time.monotonic() - t0:.0f} s; time scale {scale:g}, checkpoint "
                  f"every {a.checkpoint_every} steps")
            time.sleep(2.0)  # the encoders' warm-up (see emulate/worker.py)
            per = (dispatch_cost(pool, LatencyModel("h200"), scale, 8,
                                 a.checkpoint_every) if a.dispatch_ms == "auto"
                   else DispatchCost(float(a.dispatch_ms) / 1e3, 0.0))
            lat = LatencyModel("h200", costs=per.estimates())
            print(f"  the simulator and the policies plan with a cost per quantum of "
                  f"{per.describe(scale)} ({a.dispatch_ms})")
            print(f"  workers' memory: {memory_mb([p.pid for p in pool.procs]):.0f} MB "
                  f"(proportional set size, shared pages split), driver "
                  f"{memory_mb([os.getpid()]):.0f} MB")
            for name in filter(None, a.policies.split(",")):  # "": the backlog only
                got = []
                for seed in range(a.seed, a.seed + a.seeds):
                    wl = WorkloadConfig(rate=a.rate * gpus / 8, duration=a.duration,
                                        video_share=a.video_share, slo_scale=a.slo_scale,
                                        seed=seed)
                    print(f"  trace (seed {seed}): {len(generate(wl, lat, gpus))} requests over "
                          f"{a.duration:g} s, rate {wl.rate:g}/s, video share {a.video_share}, "
                          f"SLO x{a.slo_scale}")
                    got.append(compare(name, lat, pool, wl, gpus, 8, scale, a.checkpoint_every))
                if len(got) > 1:
                    sim, eng, err = (statistics.mean(x) for x in zip(*got))
                    print(f"  {name:9s} mean of {len(got)} seeds: SLO sim {sim:.3f} engine "
                          f"{eng:.3f} ({100 * (eng - sim):+.1f} points), median latency error "
                          f"{100 * err:.1f}%")
            if gpus >= 64 and a.backlog > 0:  # 0: no backlog test
                backlog(pool, lat, gpus, 8, scale, a.backlog, a.seed)
    if not a.skip_http:
        time.sleep(10.0)  # the emulated pools' processes and files go first (2 cores)
        print("HTTP server + engine, sustained image rate (open loop, 10 s per rate):")
        http_rate(100.0, 8, [float(x) for x in a.http_rates.split(",")], 10.0)
    print(f"driver process: pid {os.getpid()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
