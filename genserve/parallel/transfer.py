"""States move worker to worker over torch.distributed point-to-point, never through the driver.

A move (a paused request planned on a worker set that does not hold its state) has two halves:

- the holder's: the driver sends it `SendState(rid, dst, transfer, world)` on its control queue;
  the control thread hands it to the worker's `Mover`, a thread of its own, which pops the state
  from the `Store` and sends it to `dst`.  Not the control thread: a send waits until its receiver
  takes it, and cancels, drops and fetches must not wait behind it.  Not the main thread: it may
  be computing another job.
- the receiver's: the job's `Incoming(rid, src, transfer)` member.  The job's first rank receives
  on its main thread, inside the job, so the job waits for its state (not the driver's loop, which
  only sent two messages); at SP > 1 it then broadcasts it in the job's group, so every member
  holds a copy.  A job whose set overlaps the holders gets `Held(rid, src)` instead: its own rank
  `src` broadcasts its copy, no transfer.

Wire format of one state: the metadata's length (one int64), the metadata (a pickle, as uint8: the
state's fields, each tensor of the device replaced by a `_Slot` giving its shape and dtype, small
host tensors inline), then each slotted tensor's bytes, all on the worker's device (on NCCL the
tensors never visit the host; a state offloaded to host memory goes back to the device first).
A holder that has no state to send sends a notice of why instead, so its receiver is never left
waiting: the member is then reported lost (the engine rolls it back to its checkpoint).

Groups: every world makes two transfer groups of all its members when it forms (every member, in
one order, right after `init_process_group`): `up` carries moves from a lower world rank to a
higher one, `down` the others.  On a pair's communicator one side then only sends (its Mover) and
the other only receives (its main thread): no communicator is used by two threads of a process,
and two workers swapping states never queue a send and a receive behind each other on one NCCL
stream.

Order.  On gloo every transfer has its own tag (its id), so a receive takes its own transfer and
nothing else.  NCCL has no tags: a pair's sends and receives match in the order they are issued.
That order is the same at both ends because both follow the driver's single order: it submits a
job and then sends the job's `SendState`s, assignment after assignment; a holder's Mover serves
them as they came (the control queue and the Mover's queue are FIFO), and a receiver runs its jobs
in inbox order and a job's members in order.  So the k-th send from A to B is the k-th receive
from A on B.  Both ends must therefore always take part: a holder without the state sends the
notice, and a job takes every `Incoming` member even when another member failed first.  A chain
of waits cannot close into a cycle either: each wait is on something the driver issued earlier.

Failures.  A dead peer's socket closes and gloo raises at once; any other wait ends at the world's
collective timeout (the groups are made with it).  A holder whose world was left (a `Restart` came
first) or abandoned sends nothing: its receiver runs the job in that same world, where the holder's
group is gone (closed socket: lost) or never formed (the job answers the member lost at once).
On CUDA the Mover sets its own current device, and sends on the default stream, so a send is
ordered after the kernels that last wrote the state.
"""

from __future__ import annotations

import math
import pickle
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from functools import cached_property
from datetime import timedelta
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist

from ..models.base import StepState
from .protocol import SendState

# Host tensors under this size ride inside the metadata pickle (gloo: fewer round trips for the
# scheduler's small tensors); on CUDA every host tensor does (it is small: generator, sigmas).
SMALL = 64 << 10
_FIELDS = ("request_id", "model", "height", "width", "frames", "steps", "guidance", "step_index")
_TAG = (1 << 31) - 1  # gloo tags are 32-bit


class _Slot(NamedTuple):
    """Where a tensor of the state was: the `index`-th tensor sent after the metadata."""

    index: int
    shape: tuple
    dtype: torch.dtype


