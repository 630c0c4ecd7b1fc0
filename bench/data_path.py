"""The data path of a state move (issue 12, part 3), run by hand on CPU workers (`WorkerPool`).

The state is the size of a Wan2.1-14B 720p 81-frame request (`ModelSpec.state_bytes`): fp32
latents of 16 channels x 21 latent frames x 90 x 160 and bf16 umT5 embeddings of 512 x 4096 for
the prompt and for the negative prompt (CFG), 27.7 MB.  No 14B model is needed to move it:

(a) Move time between worker sets, via the driver (the old path, kept behind
    `WorkerBackend.direct_moves = False`: `fetch` from the holder, then the bytes in the job as
    `Moved`) against direct (`send_state` + an `Incoming` member: holder to job over gloo).  The
    state is a synthetic `StepState` with tensors of exactly those shapes, labelled with the tiny
    preset the workers serve and placed on a worker by a zero-step `Run` with a `Moved` member; a
    move is timed from the driver's first message to the receiving job's `Done` (a zero-step
    `Run`), 1 -> 1 GPU and 1 -> 2 GPUs (received, then broadcast in the pair).
(b) The longest time the engine's decision loop was blocked while such moves were in flight, old
    path against new: two tiny-t2v videos whose states carry tensors of those shapes (the
    workers' "ballast" hook: they travel with the state and no step reads them), one step per
    quantum, each quantum on the other GPU of its pair, so that every quantum moves its state.
    Timed: every `_decide` call, and every turn of the core's loop minus its wait for results.
    Goal: < 5 ms.  Checkpoints are off, so only moves cross (or do not cross) the driver.  On a
    machine with fewer cores than workers a maximum also catches the driver descheduled: the
    median decision is printed beside it.
(c) Bytes that cross the driver per finished 720p 81-frame video: its output (decoded frames
    before, the worker's MP4 now: bench/data_path_outputs.py's encoder path on a synthetic
    scene), its moves, and its host checkpoints.

    python bench/data_path.py [--reps 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from genserve.catalog import get_model  # noqa: E402
from genserve.engine import Engine  # noqa: E402
from genserve.engine.backend import WorkerBackend  # noqa: E402
from genserve.latency import LatencyModel  # noqa: E402
from genserve.models.base import StepState  # noqa: E402
from genserve.parallel.protocol import Incoming, Moved, Run  # noqa: E402
from genserve.parallel.workers import WorkerPool  # noqa: E402
from genserve.policies import Plan, Policy  # noqa: E402
from genserve.policies.base import Assignment  # noqa: E402
from genserve.profiler import profile_workers, write_profile  # noqa: E402
from genserve.request import Kind, Request  # noqa: E402
from genserve.spec import GenSpec  # noqa: E402

PRESET = "tiny-t2v"
SPEC = get_model("wan2.1-14b")
H, W, F = 720, 1280, 81


def shapes() -> dict[str, tuple[tuple[int, ...], str]]:
    """The big tensors of one Wan2.1-14B 720p 81-frame state (batch 1), from the catalog."""
    s = SPEC.vae_spatial
    lat = (1, SPEC.latent_channels, SPEC.latent_frames(F), H // s, W // s)
    txt = (1, SPEC.text_tokens, SPEC.text_dim)
    return {"latents": (lat, "float32"), "cond": (txt, "bfloat16"), "uncond": (txt, "bfloat16")}


def synthetic(rid: str) -> StepState:
    t = {k: torch.randn(shape).to(getattr(torch, dt)) for k, (shape, dt) in shapes().items()}
    return StepState(rid, PRESET, H, W, F, 50, 5.0, 10, t["latents"],
                     {"prompt_embeds": t["cond"]}, {"prompt_embeds": t["uncond"]}, {},
                     torch.Generator().manual_seed(0).get_state())


# ----- (a) -----
def via_driver(pool, rid: str, src: int, dst: tuple[int, ...]) -> float:
    t0 = time.perf_counter()
    blob = pool.fetch(src, [rid])[rid]
    pool.wait(pool.submit(dst, Run(PRESET, (Moved(rid, blob),), 0)))
    return time.perf_counter() - t0


def direct(pool, rid: str, src: int, dst: tuple[int, ...]) -> float:
    t0 = time.perf_counter()
    tid = pool.transfer_id()
    job = pool.submit(dst, Run(PRESET, (Incoming(rid, src, tid),), 0))
    pool.send_state(src, rid, min(dst), tid)
    pool.wait(job)
    return time.perf_counter() - t0


def move_times(pool, reps: int) -> None:
    rid = "a-state"
    pool.wait(pool.submit((0,), Run(PRESET, (Moved(rid, synthetic(rid).to_bytes()),), 0)))
    for label, there in (("1 -> 1 GPU ", (1,)), ("1 -> 2 GPUs", (2, 3))):
        got = {}
        for name, move in (("driver", via_driver), ("direct", direct)):
            ts = []
            for _ in range(reps):  # there and back: the state is on worker 0 between reps
                ts.append(move(pool, rid, 0, there))
                move(pool, rid, min(there), (0,))
                if len(there) > 1:
                    pool.drop(there[1:], [rid])
            got[name] = statistics.median(ts)
        print(f"(a) move {label}: via driver {got['driver'] * 1e3:7.1f} ms, direct "
              f"{got['direct'] * 1e3:7.1f} ms, ratio {got['driver'] / got['direct']:5.1f}x "
              f"(median of {reps})")
    pool.drop((0,), [rid])


# ----- (b) -----
class PingPong(Policy):
    """One step per quantum, each on the other GPU of the request's pair: every quantum moves."""

    name = "ping-pong"

    def __init__(self, pairs: dict[str, tuple[int, int]]):
        super().__init__()
        self.pairs = pairs

    def schedule(self, s):
        plan, free = Plan(), set(s.free_gpus)
        for r in sorted(s.queue, key=lambda r: r.id):
            a, b = self.pairs[r.id]
            g = b if r.gpus == (a,) else a
            if g in free:
                free.discard(g)
                plan.assignments.append(Assignment((g,), (r.id,), 1))
        return plan


