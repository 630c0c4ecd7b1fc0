"""The worker process: what it does with each message (`protocol.py`), and its resident states.

A worker runs the messages of its inbox in order, on its main thread (`Worker.serve`), each by the
handler of its type; a job (`Task.job`) likewise.  Every member of a job's group runs the same
steps (the forward is sharded inside, see `sequence.py`), so every member keeps a full copy of
each state it stepped, in `Store`.  A CFG-parallel run (`Run.cfg_split`, `cfg.py`) keeps that
so: each half of the set runs one branch of classifier-free guidance sharded over the half, the
two halves swap their predictions after every forward, and all members take the same scheduler
step.  A state leaves it when its request moves to another worker set
(straight to that set over torch.distributed, never through the driver: `transfer.py`), and goes
to disk only when the engine asks (a checkpoint: written by the worker's `saver.Saver` thread,
or, on a pool whose workers share no directory with the driver, sent to it as bytes).

A second thread (`Control`) serves the control queue while the main thread computes: fetch a
paused state (the old path of a move, through the driver), drop states, hand a `SendState` on to
the transfer thread (`transfer.Mover`, which sends the state to the job that takes it), and mark
requests cancelled; a cancel takes effect at the
next step boundary of the job that holds the request (at SP > 1 the group's first rank decides for
all, so every member drops the same request at the same step).  Both threads answer on the one
outbox (`channel.Sender` on one machine: it locks around each message).  Encoder threads
(`Encoder`: one for images, one for videos, started on first use) turn finished outputs into PNG /
MP4 files while the main thread goes on with the next job.  A heartbeat thread (`liveness.Pulse`)
reports the worker's progress counter, which the main thread bumps after every transformer block
(a forward hook), denoising step and message, so that the driver tells a slow step from a stuck
one (see `liveness.py`).

Errors of one request fail that request, not the job or the worker: a prepare that raises (bad
input), or a step that raises at degree 1 (the batch is retried one request at a time to find the
culprit; an out-of-memory error frees the cache first).  At SP > 1 an error fails the job, since
members cannot agree on a culprit without a collective that may be the thing that broke.

Only the worker process imports this module (torch at module level); the pools name `worker_main`
as the process's (or actor's) entry point without importing it first.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from functools import partial

import torch
import torch.distributed as dist

from ..models.base import CfgBranch, StepState
from ..spec import GenRequest
from .protocol import (Cancel, Decode, Done, Drop, Fetch, Fetched, JobError, JobLost, MakeGroups,
                       Moved, New, Noop, Output, OutputFormat, Prepare, Profile, Ready,
                       Rendezvous, Resident, Restart, Run, RunResult, Shutdown, StartFailed, Steps,
                       Stored, Task, handler)
from .protocol import Held, Incoming, SendState  # moves worker to worker (transfer.py)
from .cfg import cfg_layout
from .liveness import Pulse
from .saver import Saver
from .transfer import Links, Mover, Parcel, receive, share
from .ulysses import GroupCache
from .world import Abandoned, WorkerSpec, rendezvous


class Store:
    """Step states resident in this worker, keyed by request id; least recently used first out to
    host memory when the device runs short (CUDA only: on CPU the device is the host)."""

    def __init__(self, device: str, min_free_bytes: int):
        self.device, self.min_free_bytes = device, min_free_bytes
        self._dev = torch.device(device)
        self.states: dict[str, StepState] = {}
        self.lock = threading.Lock()

    def get(self, rid: str) -> StepState:
        with self.lock:
            st = self.states.get(rid)
        if st is None:
            raise KeyError(f"no resident state for request {rid!r}")
        # Only an offloaded state moves: `to` also drops the live scheduler, which the next step
        # would rebuild (milliseconds on small models).
        return st if st.latents.device == self._dev else st.to(self.device)

    def put(self, states: list[StepState]) -> None:
        with self.lock:
            for s in states:
                self.states.pop(s.request_id, None)
                self.states[s.request_id] = s  # most recently used last

    def pop(self, rids) -> list[StepState]:
        with self.lock:
            return [s for s in (self.states.pop(r, None) for r in rids) if s is not None]

    def offload(self, keep: set[str]) -> int:
        """Move paused states to host memory while free device memory is under the floor."""
        if not self.device.startswith("cuda"):
            return 0
        moved = 0
        with self.lock:
            for rid, s in list(self.states.items()):
                if torch.cuda.mem_get_info(self.device)[0] >= self.min_free_bytes:
                    break
                if rid not in keep and s.latents.device.type == "cuda":
                    self.states[rid] = s.to("cpu")
                    moved += 1
        return moved


class Worker:
    """One worker: its models, its resident states, its current world; a handler per message."""

    def __init__(self, rank: int, spec: WorkerSpec, outbox, device_index: int | None = None):
        self.rank, self.spec, self.outbox = rank, spec, outbox
        self.dev = "cpu" if spec.device == "cpu" else \
            f"{spec.device}:{rank if device_index is None else device_index}"
        self.backend = "gloo" if spec.device == "cpu" else "nccl"
        self.groups: GroupCache | None = None  # None: the current world was abandoned
        self.adapters: dict = {}
        self.sps: dict = {}
        self.store = Store(self.dev, spec.min_free_bytes)
        self.cancelled: set[str] = set()
        self.control: Control | None = None
        # The world, shared with the transfer thread (`Mover`): its prefix, the prefixes of the
        # worlds left, its transfer groups (None: abandoned), and a lock held while it changes.
        self.world, self.left = "", set()
        self.links: Links | None = None
        self.world_cv = threading.Condition()
        self.mover: Mover | None = None
        self.encoders: dict[str, Encoder] = {}  # "image" / "video", started on first use
        self.saver = Saver(rank, outbox)  # started on first use
        # Bumped by the main thread only; read by the heartbeat thread (`Pulse`).
        self.progress = 0
        self.pulse: Pulse | None = None
        self._inbox = {Task: self._task, MakeGroups: self._make_groups, Restart: self._restart}
        self._jobs = {Run: self._run, Prepare: self._prepare, Steps: self._steps,
                      Decode: self._decode, Profile: self._profile, Noop: self._noop}
        self._members = {New: self._new, Resident: self._resident, Held: self._held,
                         Incoming: self._incoming, Moved: self._moved, Stored: self._stored}

    # ----- life cycle -----
    def start(self, world: Rendezvous, members: tuple[int, ...], ctl) -> bool:
        """Join the first world, load the models, start serving `ctl`, tell the driver.  False:
        the models did not load (the driver was told why)."""
        from ..models import load_preset
        from .sequence import install_model

        torch.set_num_threads(int(os.environ.get("GENSERVE_WORKER_THREADS", "1")))
        if self.spec.loopback:  # all workers on this machine: gloo's sockets stay on loopback
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        if self.spec.heartbeat_s:  # from now on: start-up (joining, loading) can take minutes
            self.pulse = Pulse(self.rank, self.outbox, self.spec.heartbeat_s,
                               lambda: self.progress)
            self.pulse.start()
        self._enter(world, members)
        try:
            self.adapters = {p: load_preset(p, self.spec.model_path, self.dev)
                             for p in self.spec.presets}
            self.sps = {p: install_model(ad) for p, ad in self.adapters.items()}
            for ad in self.adapters.values():
                _count_progress(ad.pipe, self._bump)
        except Exception as e:  # noqa: BLE001 - e.g. a bad checkpoint path: tell the driver
            self.outbox.put(StartFailed(self.rank, f"worker {self.rank} could not start: {e}"))
            return False
        self.control = Control(self, ctl)
        self.control.start()
        self.mover = Mover(self)
        self.mover.start()
        self.outbox.put(Ready(self.rank))
        return True

    def serve(self, inbox) -> None:
        """Run the inbox's messages until `Shutdown`."""
        while not isinstance(msg := inbox.get(), Shutdown):
            handler(self._inbox, msg)(msg)
            self._bump()
        if self.pulse is not None:
            self.pulse.stop()
        self.control.stop()
        self.mover.stop()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _enter(self, world: Rendezvous, members) -> None:
        """Leave the current world (if any) and join the one of `members` at `world`, under the
        world lock: the transfer thread never sends on a group being destroyed."""
        with self.world_cv:
            if self.world:
                self.left.add(self.world)
            if dist.is_initialized():
                dist.destroy_process_group()
            self.groups, self.links = self._join(world, members)
            self.world = world.prefix
            self.world_cv.notify_all()

    def _join(self, world: Rendezvous, members) -> tuple[GroupCache | None, Links | None]:
        """The new world's groups and transfer groups (every member makes these right after the
        world forms, in one order); None: it was abandoned, a newer one is on its way."""
        try:
            rendezvous(world, self.rank, tuple(members), self.backend, self.spec.timeout_s,
                       tick=self._bump)
            return GroupCache(members), Links(members, self.spec.timeout_s)
        except Abandoned:
            return None, None
        except Exception:  # noqa: BLE001 - a member never came: die, the pool replaces this one
            traceback.print_exc()
            os._exit(3)

    def _bump(self) -> None:
        self.progress += 1

    # ----- the inbox -----
    def _restart(self, msg: Restart) -> None:
        """A member was lost (or comes back): every survivor joins the new world."""
        self._enter(msg.rendezvous, msg.members)

    def _make_groups(self, msg: MakeGroups) -> None:
        # Every member of the world, in one order (see GroupCache); none in a world that never
        # formed (its tasks that need a group are answered lost).
        if self.groups is not None:
            for ranks in msg.sets:
                self.groups.make(ranks)

    def _task(self, t: Task) -> None:
        first = self.rank == t.ranks[0]
        if self.groups is None and len(t.ranks) > 1:
            # Sent to a world that never formed: no group to run it on.  Every member is in the
            # same case (the decision is shared); the first one answers for the job.
            if first:
                self.outbox.put(JobLost(t.job_id, f"worker {self.rank}: its world was abandoned "
                                                  "before it formed (a member died)"))
            return
        try:
            out = handler(self._jobs, t.job)(t.ranks, t.job)
            if first:
                self.outbox.put(Done(t.job_id, out))
        except ValueError as e:  # bad input (ModelInputError is one): the message says it all
            self.outbox.put(JobError(t.job_id, f"worker {self.rank}: {e}"))
        except Exception as e:  # noqa: BLE001 - reported to the driver; the worker stays up
            self.outbox.put(JobError(t.job_id, f"worker {self.rank}: {type(e).__name__}: {e}\n"
                                               f"{traceback.format_exc(limit=3)}"))

    # ----- jobs -----
    def _adapter(self, model: str):
        try:
            return self.adapters[model]
        except KeyError:
            raise ValueError(f"model={model!r}: not served by these workers "
                             f"(they hold {', '.join(self.adapters)})") from None

    def _group_of(self, ranks: tuple[int, ...]):
        return None if len(ranks) == 1 else self.groups.get(ranks)

    def _load(self, blobs) -> list[StepState]:
        return [StepState.from_bytes(b).to(self.dev) for b in blobs]

    def _noop(self, ranks, job: Noop):
        return bytes(job.reply_bytes) if job.reply_bytes else None

    def _prepare(self, ranks, job: Prepare) -> list[bytes]:
        return [s.to_bytes() for s in self._adapter(job.model).prepare(list(job.requests))]

    def _decode(self, ranks, job: Decode) -> list:
        states = self._load(job.states)
        return self._adapter(states[0].model).decode(states)

    def _steps(self, ranks, job: Steps) -> list[bytes] | None:
        states = self._load(job.states)
        adapter = self._adapter(states[0].model)
        with self.sps[adapter.name].use(self._group_of(ranks)):
            for _ in range(job.n):
                adapter.step(states)
                self._bump()
        return [s.to_bytes() for s in states] if self.rank == ranks[0] else None

    def _profile(self, ranks, job: Profile):
        from ..profiler import profile  # the measurement only: it imports no pool

        return profile(list(job.presets), job.batches, job.reps, device=self.dev,
                       adapters=self.adapters)

    # A run job's member: its state, or None if it failed or was lost (noted in `out`).
    def _take(self, job: Run, ranks: tuple[int, ...], out: RunResult) -> list[StepState]:
        """Every member is taken even after one raised (it raises after): a move's sender waits
        for its receive, and the group's broadcasts must stay in step (see `transfer.py`)."""
        states, error = [], None
        for m in job.members:
            try:
                states.append(handler(self._members, m)(m, job, ranks, out))
            except Exception as e:  # noqa: BLE001 - raised once every member was taken
                error = error or e
        if error is not None:
            raise error
        return [s for s in states if s is not None]

    def _new(self, m: New, job: Run, ranks, out: RunResult) -> StepState | None:
        try:  # encoded here, so the driver never waits for it
            state = self._adapter(job.model).prepare([GenRequest(m.rid, m.spec)])[0]
        except Exception as e:  # noqa: BLE001 - bad input fails this request only
            out.failed[m.rid] = _reason(e)
            return None
        _pad(self.spec.faults, state)
        return state

    def _resident(self, m: Resident, job: Run, ranks, out: RunResult) -> StepState:
        return self.store.get(m.rid)

    def _held(self, m: Held, job: Run, ranks, out: RunResult) -> StepState | None:
        """Rank `m.src` of the job holds the state: it broadcasts it to the others."""
        if len(ranks) == 1:
            return self._resident(Resident(m.rid), job, ranks, out)
        mine = parcel = None
        if self.rank == m.src:
            try:
                mine = self.store.get(m.rid)
                parcel = Parcel.of(mine, self.dev)
            except KeyError as e:
                parcel = Parcel.lost(f"worker {self.rank}: {e}")
        parcel = share(parcel, self.groups.world_rank(m.src), self._group_of(ranks), self.dev)
        return self._arrived(m.rid, parcel, out, mine)

    def _incoming(self, m: Incoming, job: Run, ranks, out: RunResult) -> StepState | None:
        """The state comes from worker `m.src`: the first rank receives it (this job waits for
        it, the driver does not), and shares it with the others of the group."""
        parcel = None
        if self.rank == ranks[0]:
            parcel = receive(self.links, m.src, self.rank, m.transfer, self.dev)
        if len(ranks) > 1:
            parcel = share(parcel, self.groups.world_rank(ranks[0]), self._group_of(ranks),
                           self.dev)
        return self._arrived(m.rid, parcel, out)

    def _arrived(self, rid: str, parcel: Parcel, out: RunResult,
                 mine: StepState | None = None) -> StepState | None:
        why = parcel.why_lost
        if why is not None:  # every member of the group sees the same parcel
            out.lost[rid] = why
            self.store.pop([rid])  # no stale copy outlives it
            return None
        return mine if mine is not None else parcel.state()

    def _moved(self, m: Moved, job: Run, ranks, out: RunResult) -> StepState:
        return StepState.from_bytes(m.state).to(self.dev)

    def _stored(self, m: Stored, job: Run, ranks, out: RunResult) -> StepState | None:
        """Every rank reads the same file, so all agree whether it is usable."""
        try:
            with open(m.path, "rb") as f:
                st = StepState.from_bytes(f.read())
            if st.request_id != m.rid:
                raise ValueError(f"it holds request {st.request_id!r}")
        except Exception as e:  # noqa: BLE001 - gone or damaged: the request starts over
            out.lost[m.rid] = f"worker {self.rank}: checkpoint {m.path}: {_reason(e)}"
            return None
        return st.to(self.dev)

    def _run(self, ranks: tuple[int, ...], job: Run) -> RunResult:
        """The engine's job: take each member's state, run up to `job.steps` steps, decode the
        finished ones; keep the rest resident."""
        out = RunResult()
        states = self._take(job, ranks, out)
        adapter = self._adapter(job.model)
        group = self._group_of(ranks)  # every member's: broadcasts of states and cancels
        src = 0 if group is None else self.groups.world_rank(ranks[0])  # no world needed alone
        sp_group, branch = self._cfg_branch(ranks) if job.cfg_split else (group, None)
        with self.sps[adapter.name].use(sp_group):
            for _ in range(job.steps):
                states = _drop_cancelled(states, self.cancelled, src, group, out)
                if not states:
                    break
                states = _step(adapter, states, self.spec.faults, self.rank, len(ranks), out,
                               branch)
                self._bump()
        done = [s for s in states if s.done]
        self.store.put([s for s in states if not s.done])
        self.store.pop([*out.failed, *out.cancelled, *(s.request_id for s in done)])
        self.cancelled.difference_update(out.cancelled)
        self.store.offload({s.request_id for s in states})
        if self.rank != ranks[0]:
            return out
        out.steps.update({s.request_id: s.step_index for s in states})
        for s in states:
            if s.request_id in job.want and not s.done:
                # The bytes are taken now: the next job steps the state in place.
                if job.save:
                    self.saver.save(job.save, s.request_id, s.step_index, s.to_bytes())
                else:
                    out.blobs[s.request_id] = s.to_bytes()
        if done:
            try:
                decoded = adapter.decode(done)
            except Exception as e:  # noqa: BLE001
                for s in done:
                    out.failed[s.request_id] = "decode: " + _reason(e)
            else:
                for s, array in zip(done, decoded):
                    if job.output is None:  # raw: the arrays travel in the result
                        out.outputs[s.request_id] = array
                    else:  # encoded apart; the result goes back now (see `Encoder`)
                        self._encode(s.request_id, array, job.output)
        return out

    def _cfg_branch(self, ranks: tuple[int, ...]) -> tuple[object | None, CfgBranch]:
        """A CFG-parallel run (`cfg_layout`): the Ulysses group of this rank's half (None: a
        half of one), and its branch, which swaps predictions with its partner over the whole
        set's group (no group per pair: see `_swap`)."""
        layout = cfg_layout(ranks)
        whole = self.groups.get(ranks)
        partner = layout.partner(self.rank)
        peer = dist.get_group_rank(whole, self.groups.world_rank(partner))
        branch = CfgBranch(layout.is_cond(self.rank), partial(_swap, whole, peer))
        return self._group_of(layout.half(self.rank)), branch

    def _encode(self, rid: str, array, fmt: OutputFormat) -> None:
        # Images never queue behind a video's encode (seconds): a lane each.
        lane = "video" if array.ndim == 4 else "image"
        if lane not in self.encoders:
            self.encoders[lane] = Encoder(self, lane)
            self.encoders[lane].start()
        self.encoders[lane].todo.put((rid, array, fmt))


