"""`genserve demo` (what `make demo` runs): the server with the tiny presets on CPU workers, a short
mixed image/video load over HTTP, SLO attainment per kind, and where sample outputs went
(`run_demo`); then one mixed trace on an emulated 8-GPU H200 node through the real engine, genserve
against the best baseline, SLO attainment per model next to the simulator's (`run_emulated_demo`).

Everything in the first part goes through the public API on loopback, as a client would: images
are blocking `POST /v1/images/generations` calls, videos are `POST /v1/videos` jobs polled to the
end.
"""

from __future__ import annotations

import base64
import random
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slo_counts(metrics_text: str) -> dict[tuple[str, str], float]:
    out = {}
    for m in re.finditer(r'genserve_slo_total\{model="([^"]+)",outcome="(\w+)"\} ([0-9.e+]+)',
                         metrics_text):
        out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def run_demo(out_dir: str = "demo-output", workers: int = 2, images: int = 24, videos: int = 6,
             duration_s: float = 12.0, seed: int = 0) -> int:
    import httpx
    import uvicorn

    from .app import create_app
    from .config import ServeConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ServeConfig(workers=workers, results_dir=str(out / "results"), port=_free_port())
    app = create_app(cfg)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    t0 = time.time()
    thread.start()
    base = f"http://{cfg.host}:{cfg.port}"
    with httpx.Client(base_url=base, timeout=120) as c:
        while True:
            try:
                if c.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if not thread.is_alive() or time.time() - t0 > 300:
                print("the server did not start")
                return 1
            time.sleep(0.2)
        print(f"server up on {base} with {workers} CPU workers (tiny-t2i, tiny-t2v) in "
              f"{time.time() - t0:.1f} s; sending {images} image and {videos} video requests "
              f"over {duration_s:.0f} s")
        rng = random.Random(seed)
        plan = sorted([(rng.uniform(0, duration_s), "image", i) for i in range(images)]
                      + [(rng.uniform(0, duration_s), "video", i) for i in range(videos)])
        answers: dict[str, list] = {"image": [], "video": []}
        samples: dict[str, str] = {}

        def image(i: int):
            r = c.post("/v1/images/generations",
                       json={"prompt": f"a fox number {i}", "size": "64x64", "seed": i})
            if r.status_code == 200 and "image" not in samples:
                path = out / "sample-image.png"
                path.write_bytes(base64.b64decode(r.json()["data"][0]["b64_json"]))
                samples["image"] = str(path)
            return r.status_code

        def video(i: int):
            r = c.post("/v1/videos", json={"prompt": f"a running fox {i}", "seconds": "2",
                                           "size": "128x128", "seed": i, "steps": 30})
            if r.status_code != 200:
                return r.status_code
            vid = r.json()["id"]
            while (v := c.get(f"/v1/videos/{vid}").json())["status"] not in ("completed",
                                                                             "failed"):
                time.sleep(0.1)
            if v["status"] == "completed" and "video" not in samples:
                path = out / "sample-video.mp4"
                path.write_bytes(c.get(f"/v1/videos/{vid}/content").content)
                samples["video"] = str(path)
            return v["status"]

        start = time.time()
        with ThreadPoolExecutor(32) as ex:
            futs = []
            for at, kind, i in plan:
                time.sleep(max(0.0, start + at - time.time()))
                futs.append((kind, ex.submit(image if kind == "image" else video, i)))
            for kind, f in futs:
                answers[kind].append(f.result())
        text = c.get("/metrics").text
        slo = _slo_counts(text)
        pre = re.search(r"^genserve_preemptions_total ([0-9.e+]+)", text, re.M)
    server.should_exit = True
    thread.join(timeout=30)
    print(f"all answered in {time.time() - start:.1f} s; videos paused for images "
          f"{int(float(pre.group(1))) if pre else 0} times")
    for kind, model in (("image", "tiny-t2i"), ("video", "tiny-t2v")):
        met, missed = slo.get((model, "met"), 0), slo.get((model, "missed"), 0)
        done = met + missed
        share = f"{met / done:.2f}" if done else "-"
        print(f"  {kind:5s}: {len(answers[kind])} sent, {int(done)} finished, SLO attainment "
              f"{share} ({int(met)} met, {int(missed)} missed); answers "
              f"{dict(sorted(_count(answers[kind]).items()))}")
    for kind, path in sorted(samples.items()):
        print(f"  sample {kind}: {path}")
    print(f"  all results: {out / 'results'}")
    return 0


def _count(xs) -> dict:
    out: dict = {}
    for x in xs:
        out[str(x)] = out.get(str(x), 0) + 1
    return out


# ----------------------------------------------------------------------------- the emulated part
# `genserve demo` also runs one mixed trace on an emulated 8-GPU H200 node (`genserve.emulate`:
# worker processes that take each job's time from the shipped H200 latency profile, divided by
# the time scale) through the real engine, for genserve and for the best baseline, and prints SLO
# attainment per model side by side, with the simulator's figure for each.