class TimedEngine(Engine):
    """Records how long each decision and each turn of the loop (its wait for results apart)
    kept the loop from anything else."""

    def _new_core(self, keep: bool) -> None:
        super()._new_core(keep)
        self.decide_s, self.turn_s = [], []
        core, backend = self.core, self.backend
        decide, wait, since = core._decide, backend.wait, [None]

        def timed_decide(now):
            t0 = time.perf_counter()
            decide(now)
            self.decide_s.append(time.perf_counter() - t0)

        def timed_wait(until):
            if since[0] is not None:
                self.turn_s.append(time.perf_counter() - since[0])
            wait(until)
            since[0] = time.perf_counter()

        core._decide, backend.wait = timed_decide, timed_wait


def videos(steps: int) -> list[Request]:
    return [Request(f"b-vid{i}", Kind.VIDEO,
                    GenSpec(PRESET, 32, 32, frames=9, steps=steps, seed=i, prompt=f"video {i}"),
                    deadline=1e9) for i in range(2)]


def loop_blocked(pool, lat, steps: int) -> None:
    got = {}
    for name, on in (("driver", False), ("direct", True)):
        WorkerBackend.direct_moves = on
        reqs = videos(steps)
        eng = TimedEngine(PingPong({reqs[0].id: (0, 1), reqs[1].id: (2, 3)}), pool, lat,
                          checkpoint_every=0)
        t0 = time.perf_counter()
        res = eng.run(reqs)
        wall = time.perf_counter() - t0
        assert all(r.remaining_steps == 0 for r in reqs), [r.status for r in reqs]
        got[name] = (max(eng.decide_s), max(eng.turn_s), wall, res.moves_bytes, res.migrations,
                     statistics.median(eng.decide_s))
    WorkerBackend.direct_moves = True
    for name, (dec, turn, wall, nbytes, moves, med) in got.items():
        print(f"(b) {name:6}: longest decision {dec * 1e3:8.2f} ms (median {med * 1e3:6.2f}), "
              f"longest loop turn {turn * 1e3:8.2f} ms, {moves} moves, {nbytes / 1e6:6.1f} MB "
              f"through the driver, run {wall:5.2f} s")
    (d0, t0, w0, *_), (d1, t1, w1, *_) = got["driver"], got["direct"]
    print(f"(b) longest decision: ratio {d0 / d1:6.1f}x; longest turn: ratio {t0 / t1:6.1f}x; "
          f"run time ratio {w0 / w1:4.2f}x; goal < 5 ms: "
          f"{'met' if max(d1, t1) < 5e-3 else 'NOT met'}")


# ----- (c) -----
def driver_bytes_per_video(fps: int = 16, checkpoint_every: int = 4) -> None:
    """What crosses the driver for one finished 720p 81-frame Wan2.1-14B video of 50 steps: its
    output (the MP4 now, the decoded frames before), its moves (none now; one state each before)
    and its checkpoints (one state every `checkpoint_every` steps before; now the worker writes
    the file and the driver gets its path).  The output goes through the worker's real encoder
    thread (bench/data_path_outputs.py) with a synthetic smooth scene, so its size is
    indicative."""
    from data_path_outputs import encoded_path, raw_path, scene

    video = scene(F, H, W)
    raw = raw_path(video)
    framed, mp4, _ = encoded_path(video, fps)
    state = SPEC.state_bytes(H, W, F)
    steps = SPEC.steps
    checkpoints = len([k for k in range(checkpoint_every, steps, checkpoint_every)])
    print(f"(c) per finished {W}x{H}x{F} video ({steps} steps, a checkpoint every "
          f"{checkpoint_every}): output {raw:,} B of frames before, {framed:,} B of MP4 now "
          f"({raw / framed:.0f}x less); each move {state:,} B before, 0 now; "
          f"checkpoints {checkpoints} x {state:,} = {checkpoints * state:,} B before, 0 now "
          f"(the workers write them)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="moves per path and case in (a)")
    ap.add_argument("--steps", type=int, default=10, help="steps (quanta) per video in (b)")
    a = ap.parse_args()
    big = shapes()
    nbytes = SPEC.state_bytes(H, W, F)
    print(f"state: {SPEC.name} {W}x{H}x{F}: {nbytes:,} bytes "
          f"({', '.join(f'{k} {s} {dt}' for k, (s, dt) in big.items())})")
    faults = {r.id: {"kind": "ballast", "step": "prepare", "tensors": big}
              for r in videos(a.steps)}
    with tempfile.TemporaryDirectory() as d, \
            WorkerPool((PRESET,), 4, faults=faults, collective_timeout_s=120) as pool:
        move_times(pool, a.reps)
        fwd, blk, meta = profile_workers([PRESET], batches=(1, 2), reps=1, pool=pool)
        write_profile(d, "local", fwd, blk, meta)
        loop_blocked(pool, LatencyModel(d), a.steps)
    driver_bytes_per_video()
    return 0


if __name__ == "__main__":
    sys.exit(main())