@dataclass
class Parcel:
    """One state as it travels: the metadata pickle, its tensors as flat uint8 (on the device)."""

    meta: bytes
    tensors: list

    @classmethod
    def of(cls, state: StepState, device) -> "Parcel":
        dev = torch.device(device)
        tensors: list = []

        def flat(x):
            if not isinstance(x, torch.Tensor) or (
                    x.device.type == "cpu" and (dev.type != "cpu" or x.nbytes < SMALL)):
                return x  # inline in the pickle
            tensors.append(x.detach().reshape(-1).view(torch.uint8))
            return _Slot(len(tensors) - 1, tuple(x.shape), x.dtype)

        payload = {k: getattr(state, k) for k in _FIELDS}
        payload.update(latents=state.latents, cond=state.cond, uncond=state.uncond,
                       scheduler_state=state.snapshot_scheduler(),
                       generator_state=state.generator_state)
        return cls(pickle.dumps(_map(payload, flat), protocol=pickle.HIGHEST_PROTOCOL), tensors)

    @classmethod
    def lost(cls, reason: str) -> "Parcel":
        return cls(pickle.dumps({"lost": reason}), [])

    @cached_property
    def tree(self) -> Any:  # once: a state's tree holds its small tensors
        return pickle.loads(self.meta)

    @property
    def why_lost(self) -> str | None:
        t = self.tree
        return t["lost"] if "lost" in t else None

    def state(self) -> StepState:
        t = self.tensors
        return StepState(**_map(self.tree, lambda x: t[x.index].view(x.dtype).view(x.shape)
                                if isinstance(x, _Slot) else x))