# The four served models at sizes whose requests take seconds to a minute and a half on the node
# (no 720p Wan 14B: a few of those alone would fill the trace); three requests in four are
# images.
DEMO_MIX = ("sd3-medium@512x512=1,sd3-medium@768x768=1,sd3-medium@1024x1024=1,"
            "flux-dev@1024x1024=3,"
            "wan2.1-1.3b@832x480x33=0.5,wan2.1-1.3b@832x480x81=0.5,"
            "wan2.1-14b@832x480x33=0.5,wan2.1-14b@832x480x81=0.5")
DEMO_MODELS = ("sd3-medium", "flux-dev", "wan2.1-1.3b", "wan2.1-14b")
# A load where the node is oversubscribed in bursts (gamma arrivals, CV 2): queues build up, and
# who goes first decides who meets their deadline (2x their standalone latency).
DEMO_RATE, DEMO_DURATION, DEMO_SLO_SCALE = 0.6, 100.0, 2.0
DEMO_GPUS, DEMO_PROFILE = 8, "h200"
# About 15 s of wall time per policy on two cores.  Every wall millisecond the driver and the
# workers spend between jobs is S trace milliseconds: lower scales sit closer to the simulator.
DEMO_TIME_SCALE = 15.0


def _by_model(reqs) -> dict[str, tuple[int, int]]:
    """{model: (met, count)}, with "overall"; met as `metrics` counts it (`met_deadline`)."""
    out: dict[str, list[int]] = {}
    for r in reqs:
        for key in (r.model, "overall"):
            c = out.setdefault(key, [0, 0])
            c[0] += r.met_deadline
            c[1] += 1
    return {k: (met, n) for k, (met, n) in out.items()}


def _share(c: tuple[int, int] | None) -> str:
    return f"{100 * c[0] / c[1]:5.1f}%" if c and c[1] else "    -"


def run_emulated_demo(time_scale: float = DEMO_TIME_SCALE, seed: int = 0,
                      rate: float = DEMO_RATE, duration: float = DEMO_DURATION,
                      out=None) -> int:
    """One trace on `DEMO_GPUS` emulated H200s: genserve vs the best baseline (picked by
    simulating every baseline on the trace), per model, emulated and simulated."""
    import sys

    from ..emulate import Emulation
    from ..parallel.workers import WorkerError, WorkerLost, WorkerPool

    out = out if out is not None else sys.stdout

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    if not time_scale > 0:
        raise ValueError(f"time scale {time_scale}: must be > 0")
    t0 = time.monotonic()
    try:  # the GPUs first: the latency model takes the engine's cost per quantum measured on them
        pool = WorkerPool(DEMO_MODELS, DEMO_GPUS,
                          emulate=Emulation(DEMO_PROFILE, time_scale, DEMO_GPUS))
    except (WorkerError, WorkerLost) as e:
        raise ValueError(str(e)) from None
    with pool:
        return _emulated(pool, t0, time_scale, seed, rate, duration, say)