class Control(threading.Thread):
    """Serves the control queue while the main thread computes, until `Shutdown`."""

    def __init__(self, worker: Worker, ctl):
        super().__init__(daemon=True, name=f"genserve-control-{worker.rank}")
        self.worker, self.ctl = worker, ctl
        self._handlers = {Fetch: self._fetch, Drop: self._drop, Cancel: self._cancel,
                          SendState: self._send_state}

    def run(self) -> None:
        while not isinstance(msg := self.ctl.get(), Shutdown):
            try:
                handler(self._handlers, msg)(msg)
            except Exception as e:  # noqa: BLE001 - reported, the thread keeps serving
                if isinstance(msg, Fetch):
                    self.worker.outbox.put(Fetched(msg.req_id, error=f"worker "
                                                   f"{self.worker.rank}: fetch: {e}"))
                else:
                    traceback.print_exc()

    def stop(self) -> None:
        # Let the thread take its Shutdown and end: a daemon thread still reading its queue while
        # the interpreter shuts down prints a traceback.
        self.ctl.put(Shutdown())
        self.join(timeout=5)

    def _send_state(self, msg: SendState) -> None:  # served by the transfer thread, in order
        self.worker.mover.put(msg)

    def _fetch(self, msg: Fetch) -> None:  # the states leave this worker
        states = {s.request_id: s.to_bytes() for s in self.worker.store.pop(msg.rids)}
        self.worker.outbox.put(Fetched(msg.req_id, states))

    def _drop(self, msg: Drop) -> None:
        self.worker.store.pop(msg.rids)
        self.worker.cancelled.difference_update(msg.rids)

    def _cancel(self, msg: Cancel) -> None:
        self.worker.cancelled.update(msg.rids)


