"""The worker process: one per device, holding the models and the step states resident on it.

A worker runs the jobs of its inbox in order, on its main thread.  Every member of a job's group
runs the same steps (the forward is sharded inside, see `sequence.py`), so every member keeps a full
copy of each state it stepped, in `Store`; the engine then only sends a state when a request moves
to another worker set, and receives one only when it asks (a host-side checkpoint, a move).

A second thread serves the control queue while the main thread computes: fetch a paused state
(for a move), drop states, and mark requests cancelled; a cancel takes effect at the next step
boundary of the job that holds the request (at SP > 1 the group's first rank decides for all, so
every member drops the same request at the same step).

Errors of one request fail that request, not the job or the worker: a prepare that raises (bad input),
or a step that raises at degree 1 (the batch is retried one request at a time to find the culprit;
an out-of-memory error frees the cache first).  At SP > 1 an error fails the job, since members
cannot agree on a culprit without a collective that may be the thing that broke.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta

from ..models.base import StepState

RESTART = "__restart__"  # inbox job kind: leave the old process group, join a new world


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker of a pool loads and how it behaves; plain data, sent to each process.

    `faults` is a test hook: {request_id: {"kind": "oom"|"error"|"exit", "step": k, "rank": r}}.
    `min_free_bytes`: on CUDA, paused states go to host memory below this much free memory."""

    presets: tuple[str, ...]
    model_path: str | None = None
    device: str = "cpu"
    timeout_s: float = 60.0
    faults: dict = field(default_factory=dict)
    min_free_bytes: int = 2 << 30


class Abandoned(Exception):
    """The driver gave this world up before it formed: a member died before coming."""


def rendezvous(init, rank: int, members: tuple[int, ...], backend: str, timeout_s: float) -> None:
    """Join the world of `members` (global ranks, in world-rank order).  `init` is
    ("store", host, port, prefix): a TCPStore the driver hosts, with a fresh prefix for each
    world, so a re-formed world never sees the old one's keys.

    The members meet first, and the world forms only if the store's one `decision`
    key says "formed" (set by whoever sees every member arrived).  The driver sets it to
    "abandoned" when it re-forms again before that (a second member died meanwhile); the members
    then raise `Abandoned` and wait for the next world, instead of waiting for the dead one until
    the timeout (and then dying too).  The compare-and-set makes every member take the same side."""
    import torch.distributed as dist

    kw = dict(rank=members.index(rank), world_size=len(members),
              timeout=timedelta(seconds=timeout_s))
    _, host, port, prefix = init
    store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    world = dist.PrefixStore(prefix, store)
    world.set(f"arrived/{rank}", "1")
    everyone = [f"arrived/{m}" for m in members]
    deadline = time.monotonic() + timeout_s
    while True:
        if world.check(everyone):
            world.compare_set("decision", "", "formed")
        if world.check(["decision"]):
            if world.get("decision") != b"formed":
                raise Abandoned(prefix)
            break
        if time.monotonic() > deadline:
            missing = [m for m in members if not world.check([f"arrived/{m}"])]
            raise TimeoutError(f"worker(s) {missing} never came to world {prefix!r}")
        time.sleep(0.02)
    dist.init_process_group(backend, store=dist.PrefixStore("pg/", world), **kw)


def abandon(store, prefix: str) -> bool:
    """The driver's side of `rendezvous`: give up the world of `prefix` unless it formed already.
    Returns whether it was abandoned."""
    import torch.distributed as dist

    world = dist.PrefixStore(prefix, store)
    return world.compare_set("decision", "", "abandoned") == b"abandoned"


class Store:
    """Step states resident in this worker, keyed by request id; least recently used first out to
    host memory when the device runs short (CUDA only: on CPU the device is the host)."""

    def __init__(self, device: str, min_free_bytes: int):
        import torch

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
        import torch

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


def _control_loop(ctl, outbox, store: Store, cancelled: set, rank: int) -> None:
    while True:
        msg = ctl.get()
        if msg is None:
            return
        op, req_id, rids = msg
        try:
            if op == "fetch":  # for a move: the state leaves this worker
                outbox.put(("ctl", req_id, {s.request_id: s.to_bytes() for s in store.pop(rids)}))
            elif op == "drop":
                store.pop(rids)
                cancelled.difference_update(rids)
            elif op == "cancel":
                cancelled.update(rids)
        except Exception as e:  # noqa: BLE001 - reported, the thread keeps serving
            outbox.put(("ctl", req_id, RuntimeError(f"worker {rank}: {op}: {e}")))


