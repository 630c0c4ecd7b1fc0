"""Command line: `genserve simulate | sweep | bound | trace | replay | generate | profile | serve |
demo`.

Bad options: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .catalog import CANONICAL_MODELS, GENERATE_DEFAULTS, MODELS
from .kinds import Kind
from .model_paths import MODEL_PATH_HELP, check_model_dirs
from .experiment import (ABLATIONS, BOUND, DEFAULT_POLICIES, RunSpec, plot_sweep,
                         requests_for, run_many, sweep)
from . import timeline
from .policies import make_policy, policy_names
from .workload import ARRIVALS, WorkloadConfig, save_trace


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    return vals


def _add_workload(p: argparse.ArgumentParser, trace_ok: bool = True) -> None:
    g = p.add_argument_group("workload")
    if trace_ok:
        g.add_argument("--trace", help="replay a JSONL trace (from `genserve trace`) instead")
    g.add_argument("--rate", type=float, default=0.1, help="requests per second (default 0.1)")
    g.add_argument("--duration", type=float, default=3600.0, help="seconds of arrivals")
    g.add_argument("--arrival", choices=ARRIVALS, default="gamma")
    g.add_argument("--cv", type=float, default=2.0, help="inter-arrival CV for gamma (default 2)")
    g.add_argument("--video-share", type=float, default=0.2,
                   help="share of requests that are videos (default 0.2)")
    g.add_argument("--mix", help="MODEL@WxH[xFRAMES]=WEIGHT,... (overrides --video-share)")
    g.add_argument("--slo-scale", type=float, default=2.0,
                   help="deadline = arrival + scale x standalone latency (default 2)")
    g.add_argument("--seed", type=int, default=0)
    c = p.add_argument_group("cluster")
    c.add_argument("--gpus", type=int, default=8)
    c.add_argument("--gpus-per-node", type=int, default=8)
    c.add_argument("--profile", default="h200",
                   help="profile name shipped with genserve, or a directory of profile files")
    c.add_argument("--intra-bw", type=float, default=450.0, help="GB/s inside a node")
    c.add_argument("--cross-bw", type=float, default=50.0, help="GB/s across nodes")


def _spec(a: argparse.Namespace) -> RunSpec:
    wl = WorkloadConfig(rate=a.rate, duration=a.duration, arrival=a.arrival, cv=a.cv,
                        video_share=a.video_share, mix=a.mix, slo_scale=a.slo_scale, seed=a.seed)
    spec = RunSpec(workload=wl, gpus=a.gpus, gpus_per_node=a.gpus_per_node, profile=a.profile,
                   intra_bw=a.intra_bw * 1e9, cross_bw=a.cross_bw * 1e9,
                   trace=getattr(a, "trace", None), horizon=getattr(a, "horizon", None),
                   drain=getattr(a, "drain", False),
                   profile_error=getattr(a, "profile_error", None),
                   feedback=getattr(a, "feedback", False))
    spec.validate()
    return spec


def split_policies(text: str) -> list[str]:
    """`a,b:x=1,y=2,c` -> [a, b:x=1,y=2, c]: a bare key=value continues the policy before it."""
    names: list[str] = []
    for part in (p.strip() for p in text.replace(";", ",").split(",")):
        if not part:
            continue
        if "=" in part and ":" not in part and names:
            names[-1] += ("," if not names[-1].endswith(":") else "") + part
        else:
            names.append(part)
    return names


def _policies(text: str) -> list[str]:
    names = split_policies(text)
    if not names:
        raise ValueError("--policy is empty")
    for n in names:
        make_policy(n)  # validates name and parameters
    return names


def _fmt(v, pct=False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:5.1f}%" if pct else f"{v:.2f}"


def print_table(results: dict[str, dict], out=None) -> None:
    out = out if out is not None else sys.stdout  # resolved per call, so redirection works
    head = (f"{'policy':34s} {'SLO':>6s} {'image':>6s} {'video':>6s} {'goodput':>8s} "
            f"{'p50':>6s} {'p99':>7s} {'busy':>6s} {'preempt':>7s}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for name, m in results.items():
        label = name if m.get("param", name) == name else f"{name} [{m['param']}]"
        print(f"{label[:34]:34s} {_fmt(m['slo_attainment'], True)} "
              f"{_fmt(m['image']['slo_attainment'], True)} {_fmt(m['video']['slo_attainment'], True)} "
              f"{(m['goodput_rps'] or 0) * 3600:6.0f}/h {_fmt(m['p50_norm_latency']):>6s} "
              f"{_fmt(m['p99_norm_latency']):>7s} {_fmt(m['gpu_busy'], True)} {m['preemptions']:7d}",
              file=out)
    print("(SLO = share of requests finished by their deadline; goodput = met requests per hour; "
          "p50/p99 = latency / standalone latency, '-' = unfinished; busy = GPU busy share)",
          file=out)


def print_bound(b: dict, results: dict[str, dict], out=None) -> None:
    out = out if out is not None else sys.stdout
    print(f"upper bound (no policy meets more): {_fmt(b['slo_attainment'], True)} "
          f"({b['met']} of {b['count']}; {b['alone']} can meet their deadline alone)", file=out)
    if results and b["slo_attainment"] > 0:
        print("share of the bound: " + ", ".join(
            f"{n} {m['slo_attainment'] / b['slo_attainment']:.3f}" for n, m in results.items()),
            file=out)
    if b.get("note"):
        print(f"({b['note']})", file=out)


def cmd_simulate(a: argparse.Namespace) -> int:
    spec = _spec(a)
    names = _policies(a.policy)
    timeline.check_flags(a)
    jobs = [(spec, n) for n in names] + ([(spec, BOUND)] if a.bound else [])
    got = run_many(jobs, a.jobs)
    results = dict(zip(names, got))
    print_table(results)
    out = {"config": spec.config_dict(), "policies": results}
    if a.bound:
        out["bound"] = got[-1]
        print_bound(out["bound"], results)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {a.json}")
    if a.timeline:
        timeline.for_simulate(a, spec, names)
    return 0


def cmd_bound(a: argparse.Namespace) -> int:
    spec = _spec(a)
    b = run_many([(spec, BOUND)], 1)[0]
    print_bound(b, {})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": spec.config_dict(), "bound": b}, f, indent=1)
        print(f"wrote {a.json}")
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    spec = _spec(a)
    names = _policies(a.policy)
    over = a.over.replace("-", "_")
    res = sweep(spec, over, a.values, names, a.tune, a.jobs, a.bound)
    for p in res["points"]:
        print(f"\n== {a.over} = {p[over]}")
        print_table(p["policies"])
        if a.bound:
            print_bound(p["bound"], p["policies"])
    out = {"config": spec.config_dict(), "tune": a.tune, **res}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {a.json}")
    if a.plot:
        plot_sweep(res, a.plot, f"{spec.gpus} GPUs, video share {spec.workload.video_share}, "
                                f"{spec.workload.arrival} cv {spec.workload.cv}")
        print(f"wrote {a.plot}")
    return 0


def cmd_trace(a: argparse.Namespace) -> int:
    spec = _spec(a)
    reqs = requests_for(spec)
    save_trace(a.out, reqs, {"workload": spec.config_dict(), "generator": "genserve trace"})
    kinds = {k: sum(r.kind.value == k for r in reqs) for k in ("image", "video")}
    print(f"wrote {a.out}: {len(reqs)} requests ({kinds['image']} images, {kinds['video']} videos)")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    if a.model not in GENERATE_DEFAULTS:
        raise ValueError(f"--model {a.model!r}: unknown preset; known: "
                         f"{', '.join(GENERATE_DEFAULTS)}")
    h, w, f, st = GENERATE_DEFAULTS[a.model]
    from .models import GenRequest, GenSpec, ModelInputError, ModelLoadError, load_preset
    from .models.output import write_mp4, write_png

    def pick(v, default):
        return default if v is None else v

    req = GenRequest("cli", GenSpec(
        a.model, pick(a.height, h), pick(a.width, w), frames=pick(a.frames, f),
        steps=pick(a.steps, st), guidance=pick(a.guidance, 5.0 if MODELS[a.model].cfg else 3.5),
        seed=a.seed, prompt=a.prompt,
        image=_image_arg(a.image, pick(a.width, w), pick(a.height, h))))
    video = MODELS[a.model].kind is Kind.VIDEO
    want = ".mp4" if video else ".png"
    if not a.out.lower().endswith(want):
        raise ValueError(f"--out {a.out!r}: {a.model} makes {'videos' if video else 'images'}; "
                         f"use a {want} file")
    if a.sp < 1:
        raise ValueError(f"--sp {a.sp}: must be >= 1")
    from tqdm.auto import tqdm

    try:
        with tqdm(total=req.spec.steps, desc=f"{a.model} steps (SP {a.sp})",
                  disable=a.quiet) as bar:
            if a.sp == 1:
                adapter = load_preset(a.model, a.model_path, a.device)
                adapter.validate(req.spec)
                out = adapter.generate(req, progress=lambda i, n: bar.update(1))
            else:
                out = _generate_sp(req, a, bar)
    except (ModelInputError, ModelLoadError) as e:
        raise ValueError(str(e)) from None
    (write_png if want == ".png" else write_mp4)(a.out, out)
    print(f"wrote {a.out} ({'x'.join(map(str, out.shape))})")
    return 0


def _image_arg(path: str | None, width: int, height: int) -> str:
    """`--image FILE` as `GenSpec.image`: checked and fitted to the size as the server does."""
    if path is None:
        return ""
    from .input_image import InputImageError, encode, normalize

    try:
        with open(path, "rb") as fh:
            return encode(normalize(fh.read(), width, height))
    except (OSError, InputImageError) as e:
        raise ValueError(f"--image {path!r}: {e}") from None


def _generate_sp(req, a: argparse.Namespace, bar):
    """`--sp K`: K worker processes, every step sharded over all of them (Ulysses)."""
    from .parallel.workers import WorkerError, WorkerLost, WorkerPool

    try:
        with WorkerPool(a.model, a.sp, a.model_path, "cpu" if a.device == "cpu" else "cuda") as pool:
            (state,) = pool.prepare([req])
            ranks = tuple(range(a.sp))
            while not state.done:
                (state,) = pool.steps(ranks, [state], 1)
                bar.update(1)
            return pool.decode([state])[0]
    except WorkerError as e:
        raise ValueError(str(e).split(": ", 1)[-1]) from None
    except WorkerLost as e:
        raise ValueError(str(e)) from None


def cmd_profile(a: argparse.Namespace) -> int:
    if a.show:
        from .latency import LatencyModel, describe

        print(describe(LatencyModel(a.show)))
        return 0
    if not a.out:
        raise ValueError("--out is required to measure (or --show PROFILE to print one)")
    from .models import ModelInputError, ModelLoadError
    from .parallel.workers import WorkerError, WorkerLost, WorkerPool
    from .profiler import profile, profile_workers, write_profile

    names = [m.strip() for m in a.models.split(",") if m.strip()]
    if not names:
        raise ValueError("--models is empty")
    for n in names:
        if n not in GENERATE_DEFAULTS:
            raise ValueError(f"--models {n!r}: unknown preset; known: {', '.join(GENERATE_DEFAULTS)}")
    check_model_dirs(names, a.model_path)
    batches = tuple(int(b) for b in _floats(a.batches))
    if a.reps < 1 or any(b < 1 for b in batches) or a.workers < 0:
        raise ValueError("--reps and --batches must be >= 1, --workers >= 0")
    try:
        if a.workers:
            with WorkerPool(tuple(names), a.workers, a.model_path,
                            "cpu" if a.device == "cpu" else "cuda") as pool:
                rows = profile_workers(names, batches, a.reps, pool=pool)
        else:
            rows = profile(names, batches, a.reps, a.device, a.model_path)
    except (ModelInputError, ModelLoadError, WorkerError, WorkerLost) as e:
        raise ValueError(str(e)) from None
    fwd, blk = write_profile(a.out, a.name, *rows)
    print(f"wrote {fwd} and {blk} ({len(rows[0])} forward rows); use --profile {a.out}")
    return 0


def cmd_replay(a: argparse.Namespace) -> int:
    """A trace through the real engine: same JSON as `simulate`, plus per-request timelines."""
    from .engine import Engine
    from .latency import LatencyModel
    from .metrics import summarize
    from .models import ModelLoadError
    from .parallel.workers import WorkerError, WorkerLost, WorkerPool
    from .workload import load_trace

    names = _policies(a.policy)
    reqs, meta = load_trace(a.trace)
    if not reqs:
        raise ValueError(f"{a.trace}: no requests")
    if a.workers < 1:
        raise ValueError(f"--workers {a.workers}: must be >= 1")
    if a.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every {a.checkpoint_every}: must be >= 0 (0: never)")
    timeline.check_flags(a)
    emu = _emulated(a)
    latency = LatencyModel(a.profile)
    models = sorted({r.model for r in reqs})
    for m in models:
        latency.profile_of(m)  # a clear error now rather than inside a policy
    results = {}
    if emu:
        from .parallel.protocol import OutputFormat

        gpus, emulation = emu
        pool_args = dict(n=gpus, emulate=emulation)
        # Encoded on the workers: a raw emulated 720p video is 224 MB through the driver.
        engine_args = dict(gpus_per_node=emulation.gpus_per_node, time_scale=a.time_scale,
                           output=OutputFormat())
    else:
        check_model_dirs(models, a.model_path)
        pool_args = dict(n=a.workers, model_path=a.model_path,
                         device="cpu" if a.device == "cpu" else "cuda")
        engine_args = dict(gpus_per_node=a.gpus_per_node)
    try:
        with WorkerPool(tuple(models), **pool_args) as pool:
            for name in names:
                run = load_trace(a.trace)[0]  # fresh requests for every policy
                res = Engine(make_policy(name), pool, latency,
                             checkpoint_every=a.checkpoint_every, **engine_args).run(run)
                results[name] = {**summarize(res), "worker_restarts": res.restarts,
                                 "recovered": res.recovered,
                                 "failed_reasons": {r.id: r.reason for r in run
                                                    if r.reason is not None},
                                 "timelines": {
                    r.id: {"arrival": r.arrival, "deadline": r.deadline,
                           "finish": r.finish_time,
                           "quanta": [[s, e, list(g)] for s, e, g in res.timeline.get(r.id, [])],
                           "history": [[t, st.value] for t, st in r.history]} for r in run}}
                if a.timeline:
                    timeline.write_for(a, name, names, res, engine_args["gpus_per_node"],
                                       f"genserve replay {os.path.basename(a.trace)} on "
                                       f"{pool.n} {'emulated ' if emu else ''}workers")
    except (WorkerError, WorkerLost, ModelLoadError) as e:
        raise ValueError(str(e)) from None
    print_table(results)
    if a.json:
        cfg = {"trace": a.trace, "workers": emu[0] if emu else a.workers, "profile": a.profile,
               "emulate": a.emulate, "time_scale": a.time_scale, "trace_meta": meta}
        with open(a.json, "w") as f:
            json.dump({"config": cfg, "policies": results}, f, indent=1)
        print(f"wrote {a.json}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    """The HTTP API; on SIGTERM: stop admitting (503), finish running work, then exit."""
    import signal
    import threading
    import time

    import uvicorn

    from .server import ServeConfig
    from .server.app import create_app

    emu = _emulated(a)
    models = a.models or (",".join(EMULATED_MODELS) if emu else "tiny-t2i,tiny-t2v")
    if emu and a.workers is not None:
        raise ValueError("--workers: with --emulate, give the number of GPUs as --gpus")
    if not emu:  # a Ray head need not hold the checkpoints its workers load
        check_model_dirs([m.strip() for m in models.split(",")], a.model_path, local=not a.ray)
    cfg = ServeConfig(presets=tuple(m.strip() for m in models.split(",") if m.strip()),
                      workers=(emu[0] if emu else a.workers if a.workers is not None
                               else 0 if a.ray else 2),
                      emulate=a.emulate, time_scale=a.time_scale,
                      gpus_per_node=emu[1].gpus_per_node if emu else 8,
                      device=a.device, model_path=a.model_path, ray=a.ray,
                      ray_cpus_per_worker=a.ray_cpus_per_worker,
                      policy=a.policy, profile=a.profile, host=a.host, port=a.port,
                      max_waiting_images=a.max_waiting_images,
                      max_waiting_videos=a.max_waiting_videos, slo_scale=a.slo_scale,
                      infeasible=a.infeasible, api_keys=tuple(a.api_key or ()),
                      results_dir=a.results_dir, result_ttl_s=a.result_ttl,
                      drain_timeout_s=a.drain_timeout, checkpoint_every=a.checkpoint_steps,
                      latency_feedback=not a.no_latency_feedback,
                      worker_timeout_s=a.worker_timeout, max_body_bytes=a.max_body_bytes,
                      max_upload_bytes=a.max_upload_bytes)
    cfg.validate()
    make_policy(cfg.policy)  # a bad policy is a one-line error now
    app = create_app(cfg)
    svc = app.state.service

    class DrainingServer(uvicorn.Server):
        """SIGTERM or SIGINT: drain (503 to new requests, running work goes on) for up to the
        drain timeout, answer whoever still waits (503 `server_shutdown`; the jobs stay in the
        store for the next start), exit.  A second signal skips what is left of the drain.  The
        process is gone by drain timeout + 5 s whatever hangs (`_exit_by`)."""

        def handle_exit(self, sig, frame) -> None:
            name = signal.Signals(sig).name
            if not svc.started:
                return super().handle_exit(sig, frame)
            if not svc.draining:
                print(f"{name}: draining (up to {cfg.drain_timeout_s:g} s); new requests get "
                      f"503", file=sys.stderr, flush=True)
                t0 = time.monotonic()
                _exit_by(t0 + cfg.drain_timeout_s + 4.5)

                def drain_then_exit():
                    ended = svc.drain()
                    print("drained" if ended else "drain timeout: exiting with work left",
                          file=sys.stderr, flush=True)
                    # Results stay readable a little longer for clients that poll.
                    time.sleep(max(0.0, min(a.drain_linger,
                                            cfg.drain_timeout_s - (time.monotonic() - t0))))
                    svc.release_waiters()  # before uvicorn waits for open connections
                    self.should_exit = True

                threading.Thread(target=drain_then_exit, daemon=True).start()
                return
            print(f"{name} again: exiting now", file=sys.stderr, flush=True)
            svc.release_waiters()
            super().handle_exit(sig, frame)

    # genserve's own loggers (genserve.server, genserve.ray) print beside uvicorn's, at its level.
    own = logging.getLogger("genserve")
    if not any(getattr(h, "genserve", False) for h in own.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.genserve = True
        own.addHandler(handler)
    own.setLevel(logging.DEBUG if a.log_level == "trace" else a.log_level.upper())
    own.propagate = False
    ray = None
    if cfg.ray:
        # Join the Ray cluster here, in the main thread, before the server installs its signal
        # handlers: those then replace the ones Ray's core worker installs (whose SIGTERM handling
        # aborted the process a few seconds into a drain).
        try:
            import ray
        except ImportError:
            raise ValueError("--ray needs Ray: pip install 'genserve[ray]'") from None
        ray.init(address=cfg.ray, log_to_driver=False)
    server = DrainingServer(uvicorn.Config(app, host=cfg.host, port=cfg.port,
                                           log_level=a.log_level, timeout_graceful_shutdown=5))
    try:
        server.run()
    finally:
        if ray is not None:
            ray.shutdown()
    return 0


# What `--emulate` serves by default: the real models of the catalog.
EMULATED_MODELS = CANONICAL_MODELS  # by default; --models names any other real one


def _add_emulate(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("emulated GPUs (capacity planning, trying policies, testing the "
                             "stack; outputs are placeholders)")
    g.add_argument("--emulate", nargs="?", const="h200", metavar="PROFILE",
                   help="workers emulate GPUs with the timings of this latency profile (a "
                        "shipped name, default h200, or a `genserve profile` directory) and "
                        "states of the real sizes; no weights, no GPU")
    g.add_argument("--gpus", type=int, help="emulated GPUs (default 8)")
    g.add_argument("--nodes", type=int, help="emulated nodes the GPUs split into (default 1)")
    g.add_argument("--time-scale", type=float, default=1.0,
                   help="run everything this many times faster (emulated only); reports stay "
                        "in trace seconds")


def _emulated(a: argparse.Namespace):
    """(GPUs, `Emulation`) of the emulated cluster the flags ask for (None: real workers);
    one-line errors (`emulation_for` checks the split into nodes and the profile)."""
    if a.emulate is None:
        if a.gpus is not None or a.nodes is not None or a.time_scale != 1.0:
            raise ValueError("--gpus, --nodes and --time-scale need --emulate")
        return None
    if not a.time_scale > 0:
        raise ValueError(f"--time-scale {a.time_scale}: must be > 0")
    from .emulate import emulation_for

    gpus = a.gpus or 8
    return gpus, emulation_for(a.emulate, a.time_scale, gpus, a.nodes or 1)


def _exit_by(t: float) -> None:
    """The last resort of a bounded shutdown: if the process is still here at monotonic time
    `t` (a shutdown step hung: a worker that will not die, a join), it ends at once.  The jobs
    are in the store already; the workers die with it (their parent-death signal)."""
    import threading
    import time

    def guard():
        time.sleep(max(0.0, t - time.monotonic()))
        print("shutdown overran its bound: exiting now", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=guard, name="genserve-exit-guard", daemon=True).start()


def cmd_demo(a: argparse.Namespace) -> int:
    """The tiny-model server over HTTP, then genserve vs the best baseline on emulated GPUs."""
    from .server.demo import run_demo, run_emulated_demo

    if a.workers < 1 or a.images < 0 or a.videos < 0 or a.duration <= 0:
        raise ValueError("--workers must be >= 1, --images/--videos >= 0, --duration > 0")
    if not (a.time_scale > 0 and a.emulated_rate > 0 and a.emulated_duration > 0):
        raise ValueError("--time-scale, --emulated-rate and --emulated-duration must be > 0")
    rc = 0
    if not a.emulated_only:
        rc = run_demo(a.out, a.workers, a.images, a.videos, a.duration, a.seed)
    if rc == 0 and not a.no_emulated:
        rc = run_emulated_demo(a.time_scale, a.seed, a.emulated_rate, a.emulated_duration)
    return rc


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="genserve", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    pol_help = (f"comma-separated policies, each NAME[:key=value,...]; "
                f"known: {', '.join(policy_names())}")

    s = sub.add_parser("simulate", help="run policies on a simulated cluster and compare them")
    _add_workload(s)
    s.add_argument("--policy", default=",".join(DEFAULT_POLICIES), help=pol_help)
    s.add_argument("--json", help="write the results as JSON here")
    s.add_argument("--horizon", type=float, help="stop the clock here (default: last deadline)")
    s.add_argument("--drain", action="store_true", help="run until every request finished")
    s.add_argument("--bound", action="store_true",
                   help="also compute the upper bound on SLO attainment (docs/bound.md)")
    s.add_argument("--profile-error", metavar="F|MODEL=F,...",
                   help="policies plan with step times wrong by these factors; the simulator "
                        "runs with the profile's")
    s.add_argument("--feedback", action="store_true",
                   help="policies' step times correct themselves from observed quanta")
    s.add_argument("--jobs", type=int, default=None, help="processes (default: all cores)")
    timeline.add_flags(s)
    s.set_defaults(func=cmd_simulate)

    w = sub.add_parser("sweep", help="run a grid over rate or SLO scale; write JSON and a plot")
    _add_workload(w, trace_ok=False)
    w.add_argument("--over", choices=("rate", "slo-scale"), default="rate")
    w.add_argument("--values", type=_floats, required=True, help="comma-separated values")
    w.add_argument("--policy", default=",".join(DEFAULT_POLICIES + ABLATIONS), help=pol_help)
    w.add_argument("--tune", action="store_true",
                   help="sweep each baseline's free parameter and report its best value per point")
    w.add_argument("--json", help="write the results as JSON here")
    w.add_argument("--plot", help="write a PNG plot of SLO attainment here")
    w.add_argument("--bound", action="store_true",
                   help="also compute the upper bound per point (a dashed curve in --plot)")
    w.add_argument("--jobs", type=int, default=None, help="processes (default: all cores)")
    w.set_defaults(func=cmd_sweep)

    gen = sub.add_parser("generate", help="generate one image (PNG) or video (MP4) with a preset")
    gen.add_argument("--model", required=True, help=f"preset: {', '.join(GENERATE_DEFAULTS)}")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--out", required=True, help="output file: .png for images, .mp4 for videos")
    gen.add_argument("--steps", type=int, help="denoising steps (default: the preset's)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--frames", type=int, help="video frames (4k+1)")
    gen.add_argument("--image", metavar="FILE",
                     help="input image (PNG, JPEG, WebP) of an image-to-video model: the first "
                          "frame, fitted to the size (scaled to cover, centre-cropped)")
    gen.add_argument("--guidance", type=float,
                     help="guidance scale (default 5; FLUX 3.5; <= 1 turns CFG off)")
    gen.add_argument("--model-path", help=MODEL_PATH_HELP)
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    gen.add_argument("--sp", type=int, default=1,
                     help="sequence-parallel degree: run on this many worker processes (CPU "
                          "workers when --device cpu, one GPU each otherwise)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    pr = sub.add_parser("profile", help="measure step latencies here; write a profile directory")
    pr.add_argument("--models", default="tiny-t2i,tiny-t2v",
                    help="comma-separated presets (default: the tiny ones, on CPU)")
    pr.add_argument("--out", help="output directory (for --profile)")
    pr.add_argument("--show", metavar="PROFILE",
                    help="print a profile's step times (a shipped name such as h200, or a "
                         "directory), marking the estimated ones, and measure nothing")
    pr.add_argument("--name", default="local", help="file name prefix (default: local)")
    pr.add_argument("--batches", default="1,2,4,8", help="transformer batch sizes")
    pr.add_argument("--reps", type=int, default=5)
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--model-path", help=MODEL_PATH_HELP)
    pr.add_argument("--workers", type=int, default=0,
                    help="measure inside worker 0 of a pool of N engine workers (their threads "
                         "and process layout), plus the engine's cost per quantum; 0: in this "
                         "process, no dispatch cost")
    pr.set_defaults(func=cmd_profile)

    rp = sub.add_parser("replay", help="run a trace through the real engine (worker processes)")
    rp.add_argument("trace", help="JSONL trace from `genserve trace`")
    rp.add_argument("--policy", default="genserve", help=pol_help)
    rp.add_argument("--workers", type=int, default=2, help="worker processes (one per device)")
    rp.add_argument("--gpus-per-node", type=int, default=8)
    rp.add_argument("--profile", default="h200",
                    help="latency profile the policy plans with (from `genserve profile` for the "
                         "tiny presets)")
    rp.add_argument("--device", default="cpu")
    rp.add_argument("--model-path", help=MODEL_PATH_HELP)
    rp.add_argument("--checkpoint-every", type=int, default=4,
                    help="keep a host-side copy of each request's state every N steps, the "
                         "restart point if its worker dies (0: never, start over)")
    rp.add_argument("--json", help="write results and per-request timelines here")
    _add_emulate(rp)
    timeline.add_flags(rp)
    rp.set_defaults(func=cmd_replay)

    sv = sub.add_parser("serve", help="the HTTP API (OpenAI-compatible images and videos)")
    sv.add_argument("--models",
                    help="presets the workers load (default: the tiny ones, CPU, no weights; "
                         "with --emulate: " + ", ".join(EMULATED_MODELS) + ")")
    sv.add_argument("--workers", type=int, default=None,
                    help="workers, one per device (default: 2; with --ray: every GPU of the "
                         "Ray cluster)")
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--ray", metavar="ADDRESS",
                    help="run the workers as actors of a Ray cluster ('auto': the cluster "
                         "`ray start` made on this node; or host:port); see docs/ray.md")
    sv.add_argument("--ray-cpus-per-worker", type=float, default=1.0,
                    help="CPUs each worker actor reserves besides its GPU")
    sv.add_argument("--model-path", help=MODEL_PATH_HELP)
    sv.add_argument("--policy", default="genserve", help=pol_help)
    sv.add_argument("--profile", default="measure",
                    help="'measure' (profile the workers at start-up), a shipped profile name or "
                         "a `genserve profile` directory")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-waiting-images", type=int, default=64,
                    help="image requests not yet started before new ones get 429")
    sv.add_argument("--max-waiting-videos", type=int, default=16)
    sv.add_argument("--slo-scale", type=float, default=3.0,
                    help="default deadline: this many times the request's standalone time")
    sv.add_argument("--infeasible", choices=("best_effort", "reject"), default="best_effort",
                    help="a request whose SLO cannot be met even alone")
    sv.add_argument("--api-key", action="append",
                    help="accepted API key (repeatable); jobs are visible only to their key")
    sv.add_argument("--results-dir", default="genserve-results")
    sv.add_argument("--result-ttl", type=float, default=3600.0,
                    help="seconds finished results stay readable")
    sv.add_argument("--drain-timeout", type=float, default=60.0,
                    help="on SIGTERM: seconds to finish running work (new requests get 503)")
    sv.add_argument("--drain-linger", type=float, default=5.0,
                    help="after the drain, seconds results stay readable before exit (within "
                         "the drain timeout)")
    sv.add_argument("--no-latency-feedback", action="store_true",
                    help="plan with the profile as it is (default: step times correct "
                         "themselves from the quanta the workers run)")
    sv.add_argument("--checkpoint-steps", type=int, default=4,
                    help="every this many steps a request's state is saved to --results-dir, "
                         "where a restarted server resumes it (0: never)")
    sv.add_argument("--worker-timeout", type=float, default=None,
                    help="seconds without a heartbeat or step progress before a worker is "
                         "declared hung, killed and replaced (default: a few times the longest "
                         "profiled step, at least 60)")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20,
                    help="largest JSON request body (larger: 413)")
    sv.add_argument("--max-upload-bytes", type=int, default=64 << 20,
                    help="largest uploaded file (larger: 413)")
    _add_emulate(sv)
    sv.add_argument("--log-level", default="warning",
                    choices=("critical", "error", "warning", "info", "debug", "trace"),
                    help="for the HTTP server's log and genserve's own (worker losses, Ray "
                         "worlds, ...)")
    sv.set_defaults(func=cmd_serve)

    dm = sub.add_parser("demo", help="start the server on tiny presets, send a mixed load over "
                                     "HTTP, print SLO attainment per kind; then genserve vs the "
                                     "best baseline on 8 emulated H200 GPUs, per model")
    dm.add_argument("--out", default="demo-output", help="where outputs and samples go")
    dm.add_argument("--workers", type=int, default=2)
    dm.add_argument("--images", type=int, default=24)
    dm.add_argument("--videos", type=int, default=6)
    dm.add_argument("--duration", type=float, default=12.0,
                    help="seconds of arrivals of the HTTP load")
    dm.add_argument("--seed", type=int, default=0, help="of both loads (default 0)")
    which = dm.add_mutually_exclusive_group()
    which.add_argument("--emulated-only", action="store_true",
                       help="skip the tiny-model HTTP part")
    which.add_argument("--no-emulated", action="store_true",
                       help="skip the emulated 8-GPU part")
    from .server.demo import DEMO_DURATION, DEMO_RATE, DEMO_TIME_SCALE
    dm.add_argument("--time-scale", type=float, default=DEMO_TIME_SCALE,
                    help=f"the emulated part runs this many times faster than real time "
                         f"(default {DEMO_TIME_SCALE:g}; lower: slower, closer to the simulator)")
    dm.add_argument("--emulated-rate", type=float, default=DEMO_RATE,
                    help=f"requests per second of the emulated trace (default {DEMO_RATE:g})")
    dm.add_argument("--emulated-duration", type=float, default=DEMO_DURATION,
                    help=f"seconds of arrivals of the emulated trace (default {DEMO_DURATION:g})")
    dm.set_defaults(func=cmd_demo)

    bd = sub.add_parser("bound", help="the upper bound on SLO attainment any policy can reach on "
                                      "a trace and cluster (docs/bound.md)")
    _add_workload(bd)
    bd.add_argument("--json", help="write the bound as JSON here")
    bd.set_defaults(func=cmd_bound)

    t = sub.add_parser("trace", help="write a workload trace (JSONL) for simulate --trace")
    _add_workload(t, trace_ok=False)
    t.add_argument("--out", required=True, help="output JSONL file")
    t.set_defaults(func=cmd_trace)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.func(a)
    except (ValueError, OSError) as e:
        sys.stderr.write(f"genserve {a.cmd}: error: {e}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
