"""What the driver and its workers share besides the messages (`protocol.py`): what a worker is
given (`WorkerSpec`), and how the members of a world meet (`rendezvous` in the workers, `abandon`
on the driver) in the driver's store (`authstore.py`: only holders of the run's secret get in).
No torch at module level: the driver imports this; the worker process itself is `worker_main.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

from .protocol import Rendezvous


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker of a pool loads and how it behaves; plain data, sent to each process.

    `faults` is a test hook: {request_id: {"kind": "oom"|"error"|"exit"|"hang", "step": k,
    "rank": r}}.  `min_free_bytes`: on CUDA, paused states go to host memory below this much free
    memory.  `heartbeat_s`: how often the worker sends a `Heartbeat` (None: never; the pools set
    it).  `loopback`: all workers on this machine, so their gloo sockets listen on loopback.
    `emulate`: a `genserve.emulate.Emulation`: the workers emulate GPUs (no models, no torch)."""

    presets: tuple[str, ...]
    model_path: str | None = None
    device: str = "cpu"
    timeout_s: float = 60.0
    faults: dict = field(default_factory=dict)
    min_free_bytes: int = 2 << 30
    heartbeat_s: float | None = None
    loopback: bool = False
    emulate: Any = None


class Abandoned(Exception):
    """The driver gave this world up before it formed: a member died before coming."""


def rendezvous(init: Rendezvous, rank: int, members: tuple[int, ...], backend: str,
               timeout_s: float, tick: Callable[[], None] | None = None) -> None:
    """Join the world of `members` (global ranks, in world-rank order) at `init`: the store the
    driver hosts, with a fresh prefix for each world, so a re-formed world never sees the old
    one's keys.  `tick()` runs at every poll while the members gather: waiting for a member is not
    being stuck (see `Heartbeat`; this wait has its own deadline, `timeout_s`).

    The members meet first, and the world forms only if the store's one `decision`
    key says "formed" (set by whoever sees every member arrived).  The driver sets it to
    "abandoned" when it re-forms again before that (a second member died meanwhile); the members
    then raise `Abandoned` and wait for the next world, instead of waiting for the dead one until
    the timeout (and then dying too).  The compare-and-set makes every member take the same side."""
    import torch.distributed as dist

    kw = dict(rank=members.index(rank), world_size=len(members),
              timeout=timedelta(seconds=timeout_s))
    prefix = init.prefix
    if init.secret:
        from .authstore import connect

        store = connect(init.host, init.port, init.secret, timedelta(seconds=timeout_s))
    else:  # a plain TCPStore (tests that host one themselves)
        store = dist.TCPStore(init.host, init.port, is_master=False,
                              timeout=timedelta(seconds=timeout_s))
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
        if tick is not None:
            tick()
        time.sleep(0.02)
    dist.init_process_group(backend, store=dist.PrefixStore("pg/", world), **kw)


def abandon(store, prefix: str) -> bool:
    """The driver's side of `rendezvous`: give up the world of `prefix` unless it formed already.
    Returns whether it was abandoned."""
    import torch.distributed as dist

    world = dist.PrefixStore(prefix, store)
    return world.compare_set("decision", "", "abandoned") == b"abandoned"