class Encoder(threading.Thread):
    """Encodes finished outputs (PNG / MP4, `models.output.encode`) one after another and sends
    each to the driver as an `Output`: only the file crosses processes, never the frames.

    Why a thread of its own: a video's encode takes seconds of CPU.  Done on the main thread, it
    would hold the run's GPUs that long; here the run's `Done` goes back right after decode, the
    driver frees the GPUs and may send the next job, which the main thread runs meanwhile.  The
    driver keeps the request unfinished (off the GPUs) until its `Output` arrives, and runs it
    again from its checkpoint if this process dies first.  `Done` and `Output` may reach the
    driver in either order (two threads put them; on Ray, two calls to its queue), and it accepts
    both.  One thread per lane (images, videos), so that an
    image never waits for a video's encode; within a lane, outputs go out in the order decoded."""

    def __init__(self, worker: Worker, lane: str = "any"):
        super().__init__(daemon=True, name=f"genserve-encoder-{worker.rank}-{lane}")
        self.worker = worker
        self.todo: queue.SimpleQueue = queue.SimpleQueue()  # (rid, array, OutputFormat)

    def run(self) -> None:
        from ..models.output import encode

        w = self.worker
        while True:
            rid, array, fmt = self.todo.get()
            try:
                _inject_encode(w.spec.faults, rid, w.rank)
                enc = encode(array, fmt.fps)
                msg = Output(rid, enc.data, enc.media_type)
            except Exception as e:  # noqa: BLE001 - that request fails, the thread goes on
                msg = Output(rid, error=f"encode: {_reason(e)}")
            del array  # the frames go before the next wait: a video is hundreds of MB
            w.outbox.put(msg)