def _emulated(pool, t0: float, time_scale: float, seed: int, rate: float, duration: float,
              say) -> int:
    from ..emulate.calibrate import dispatch_cost
    from ..engine import Engine
    from ..experiment import DEFAULT_POLICIES
    from ..latency import LatencyModel
    from ..parallel.protocol import OutputFormat
    from ..parallel.workers import WorkerError, WorkerLost
    from ..policies import Cluster, make_policy
    from ..sim import SimConfig, Simulator
    from ..workload import WorkloadConfig, generate

    started = time.monotonic() - t0
    try:
        per_quantum = dispatch_cost(pool, LatencyModel(DEMO_PROFILE), time_scale, DEMO_GPUS)
    except (WorkerError, WorkerLost) as e:
        raise ValueError(str(e)) from None
    # The policies and the simulator plan with it, as with a profile measured on real workers.
    latency = LatencyModel(DEMO_PROFILE, costs=per_quantum.estimates())
    say(f"\n{DEMO_GPUS} emulated H200 GPUs up in {started:.1f} s; the engine's own cost per "
        f"quantum measured on them: {per_quantum.describe(time_scale)} (the policies and the "
        f"simulator plan with it)")
    cfg = WorkloadConfig(rate=rate, duration=duration, mix=DEMO_MIX, slo_scale=DEMO_SLO_SCALE,
                         seed=seed)

    def trace():  # fresh requests for every run (runs change them); the same every time
        return generate(cfg, latency, DEMO_GPUS)

    reqs = trace()
    if not reqs:
        raise ValueError(f"rate {rate}/s over {duration:g} s gives no requests")
    horizon = max(r.deadline for r in reqs)
    kinds = {k: sum(r.kind.value == k for r in reqs) for k in ("image", "video")}
    say(f"emulated run: {DEMO_GPUS} emulated H200 GPUs (one node); {len(reqs)} requests "
        f"({kinds['image']} images, {kinds['video']} videos of {', '.join(DEMO_MODELS)}) "
        f"over {duration:g} s, bursty arrivals; deadline = arrival + {DEMO_SLO_SCALE:g}x the "
        f"request's standalone latency")

    # The best baseline, chosen on the simulator (milliseconds a policy) on this very trace.
    simulated: dict[str, dict] = {}
    sim_met: dict[str, set[str]] = {}
    baselines = [p for p in DEFAULT_POLICIES if not p.startswith("genserve")]
    for name in [*baselines, "genserve"]:
        run = trace()
        Simulator(Cluster(DEMO_GPUS, DEMO_GPUS), latency, make_policy(name),
                  SimConfig()).run(run)
        simulated[name] = _by_model(run)
        sim_met[name] = {r.id for r in run if r.met_deadline}
    best = max(baselines, key=lambda p: simulated[p]["overall"][0])  # ties: the first listed
    say(f"best baseline by simulation on this trace: {best} (simulated SLO attainment: "
        + ", ".join(f"{p} {_share(simulated[p]['overall']).strip()}" for p in baselines) + ")")

    # Both through the real engine, on one pool of emulated GPUs.  genserve goes last: it ends
    # at the last deadline (`_halt_at`), when attainment can no longer change, rather than after
    # finishing requests it gave up on; the pool closes right after.
    emulated: dict[str, dict] = {}
    walls: dict[str, float] = {}
    # Per policy: quanta, their mean overrun (trace s), requests met in simulation but not
    # here, and how many of those finished less than 1 s late.
    slips: dict[str, tuple[int, float, int, int]] = {}
    say(f"replaying the trace at {time_scale:g}x speed for {best}, then genserve "
        f"(~{horizon / time_scale:.0f} s each)")
    for name, last in ((best, False), ("genserve", True)):
        run = trace()
        engine = Engine(make_policy(name), pool, latency, gpus_per_node=DEMO_GPUS,
                        time_scale=time_scale, output=OutputFormat())
        stop = threading.Event()
        if last:
            threading.Thread(target=_halt_at, args=(engine, horizon + 1.0, stop),
                             daemon=True, name="demo-horizon").start()
        t2 = time.monotonic()
        try:
            engine.run(run)
        except (WorkerError, WorkerLost) as e:
            raise ValueError(str(e)) from None
        finally:
            stop.set()
        walls[name] = time.monotonic() - t2
        emulated[name] = _by_model(run)
        res = engine.res
        over = [held - predicted for predicted, held, _ in res.quanta_log]
        lost = [r for r in run if r.id in sim_met[name] and not r.met_deadline]
        slips[name] = (len(over), sum(over) / len(over) if over else 0.0, len(lost),
                       sum(r.finish_time is not None and r.finish_time <= r.deadline + 1.0
                           for r in lost))
    total = time.monotonic() - t0

    head = (f"{'model':13s} {'requests':>8s}   {'genserve':>8s} {'(sim)':>8s}   "
            f"{best:>10s} {'(sim)':>8s}")
    say()
    say("SLO attainment on the emulated GPUs (the simulator's on the same trace in parentheses):")
    say(head)
    say("-" * len(head))
    for model in (*DEMO_MODELS, "overall"):
        n = simulated["genserve"].get(model, (0, 0))[1]
        say(f"{model:13s} {n:8d}   {_share(emulated['genserve'].get(model)):>8s} "
            f"{'(' + _share(simulated['genserve'].get(model)).strip() + ')':>8s}   "
            f"{_share(emulated[best].get(model)):>10s} "
            f"{'(' + _share(simulated[best].get(model)).strip() + ')':>8s}")
    say("\nwhat the engine spends around a job (GPUs held minus predicted, per quantum) counts "
        "as trace time too (x the time scale): a request planned to end just before its "
        "deadline can miss it by that")
    for name in (best, "genserve"):
        n, mean, lost, close = slips[name]
        say(f"  {name:10s}: {n} quanta, {mean:.2f} trace s ({1000 * mean / time_scale:.0f} ms "
            f"wall) more than predicted on average; met in simulation but missed here: {lost}"
            + (f" ({close} of them by under 1 s)" if lost else ""))
    say(f"\nemulated part: {total:.1f} s wall (GPUs up {started:.1f} s, {best} "
        f"{walls[best]:.1f} s, genserve {walls['genserve']:.1f} s, at time scale "
        f"{time_scale:g})")
    say(f"Emulated GPUs take their timings from the shipped {DEMO_PROFILE.upper()} latency "
        f"profile (divided by the time scale); their outputs are placeholders.  A lower "
        f"--time-scale runs slower and closer to the simulator.")
    return 0


def _halt_at(engine, t: float, stop: threading.Event) -> None:
    """Halt `engine` once its clock reads `t` (unless `stop` is set first)."""
    while not stop.wait(0.02):
        if engine.now() >= t:
            engine.halt()
            return
