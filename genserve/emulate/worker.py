"""The emulated worker process: the worker protocol, with time from a profile instead of a GPU.

It serves the same messages as `parallel/worker_main.py` (inbox on the main thread, control queue
on a second thread, a transfer thread for `SendState`, encoder threads for outputs, a heartbeat)
and answers the same way, so the pools, the engine and the server cannot tell.  What differs:

- a `Run` job takes as long as the latency model says the same quantum takes (`quantum_cost`:
  encode of new members, moves, each step at its batch size and SP degree, decode of finished
  members), divided by the time scale.  The main thread sleeps to those deadlines, in slices
  that bump the progress counter, so a long step is never taken for a hang;
- states are `EmuState`s of the real sizes (`state.py`) and travel between workers over the
  exchange's sockets (`exchange.py`) instead of torch.distributed;
- an SP group's first rank runs the steps and decides cancels; the others keep copies and take
  the same steps when it tells them where the job ended (`JobEnd`), as real members run in
  lockstep;
- outputs are placeholders of the requested size (`frames.py`).

Faults (`WorkerSpec.faults`) act as on real workers: {"kind": "error" | "oom" | "exit" | "hang",
"step": k} fails the request (the job at SP > 1), kills the process, or blocks it for good.
No torch here: an emulated worker costs tens of MB.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback

from ..catalog import get_model
from ..parallel.liveness import Pulse
from ..parallel.protocol import (Cancel, Done, Drop, Fetch, Fetched, Held, Incoming, JobError,
                                 MakeGroups, Moved, New, Noop, Output, OutputFormat, Ready,
                                 Rendezvous, Resident, Restart, Run, RunResult, SendState,
                                 Shutdown, StartFailed, Stored, Task, handler)
from ..parallel.saver import Saver
from ..parallel.world import WorkerSpec
from .exchange import Exchange, JobEnd, Parcel, generation
from .state import EmuState

# The longest sleep between two progress bumps (wall seconds): far under any worker timeout.
_SLICE_S = 0.25


class _Timeline:
    """A job's emulated time: `charge(s)` adds `s` profile seconds and sleeps (wall time scaled)
    until the job has taken them all since it began."""

    def __init__(self, scale: float, bump):
        self.scale, self.bump = scale, bump
        self.t0 = time.monotonic()
        self.target = self.t0

    def charge(self, seconds: float) -> None:
        self.target += seconds / self.scale
        while (left := self.target - time.monotonic()) > 0:
            time.sleep(min(left, _SLICE_S))
            self.bump()


class EmuWorker:
    def __init__(self, rank: int, spec: WorkerSpec, outbox):
        self.rank, self.spec, self.outbox = rank, spec, outbox
        self.emu = spec.emulate
        self.latency = self.emu.latency()
        self.states: dict[str, EmuState] = {}
        self.lock = threading.Lock()
        self.cancelled: set[str] = set()
        self.progress = 0
        self.world, self.gen = "", 0
        self.exchange: Exchange | None = None
        self.pulse: Pulse | None = None
        self.moves: queue.SimpleQueue = queue.SimpleQueue()
        self.encoders: dict[str, queue.SimpleQueue] = {}
        self.saver = Saver(rank, outbox)  # checkpoint files, as a real worker writes them
        self._inbox = {Task: self._task, MakeGroups: lambda m: None, Restart: self._restart}
        self._jobs = {Run: self._run, Noop: self._noop}
        self._control = {Fetch: self._fetch, Drop: self._drop, Cancel: self._cancel,
                         SendState: self.moves.put}

    def bump(self) -> None:
        self.progress += 1

    # ----- life cycle -----
    def start(self, world: Rendezvous, members, ctl) -> bool:
        if self.spec.heartbeat_s:
            self.pulse = Pulse(self.rank, self.outbox, self.spec.heartbeat_s,
                               lambda: self.progress)
            self.pulse.start()
        self.world, self.gen = world.prefix, generation(world.prefix)
        missing = [p for p in self.spec.presets if p not in self.latency.models]
        if missing:
            self.outbox.put(StartFailed(self.rank, f"worker {self.rank} could not start: "
                                                   f"profile {self.emu.profile!r} has no rows "
                                                   f"for {', '.join(missing)}"))
            return False
        self.exchange = Exchange(self.emu.exchange, self.rank, self.gen)
        for name, target, arg in (("control", self._serve_control, ctl),
                                  ("mover", self._serve_moves, None)):
            threading.Thread(target=target, args=(arg,) if arg is not None else (), daemon=True,
                             name=f"emu-{name}-{self.rank}").start()
        # The encoders' imports and font take a second: paid now, in the background, rather
        # than by the first output (a pool's start stays short: 64 workers share two cores).
        threading.Thread(target=_warm_up, args=(self.spec.presets,), daemon=True,
                         name=f"emu-warm-{self.rank}").start()
        self.outbox.put(Ready(self.rank))
        return True

    def serve(self, inbox) -> None:
        while not isinstance(msg := inbox.get(), Shutdown):
            handler(self._inbox, msg)(msg)
            self.bump()
        if self.pulse is not None:
            self.pulse.stop()
        self.exchange.close()

    def _restart(self, msg: Restart) -> None:
        self.world, self.gen = msg.rendezvous.prefix, generation(msg.rendezvous.prefix)
        # Join the new world once its members are up, as a real rendezvous waits for them: a
        # rank replaced for it still has its dead predecessor's pid file until its replacement
        # starts, and a job of the new world waiting on it meanwhile would take it for dead.
        deadline = time.monotonic() + self.spec.timeout_s
        for r in msg.members:
            while (r != self.rank and not self.exchange.joined(r, self.gen)
                   and time.monotonic() < deadline):
                self.bump()
                time.sleep(0.02)

    def _task(self, t: Task) -> None:
        first = self.rank == t.ranks[0]
        try:
            fn = self._jobs.get(type(t.job))
            if fn is None:
                raise ValueError(f"emulated workers run the engine's jobs (Run, Noop), not a "
                                 f"{type(t.job).__name__}")
            out = fn(t.job_id, t.ranks, t.job)
            if first:
                self.outbox.put(Done(t.job_id, out))
        except ValueError as e:
            self.outbox.put(JobError(t.job_id, f"worker {self.rank}: {e}"))
        except Exception as e:  # noqa: BLE001 - reported to the driver; the worker stays up
            self.outbox.put(JobError(t.job_id, f"worker {self.rank}: {type(e).__name__}: {e}\n"
                                               f"{traceback.format_exc(limit=3)}"))

    def _noop(self, job_id: int, ranks, job: Noop):
        return bytes(job.reply_bytes) if job.reply_bytes else None

    # ----- the resident states -----
    def _get(self, rid: str) -> EmuState:
        with self.lock:
            st = self.states.get(rid)
        if st is None:
            raise KeyError(f"no resident state for request {rid!r}")
        return st

    def _pop(self, rids) -> list[EmuState]:
        with self.lock:
            return [s for s in (self.states.pop(r, None) for r in rids) if s is not None]

    def _put(self, states) -> None:
        with self.lock:
            for s in states:
                self.states[s.request_id] = s

    # ----- the run job -----
    def _run(self, job_id: int, ranks: tuple[int, ...], job: Run) -> RunResult | None:
        out = RunResult()
        first = ranks[0]
        clock = _Timeline(self.emu.time_scale, self.bump)

        def take() -> list[EmuState]:
            return [s for s in (self._take(m, job_id, ranks, job, out, clock)
                                for m in job.members) if s is not None]

        if self.rank != first:
            try:
                states = take()
            except Exception:  # nothing to keep: the first rank must not wait for it
                self.exchange.send(first, Parcel(f"settled/{job_id}/{self.rank}"))
                raise
            return self._follow(job_id, first, states)
        states: list[EmuState] = []
        try:
            states = take()
            states = self._steps(states, job, ranks, clock, out)
        finally:  # the other members never wait for a first rank that failed
            if len(ranks) > 1:
                end = JobEnd(f"end/{job_id}", {s.request_id: s.step_index for s in states},
                             (*out.failed, *out.cancelled, *out.lost))
                for r in ranks[1:]:
                    self.exchange.send(r, end)
                # Answer only once every member has settled its copies (real members end in
                # lockstep): a Drop the driver sends on this job's answer must find them there.
                for r in ranks[1:]:
                    self.exchange.take(f"settled/{job_id}/{r}", r, self.gen,
                                       self.spec.timeout_s, self.bump)
        done = [s for s in states if s.done]
        self._settle(states, [*out.failed, *out.cancelled, *out.lost])
        out.steps.update({s.request_id: s.step_index for s in states})
        for s in states:
            if s.request_id in job.want and not s.done:
                if job.save:  # the header now (the state steps on); joined on the saver thread
                    self.saver.save(job.save, s.request_id, s.step_index,
                                    lambda h=s.header(), p=s.payload: h + p)
                else:
                    out.blobs[s.request_id] = s.to_bytes()
        for s in done:
            clock.charge(self.latency.decode_time(s.model, s.spec.height, s.spec.width,
                                                  s.spec.frames))
        for s in done:
            if job.output is None:
                from .frames import render

                out.outputs[s.request_id] = render(s.spec, s.step_index, s.digest)
            else:
                self._encode(s, job.output)
        return out

    def _steps(self, states, job: Run, ranks, clock: _Timeline, out: RunResult):
        cross = self.emu.spans_nodes(ranks)
        for _ in range(job.steps):
            keep = []
            for s in states:
                if s.request_id in self.cancelled:
                    out.cancelled[s.request_id] = s.step_index
                else:
                    keep.append(s)
            states = keep
            if not states:
                break
            states = self._faults(states, len(ranks), out)
            if not states:
                break
            clock.charge(self.latency.request_step_time(states[0].spec, len(states),
                                                        len(ranks), cross, job.cfg_split))
            for s in states:
                s.step()
        self.cancelled.difference_update(out.cancelled)
        return states

    def _faults(self, states, degree: int, out: RunResult) -> list[EmuState]:
        keep = []
        for s in states:
            f = self.spec.faults.get(s.request_id)
            if not f or f.get("step") != s.step_index or f.get("rank", self.rank) != self.rank:
                keep.append(s)
                continue
            if f["kind"] == "exit":
                os._exit(17)
            if f["kind"] == "hang":
                threading.Event().wait()
            why = (f"out_of_memory: injected out-of-memory at step {s.step_index}"
                   if f["kind"] == "oom" else f"_Fault: injected error at step {s.step_index}")
            if degree > 1:  # as on real workers: members cannot agree on a culprit
                raise RuntimeError(why)
            out.failed[s.request_id] = why
        return keep

    def _settle(self, states, gone) -> None:
        """After a job: unfinished states stay resident, the others leave."""
        self._put([s for s in states if not s.done])
        self._pop([*gone, *(s.request_id for s in states if s.done)])

    def _follow(self, job_id: int, first: int, states: list[EmuState]) -> None:
        """A member other than the first: take the steps the first rank took."""
        end = self.exchange.take(f"end/{job_id}", first, self.gen, self.spec.timeout_s,
                                 self.bump)
        if not isinstance(end, JobEnd):  # the first rank died: its job is lost
            self._pop([s.request_id for s in states])
            return None
        live = [s for s in states if s.request_id in end.steps]
        for s in live:
            s.advance_to(end.steps[s.request_id])
        self._settle(live, [*end.dropped, *(s.request_id for s in states
                                            if s.request_id not in end.steps)])
        self.exchange.send(first, Parcel(f"settled/{job_id}/{self.rank}"))
        return None

    # ----- a run job's members: each one's state, or None (noted in `out`) -----
    def _take(self, m, job_id: int, ranks, job: Run, out: RunResult, clock: _Timeline):
        first = self.rank == ranks[0]
        if isinstance(m, New):
            try:
                if m.spec.model not in self.spec.presets:
                    raise ValueError(f"model={m.spec.model!r}: not served by these workers "
                                     f"(they hold {', '.join(self.spec.presets)})")
                s = m.spec
                get_model(s.model).validate_shape(s.height, s.width, s.frames, s.steps)
            except ValueError as e:
                out.failed[m.rid] = f"{type(e).__name__}: {e}"
                return None
            if first:
                clock.charge(self.latency.encode_time(m.spec.model))
            return EmuState.new(m.rid, m.spec)
        if isinstance(m, Resident) or (isinstance(m, Held) and len(ranks) == 1):
            return self._get(m.rid)
        if isinstance(m, (Moved, Stored)):
            try:
                st = EmuState.from_bytes(m.state if isinstance(m, Moved) else _read(m.path))
                if st.request_id != m.rid:
                    raise ValueError(f"it holds request {st.request_id!r}")
            except (OSError, ValueError) as e:
                if isinstance(m, Moved):
                    raise
                # Every rank reads the same file, so all agree: the request starts over.
                out.lost[m.rid] = f"worker {self.rank}: checkpoint {m.path}: {e}"
                return None
            if first:
                clock.charge(self.latency.move_time(st.spec, False))
            return st
        if isinstance(m, Held):  # rank m.src of the job sends its copy to the others
            key = f"held/{job_id}/{m.rid}"
            if self.rank == m.src:
                try:
                    st = self._get(m.rid)
                    parcel = _parcel(key, st)
                except KeyError as e:
                    st, parcel = None, Parcel(key, lost=f"worker {self.rank}: {e}")
                for r in ranks:
                    if r != self.rank:
                        self.exchange.send(r, parcel)
                if st is None:
                    out.lost[m.rid] = parcel.lost
                elif first:
                    clock.charge(self.latency.move_time(st.spec, self.emu.spans_nodes(ranks)))
                return st
            return self._arrived(key, m.rid, m.src, out, clock if first else None,
                                 self.emu.spans_nodes(ranks))
        if isinstance(m, Incoming):  # from worker m.src: the first rank takes it, shares it
            if first:
                st = self._arrived(f"move/{m.transfer}", m.rid, m.src, out, clock,
                                   self.emu.spans_nodes((m.src, *ranks)))
                share = (_parcel(f"share/{job_id}/{m.rid}", st) if st is not None
                         else Parcel(f"share/{job_id}/{m.rid}", lost=out.lost[m.rid]))
                for r in ranks[1:]:
                    self.exchange.send(r, share)
                return st
            return self._arrived(f"share/{job_id}/{m.rid}", m.rid, ranks[0], out, None, False)
        raise TypeError(f"unknown run member {type(m).__name__}")

    def _arrived(self, key: str, rid: str, sender: int, out: RunResult,
                 clock: _Timeline | None, cross: bool) -> EmuState | None:
        parcel = self.exchange.take(key, sender, self.gen, self.spec.timeout_s, self.bump)
        if parcel is None:
            out.lost[rid] = f"worker {sender} died (or was replaced) before sending {rid}'s state"
        elif parcel.lost is not None:
            out.lost[rid] = parcel.lost
        else:
            st = EmuState.from_bytes(parcel.state, payload_apart=True)
            if clock is not None:
                clock.charge(self.latency.move_time(st.spec, cross))
            return st
        self._pop([rid])  # no stale copy outlives it
        return None

    # ----- outputs -----
    def _encode(self, st: EmuState, fmt: OutputFormat) -> None:
        lane = "video" if st.spec.frames > 1 else "image"  # images never wait behind a video
        if lane not in self.encoders:
            self.encoders[lane] = queue.SimpleQueue()
            threading.Thread(target=self._serve_encodes, args=(self.encoders[lane],),
                             daemon=True, name=f"emu-encoder-{self.rank}-{lane}").start()
        self.encoders[lane].put((st.request_id, st.spec, st.step_index, st.digest, fmt))

    def _serve_encodes(self, todo: queue.SimpleQueue) -> None:
        from .frames import encode

        while True:
            rid, spec, steps, digest, fmt = todo.get()
            try:
                enc = encode(spec, steps, digest, fmt.fps)
                msg = Output(rid, enc.data, enc.media_type)
            except Exception as e:  # noqa: BLE001 - that request fails, the thread goes on
                msg = Output(rid, error=f"encode: {type(e).__name__}: {e}")
            self.outbox.put(msg)

    # ----- the control queue and the transfer thread -----
    def _serve_control(self, ctl) -> None:
        while not isinstance(msg := ctl.get(), Shutdown):
            try:
                handler(self._control, msg)(msg)
            except Exception as e:  # noqa: BLE001 - reported, the thread keeps serving
                if isinstance(msg, Fetch):
                    self.outbox.put(Fetched(msg.req_id, error=f"worker {self.rank}: fetch: {e}"))
                else:
                    traceback.print_exc()

    def _fetch(self, msg: Fetch) -> None:
        self.outbox.put(Fetched(msg.req_id, {s.request_id: s.to_bytes()
                                             for s in self._pop(msg.rids)}))

    def _drop(self, msg: Drop) -> None:
        self._pop(msg.rids)
        self.cancelled.difference_update(msg.rids)

    def _cancel(self, msg: Cancel) -> None:
        self.cancelled.update(msg.rids)

    def _serve_moves(self) -> None:
        while True:
            msg: SendState = self.moves.get()
            got = self._pop([msg.rid])
            parcel = (_parcel(f"move/{msg.transfer}", got[0]) if got else
                      Parcel(f"move/{msg.transfer}", lost=f"worker {self.rank}: no resident "
                                                          f"state for request {msg.rid!r}"))
            self.exchange.send(msg.dst, parcel)


def _parcel(key: str, st: EmuState) -> Parcel:
    """`st` for another worker: its header now, its payload's bytes after it (off the job's
    path: the job is charged the link's time from the model, see `exchange.py`)."""
    return Parcel(key, st.header(), trailer=len(st.payload))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _warm_up(models) -> None:
    from ..spec import GenSpec
    from .frames import encode

    encode(GenSpec("sd3-medium", 128, 128, steps=1), 1, bytes(32))
    if any(get_model(m).max_frames > 1 for m in models):
        encode(GenSpec("wan2.1-1.3b", 128, 128, frames=5, steps=1), 1, bytes(32))


def worker_main(rank: int, spec: WorkerSpec, world: Rendezvous, members: tuple[int, ...], inbox,
                ctl, outbox, device_index: int | None = None) -> None:
    """`parallel.worker_main.worker_main`'s emulated twin (same arguments)."""
    worker = EmuWorker(rank, spec, outbox)
    if worker.start(world, members, ctl):
        worker.serve(inbox)