def worker_main(rank: int, spec: WorkerSpec, world: Rendezvous, members: tuple[int, ...], inbox,
                ctl, outbox, device_index: int | None = None) -> None:
    """Serve as global rank `rank` of the world of `members`, meeting at `world`: read messages
    from `inbox` (main thread) and `ctl` (control thread) until `Shutdown`, answer on `outbox`
    (anything with a thread-safe `put`).  `device_index`: the CUDA device to use (default: `rank`,
    one machine; Ray gives each actor one visible GPU, index 0)."""
    worker = Worker(rank, spec, outbox, device_index)
    if worker.start(world, members, ctl):
        worker.serve(inbox)


# ----- a run job's steps -----
def _drop_cancelled(states, cancelled: set, src: int, group, out: RunResult) -> list[StepState]:
    """`src`: the world rank of the job's first member, whose view wins."""
    if not cancelled and group is None:
        return states
    flags = [s.request_id in cancelled for s in states]
    if group is not None:  # the first rank's view wins, so every member drops the same requests
        t = torch.tensor(flags, dtype=torch.uint8)
        dist.broadcast(t, src=src, group=group)
        flags = [bool(x) for x in t.tolist()]
    keep = []
    for s, f in zip(states, flags):
        if f:
            out.cancelled[s.request_id] = s.step_index
        else:
            keep.append(s)
    return keep