class _Fault(Exception):
    pass


def _inject(faults: dict, states: list[StepState], rank: int) -> None:
    """Test hook: fail a request at a given step, as configured when the pool started."""
    import torch

    for s in states:
        f = faults.get(s.request_id)
        if f and f["step"] == s.step_index and f.get("rank", rank) == rank:
            if f["kind"] == "oom":
                raise torch.OutOfMemoryError(f"injected out-of-memory at step {s.step_index}")
            if f["kind"] == "exit":
                os._exit(17)
            raise _Fault(f"injected error at step {s.step_index}")


def _reason(e: Exception) -> str:
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return f"out_of_memory: {e}"
    return f"{type(e).__name__}: {e}"


def worker_main(rank: int, spec: WorkerSpec, init, members: tuple[int, ...], inbox, ctl, outbox,
                device_index: int | None = None) -> None:
    """Serve jobs as global rank `rank` of the world `members`.  `device_index`: the CUDA device
    to use (default: `rank`, one machine; Ray gives each actor one visible GPU, index 0)."""
    import torch
    import torch.distributed as dist

    from ..models import load_preset
    from .sequence import install
    from .ulysses import GroupCache

    torch.set_num_threads(int(os.environ.get("GENSERVE_WORKER_THREADS", "1")))
    faults = spec.faults
    dev = "cpu" if spec.device == "cpu" else \
        f"{spec.device}:{rank if device_index is None else device_index}"
    backend = "gloo" if spec.device == "cpu" else "nccl"

    def join(init_, members_) -> GroupCache | None:
        """The new world's groups; None: it was abandoned, a newer one is on its way."""
        try:
            rendezvous(init_, rank, tuple(members_), backend, spec.timeout_s)
        except Abandoned:
            return None
        except Exception:  # noqa: BLE001 - a member never came: die, the pool replaces this one
            traceback.print_exc()
            os._exit(3)
        return GroupCache(members_)

    groups = join(init, members)
    try:
        adapters = {p: load_preset(p, spec.model_path, dev) for p in spec.presets}
        sps = {p: install(ad.transformer) for p, ad in adapters.items()}
    except Exception as e:  # e.g. a bad checkpoint path: tell the driver, then exit
        outbox.put(("failed", rank, f"worker {rank} could not start: {e}"))
        return
    store = Store(dev, spec.min_free_bytes)
    cancelled: set[str] = set()
    ctl_thread = threading.Thread(target=_control_loop, daemon=True,
                                  args=(ctl, outbox, store, cancelled, rank))
    ctl_thread.start()
    outbox.put(("ready", rank, None))

    def group_of(ranks):
        return None if len(ranks) == 1 else groups.get(ranks)

    def run(ranks, p) -> dict:
        """The engine's job: prepare new requests, take the others from the payload or the store,
        run up to n steps, decode the finished ones; keep the rest resident."""
        out = {"steps": {}, "failed": {}, "cancelled": {}, "blobs": {}, "outputs": {}}
        states = []
        for rid, src in p["members"]:
            if src is None:
                states.append(store.get(rid))
            elif isinstance(src, bytes):
                states.append(StepState.from_bytes(src).to(dev))
            else:  # a GenRequest: encode here, so the driver never waits for it
                try:
                    states.append(_adapter(adapters, p["model"]).prepare([src])[0])
                except Exception as e:  # noqa: BLE001 - bad input fails this request only
                    out["failed"][rid] = _reason(e)
        adapter = _adapter(adapters, p["model"])
        group = group_of(ranks)
        src = 0 if group is None else groups.world_rank(ranks[0])  # no world needed alone
        with sps[adapter.name].use(group):
            for _ in range(p["n"]):
                states = _drop_cancelled(states, cancelled, src, group, out, dist, torch)
                if not states:
                    break
                states = _step(adapter, states, faults, rank, len(ranks), out, torch)
        done = [s for s in states if s.done]
        store.put([s for s in states if not s.done])
        store.pop([*out["failed"], *out["cancelled"], *(s.request_id for s in done)])
        cancelled.difference_update(out["cancelled"])
        store.offload({s.request_id for s in states})
        if rank != ranks[0]:
            return out
        out["steps"] = {s.request_id: s.step_index for s in states}
        want = set(p.get("want", ()))
        out["blobs"] = {s.request_id: s.to_bytes() for s in states
                        if s.request_id in want and not s.done}
        if done:
            try:
                out["outputs"] = dict(zip([s.request_id for s in done], adapter.decode(done)))
            except Exception as e:  # noqa: BLE001
                for s in done:
                    out["failed"][s.request_id] = "decode: " + _reason(e)
        return out

    while True:
        job = inbox.get()
        if job is None:
            break
        job_id, kind, ranks, payload = job
        try:
            if kind == RESTART:  # a member was lost: every survivor joins the new world
                if dist.is_initialized():
                    dist.destroy_process_group()
                groups = join(*payload)
                continue
            if groups is None and (kind == "group" or len(ranks) > 1):
                # Sent to a world that never formed: no group to run it on.  Every member is in
                # the same case (the decision is shared); the first one answers for the job.
                if kind != "group" and rank == ranks[0]:
                    outbox.put(("lost", job_id, f"worker {rank}: its world was abandoned "
                                                "before it formed (a member died)"))
                continue
            if kind == "group":  # every member of the world, in one order (see GroupCache)
                groups.make(payload)
                continue
            if kind == "run":
                out = run(ranks, payload)
            elif kind == "noop":  # a round trip, to measure dispatch cost
                out = None
            elif kind == "prepare":
                model, reqs = payload
                out = [s.to_bytes() for s in _adapter(adapters, model).prepare(reqs)]
            elif kind == "decode":
                states = [StepState.from_bytes(b).to(dev) for b in payload]
                out = _adapter(adapters, states[0].model).decode(states)
            elif kind == "steps":
                blobs, n = payload[:2]
                states = [StepState.from_bytes(b).to(dev) for b in blobs]
                adapter = _adapter(adapters, states[0].model)
                with sps[adapter.name].use(group_of(ranks)):
                    for _ in range(n):
                        adapter.step(states)
                out = [s.to_bytes() for s in states] if rank == ranks[0] else None
            elif kind == "profile":
                from ..profiler import profile
                presets_, batches, reps = payload
                out = profile(presets_, batches, reps, device=dev, adapters=adapters)
            else:
                raise ValueError(f"unknown job kind {kind!r}")
            if rank == ranks[0]:
                outbox.put(("done", job_id, out))
        except ValueError as e:  # bad input (ModelInputError is one): the message says it all
            outbox.put(("error", job_id, f"worker {rank}: {e}"))
        except Exception as e:  # reported to the driver; the worker stays up
            outbox.put(("error", job_id, f"worker {rank}: {type(e).__name__}: {e}\n"
                                         f"{traceback.format_exc(limit=3)}"))
    ctl.put(None)
    # Let the control thread take its None and end: a daemon thread still reading its queue
    # while the interpreter shuts down prints a traceback.
    ctl_thread.join(timeout=5)
    if dist.is_initialized():
        dist.destroy_process_group()


def _drop_cancelled(states, cancelled, src: int, group, out, dist, torch):
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
            out["cancelled"][s.request_id] = s.step_index
        else:
            keep.append(s)
    return keep


def _step(adapter, states, faults, rank, degree, out, torch) -> list[StepState]:
    """One step of the batch; at degree 1 a failure is pinned on the request(s) that cause it."""
    before = {s.request_id: s.step_index for s in states}
    try:
        if faults:
            _inject(faults, states, rank)
        adapter.step(states)
        return states
    except Exception as e:  # noqa: BLE001
        if degree > 1:
            raise
        if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(states) == 1:
            out["failed"][states[0].request_id] = _reason(e)
            return []
    keep = []
    for s in states:
        try:
            if s.step_index == before[s.request_id]:  # not advanced by the failed batch step
                if faults:
                    _inject(faults, [s], rank)
                adapter.step([s])
            keep.append(s)
        except Exception as e:  # noqa: BLE001
            out["failed"][s.request_id] = _reason(e)
    return keep


def _adapter(adapters: dict, model: str):
    try:
        return adapters[model]
    except KeyError:
        raise ValueError(f"model={model!r}: not served by these workers "
                         f"(they hold {', '.join(adapters)})") from None