def _map(x, leaf: Callable):
    """`x` with `leaf` applied to everything but its dicts, lists and tuples (a `_Slot` is a
    leaf)."""
    if isinstance(x, dict):
        return {k: _map(v, leaf) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not isinstance(x, _Slot):
        return type(x)(_map(v, leaf) for v in x)
    return leaf(x)


def _slots(tree) -> list[_Slot]:
    found: list[_Slot] = []
    _map(tree, lambda x: found.append(x) if isinstance(x, _Slot) else None)
    return sorted(found, key=lambda s: s.index)


def put_parcel(p: Parcel, put: Callable, device, pause: Callable | None = None) -> None:
    """Send `p` with `put(tensor)` (a point-to-point send or a broadcast); `pause()` runs after
    the metadata's length (a test hook: a holder killed while it sends)."""
    put(torch.tensor([len(p.meta)], dtype=torch.int64, device=device))
    if pause is not None:
        pause()
    put(torch.frombuffer(bytearray(p.meta), dtype=torch.uint8).to(device))
    for t in p.tensors:
        if t.numel():
            put(t)


def get_parcel(get: Callable, device) -> Parcel:
    """Receive a parcel with `get(tensor)`, the other end of `put_parcel`."""
    n = torch.zeros(1, dtype=torch.int64, device=device)
    get(n)
    buf = torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    get(buf)
    meta = buf.cpu().numpy().tobytes()  # the shapes are needed on the host: small
    tensors = []
    for s in _slots(pickle.loads(meta)):
        t = torch.empty(math.prod(s.shape) * s.dtype.itemsize, dtype=torch.uint8, device=device)
        if t.numel():
            get(t)
        tensors.append(t)
    return Parcel(meta, tensors)


class Links:
    """The transfer groups of one world (see the module's doc); `members`: global ranks in world
    rank order, as `GroupCache` has them."""

    def __init__(self, members, timeout_s: float):
        self.members = tuple(members)
        self._world_rank = {g: i for i, g in enumerate(self.members)}
        ranks, kw = list(range(len(self.members))), dict(timeout=timedelta(seconds=timeout_s))
        self.up = dist.new_group(ranks, **kw)
        self.down = dist.new_group(ranks, **kw)

    def _pair(self, src: int, dst: int) -> tuple[int, int, Any]:
        for g in (src, dst):
            if g not in self._world_rank:
                raise ValueError(f"worker {g} is not in this world {self.members}")
        s, d = self._world_rank[src], self._world_rank[dst]
        return s, d, (self.up if s < d else self.down)

    def sender(self, src: int, dst: int, transfer: int) -> Callable:
        _, d, group = self._pair(src, dst)
        return lambda t: dist.send(t, dst=d, group=group, tag=transfer & _TAG)

    def receiver(self, src: int, dst: int, transfer: int) -> Callable:
        s, _, group = self._pair(src, dst)
        return lambda t: dist.recv(t, src=s, group=group, tag=transfer & _TAG)


def receive(links: Links | None, src: int, dst: int, transfer: int, device) -> Parcel:
    """The receiving half of a move (the job's first rank); never raises: what went wrong comes
    back as a lost parcel."""
    if links is None:
        return Parcel.lost(f"worker {dst}: its world was abandoned (a member died)")
    try:
        return get_parcel(links.receiver(src, dst, transfer), device)
    except Exception as e:  # noqa: BLE001 - a dead holder, a timeout: the member is lost
        return Parcel.lost(f"move {transfer} from worker {src}: {type(e).__name__}: "
                           f"{str(e)[:300]}")


def share(parcel: Parcel | None, src: int, group, device) -> Parcel:
    """Broadcast from world rank `src` (which passes its `parcel`) to the others of `group`
    (which pass None).  A broken group raises: the job cannot go on without its members."""
    def bcast(t):
        dist.broadcast(t, src=src, group=group)

    if parcel is not None:
        put_parcel(parcel, bcast, device)
        return parcel
    return get_parcel(bcast, device)


class Mover(threading.Thread):
    """A worker's transfer thread: serves its `SendState`s in the order they came.

    `worker` gives `rank`, `dev`, `spec` (its `faults` test hook: {rid: {"kind": "stall_send",
    "seconds": s}} stalls after the metadata's length), `store`, and its world: `world_cv` (held
    by the main thread while it leaves a world and joins the next, and here while a send runs, so
    that a group is never destroyed under a send), `world` (the current world's prefix), `left`
    (prefixes of worlds it left) and `links` (None: the world was abandoned)."""

    def __init__(self, worker):
        super().__init__(daemon=True, name=f"genserve-mover-{worker.rank}")
        self.worker = worker
        self.queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, msg: SendState) -> None:
        self.queue.put(msg)

    def stop(self) -> None:
        self.queue.put(None)
        self.join(timeout=5)

    def run(self) -> None:
        if self.worker.dev.startswith("cuda"):
            torch.cuda.set_device(self.worker.dev)  # the current device is per thread
        while (msg := self.queue.get()) is not None:
            try:
                self._send(msg)
            except Exception:  # noqa: BLE001 - its receiver reports the member lost
                traceback.print_exc()

    def _send(self, msg: SendState) -> None:
        w = self.worker
        with w.world_cv:
            # A SendState can overtake the Restart that precedes it on the inbox: wait for it.
            w.world_cv.wait_for(lambda: msg.world == w.world or msg.world in w.left,
                                timeout=w.spec.timeout_s)
            popped = w.store.pop([msg.rid])  # the state leaves this worker whatever happens
            links = w.links if msg.world == w.world else None
            if links is None:
                print(f"worker {w.rank}: move {msg.transfer} of {msg.rid} to {msg.dst} dropped: "
                      f"world {msg.world!r} left or abandoned", file=sys.stderr)
                return
            if popped:
                parcel = Parcel.of(popped[0].to(w.dev) if _offloaded(popped[0], w.dev)
                                   else popped[0], w.dev)
            else:
                parcel = Parcel.lost(f"worker {w.rank} holds no state for {msg.rid}")
            fault = w.spec.faults.get(msg.rid) or {}
            pause = ((lambda: time.sleep(fault["seconds"]))
                     if fault.get("kind") == "stall_send" else None)
            put_parcel(parcel, links.sender(w.rank, msg.dst, msg.transfer), w.dev, pause)


def _offloaded(state: StepState, dev: str) -> bool:
    return state.latents.device != torch.device(dev)