def _swap(group, peer: int, mine: torch.Tensor) -> torch.Tensor:
    """Give this branch's noise prediction to rank `peer` of `group` (the whole CFG-parallel set)
    and return `peer`'s: every rank of the set swaps with its partner in one all-to-all whose
    only non-empty parts are the partners'.  A 2-rank group per pair would be a `new_group`
    (collective over the whole world, and on GPUs a communicator each) for every pair of every
    set the scheduler splits."""
    flat = mine.contiguous().view(-1)
    sizes = [0] * dist.get_world_size(group)
    sizes[peer] = flat.numel()
    out = torch.empty_like(flat)
    dist.all_to_all_single(out, flat, output_split_sizes=sizes, input_split_sizes=sizes,
                           group=group)
    return out.view(mine.shape)


def _step(adapter, states, faults: dict, rank: int, degree: int, out: RunResult,
          branch: CfgBranch | None = None) -> list[StepState]:
    """One step of the batch; at degree 1 a failure is pinned on the request(s) that cause it
    (a CFG-parallel step has a peer, so it is never at degree 1)."""
    before = {s.request_id: s.step_index for s in states}
    try:
        if faults:
            _inject(faults, states, rank)
        adapter.step(states, branch)
        return states
    except Exception as e:  # noqa: BLE001
        if degree > 1:
            raise
        if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(states) == 1:
            out.failed[states[0].request_id] = _reason(e)
            return []
    keep = []
    for s in states:
        try:
            if s.step_index == before[s.request_id]:  # not advanced by the failed batch step
                if faults:
                    _inject(faults, [s], rank)
                adapter.step([s], branch)
            keep.append(s)
        except Exception as e:  # noqa: BLE001
            out.failed[s.request_id] = _reason(e)
    return keep


class _Fault(Exception):
    pass


def _pad(faults: dict, state: StepState) -> None:
    """Bench hook (bench/data_path.py): {"kind": "ballast", "step": "prepare", "tensors": {name:
    (shape, dtype name)}} adds zero tensors of those shapes to a new request's state, on its live
    scheduler, so that they travel with the state everywhere and no step reads them: a state the
    size of a large model's on a tiny one."""
    f = faults.get(state.request_id)
    if f and f.get("kind") == "ballast":
        state.scheduler.genserve_ballast = {
            n: torch.zeros(shape, dtype=getattr(torch, dt), device=state.latents.device)
            for n, (shape, dt) in f["tensors"].items()}


def _inject(faults: dict, states: list[StepState], rank: int) -> None:
    """Test hook: fail a request at a given step, as configured when the pool started ("hang":
    the main thread blocks for good, as in a deadlock, while the heartbeat thread goes on)."""
    for s in states:
        f = faults.get(s.request_id)
        if f and f["step"] == s.step_index and f.get("rank", rank) == rank:
            if f["kind"] == "oom":
                raise torch.OutOfMemoryError(f"injected out-of-memory at step {s.step_index}")
            if f["kind"] == "exit":
                os._exit(17)
            if f["kind"] == "hang":
                threading.Event().wait()
            raise _Fault(f"injected error at step {s.step_index}")


def _inject_encode(faults: dict, rid: str, rank: int) -> None:
    """Test hook: {"kind": "exit" | "error" | "slow", "step": "encode", "seconds": s} waits `s`
    seconds into encoding `rid`'s output (the run's `Done` has gone by then), then kills the
    worker, fails the request, or goes on."""
    f = faults.get(rid)
    if f and f["step"] == "encode" and f.get("rank", rank) == rank:
        time.sleep(f.get("seconds", 0.0))
        if f["kind"] == "exit":
            os._exit(17)
        if f["kind"] == "error":
            raise _Fault("injected error while encoding")


def _count_progress(pipe, bump) -> None:
    """Bump the progress counter after each part of each model of `pipe` runs: the direct
    children of the transformer, the VAE and the text encoders, and the items of their module
    lists (the transformer's blocks).  A step of a large model can take longer than the hang
    timeout; a block cannot, and a few dozen hooks per forward cost microseconds."""
    def hook(module, args, output):
        bump()

    for comp in pipe.components.values():
        if not isinstance(comp, torch.nn.Module):
            continue
        for child in comp.children():
            parts = list(child) if isinstance(child, torch.nn.ModuleList) else [child]
            for part in parts:
                part.register_forward_hook(hook)


def _reason(e: Exception) -> str:
    if isinstance(e, torch.OutOfMemoryError):
        return f"out_of_memory: {e}"
    return f"{type(e).__name__}: {e}"
