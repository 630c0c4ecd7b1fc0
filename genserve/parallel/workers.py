"""Worker processes: one per device, one torch.distributed world, groups made on first use.

The driver (the engine, or `genserve generate --sp K`) never loads a model: it sends jobs to the
workers (`worker_main.py`) and receives results.  A job names its ranks (the GPU set; SP degree = its
size).  Two ways to use the pool:
- `prepare` / `steps` / `decode`: states travel with every call as bytes (`StepState`), so each call
  may use another worker set of another degree: elastic re-sharding via host memory.  Simple, and
  what `genserve generate --sp K` uses.
- `submit("run", ...)`: the engine's job.  States stay resident on the workers that stepped them;
  a state is fetched (`fetch`) only to move it to another set or to keep a host-side checkpoint.

Failures: a job error comes back as `WorkerError` and the worker stays up.  A worker that dies is
noticed within `poll_s`: its pending jobs end as lost (`WorkerLost` from `wait`, tag "lost" from
`result`), the other workers stay usable for groups that do not include it, and `replace(rank)`
starts a new process in its place; the survivors join the new world between two of their jobs,
keeping their models and resident states.

`PoolBase` holds what does not depend on where the workers run; `WorkerPool` runs them as processes
of this machine, `genserve.cluster.RayWorkerPool` as Ray actors across nodes.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing as mp
import queue
import time

from ..models.base import GenRequest, StepState
from .worker_main import RESTART, WorkerSpec, abandon, worker_main


class WorkerError(RuntimeError):
    """A job failed inside a worker (the worker is still alive)."""


class WorkerLost(RuntimeError):
    """A worker process died while the driver waited for it."""


class PoolBase:
    """Job bookkeeping shared by the process pool (one machine) and the Ray pool (a cluster).

    A transport gives each worker an inbox (jobs, run in order), a control queue (served while
    the worker computes) and one shared outbox back to the driver; subclasses provide them
    (`_send`, `_send_ctl`, `_recv`), liveness (`_alive`, `_death`) and the life cycle.
    """

    n: int
    presets: tuple[str, ...]
    poll_s: float
    restarts: int = 0

    def _setup(self, preset: str | tuple[str, ...], n: int, poll_s: float,
               model_path: str | None, device: str, timeout_s: float, faults: dict | None,
               min_free_bytes: int) -> None:
        """What every pool knows: its workers' spec and the job books."""
        if n < 1:
            raise ValueError(f"workers must be >= 1, got {n}")
        self.n, self.poll_s = n, poll_s
        self.presets = (preset,) if isinstance(preset, str) else tuple(preset)
        self.spec = WorkerSpec(self.presets, model_path, device, timeout_s, dict(faults or {}),
                               min_free_bytes)
        self.restarts = 0
        self._ids = itertools.count()
        self._results: dict[int, tuple[str, object]] = {}
        self._jobs: dict[int, tuple[int, ...]] = {}
        self._ctl_results: dict[int, object] = {}
        self._starting: dict[int, float] = {}
        self._members: tuple[int, ...] = ()  # the current world (see `_next_world`)
        self._made: set[tuple[int, ...]] = set()  # its process groups
        self._generation = 0  # its number

    def _open_store(self, host: str) -> None:
        """The driver-hosted TCPStore every world meets in (see `worker_main.rendezvous`)."""
        import torch.distributed as dist

        self._host = host
        self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)

    def _next_world(self, members: tuple[int, ...]):
        """Make the world of `members` current (no groups made in it yet) and return its
        rendezvous.  It supersedes the current one: if that has not formed, its members are
        waiting for one that is gone now, so they are let go (abandoned)."""
        if self._generation:
            abandon(self._store, f"world{self._generation}/")
        self._generation += 1
        self._members, self._made = tuple(members), set()
        return ("store", self._host, self._store.port, f"world{self._generation}/")

    # ----- transport (subclasses) -----
    def _send(self, rank: int, msg) -> None:
        raise NotImplementedError

    def _send_ctl(self, rank: int, msg) -> None:
        raise NotImplementedError

    def _recv(self, timeout_s: float):
        """One message from the outbox; raises queue.Empty (timeout_s 0: do not wait)."""
        raise NotImplementedError

    def _alive(self, rank: int) -> bool:
        raise NotImplementedError

    def _death(self, rank: int) -> str:
        """How worker `rank` died, for messages."""
        raise NotImplementedError

    def down(self) -> list[int]:
        """Workers that are being replaced and take no jobs yet (none on one machine: there a
        replacement starts at once and jobs queue behind its start-up)."""
        return []

    @property
    def nodes(self) -> tuple[int, ...]:
        """The node of each worker, as small integers; empty: all on this machine."""
        return ()

    def _route(self, msg) -> None:
        tag, key, out = msg
        if tag == "ready":
            self._starting.pop(key, None)
        elif tag == "failed":
            self.close()
            raise WorkerError(out)
        elif tag == "ctl":
            self._ctl_results[key] = out
        elif key in self._jobs and key not in self._results:  # late results of lost jobs: dropped
            self._results[key] = (tag, out)

    def _await_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._starting:
            if time.monotonic() > deadline:
                self.close()
                raise WorkerLost(f"workers {sorted(self._starting)} did not start within "
                                 f"{timeout_s:.0f} s")
            try:
                self._route(self._recv(self.poll_s))
            except queue.Empty:
                self._check_alive(list(self._starting), "start-up")

    # ----- jobs -----
    def submit(self, kind: str, ranks: tuple[int, ...], payload) -> int:
        ranks = tuple(sorted(ranks))
        if not ranks or ranks[0] < 0 or ranks[-1] >= self.n or len(set(ranks)) != len(ranks):
            raise ValueError(f"ranks {ranks} are not distinct workers of 0..{self.n - 1}")
        self._check_alive(ranks, "submit")
        if len(ranks) > 1 and ranks not in self._made:
            # First job of this set in this world: every member makes its group, in one order.
            for r in self._members:
                self._send(r, (None, "group", (r,), ranks))
            self._made.add(ranks)
        job_id = next(self._ids)
        self._jobs[job_id] = ranks
        for r in ranks:
            self._send(r, (job_id, kind, ranks, payload))
        return job_id

    def finished(self, timeout_s: float = 0.0) -> list[int]:
        """Jobs that ended (waiting up to `timeout_s` for the first): a result arrived, or a
        member died (the job is then lost; see `result`)."""
        try:
            self._route(self._recv(timeout_s))
            while True:  # drain what is there, wait no more
                self._route(self._recv(0.0))
        except queue.Empty:
            pass
        for jid, ranks in self._jobs.items():
            if jid in self._results:
                continue
            dead = [r for r in ranks if not self._alive(r)]
            if dead:
                self._results[jid] = ("lost", f"{self._death(dead[0])} during job {jid}")
        return [j for j in self._results if j in self._jobs]

    def result(self, job_id: int) -> tuple[str, object]:
        """(tag, output) of an ended job: tag is "done", "error" (message) or "lost" (message).
        An error at SP > 1 whose group lost a member is reported as lost: the death caused it."""
        tag, out = self._results.pop(job_id)
        ranks = self._jobs.pop(job_id)
        if tag == "error" and len(ranks) > 1:
            time.sleep(self.poll_s)  # the survivors' error can beat the death notice
            dead = [r for r in ranks if not self._alive(r)]
            if dead:
                return "lost", self._death(dead[0])
        return tag, out

    def wait(self, job_id: int, timeout_s: float | None = None):
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while job_id not in self.finished(timeout_s=self.poll_s):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} on workers {self._jobs[job_id]} took over "
                                   f"{timeout_s} s")
        tag, out = self.result(job_id)
        if tag == "lost":
            raise WorkerLost(out)
        if tag == "error":
            raise WorkerError(out)
        return out

    # ----- control: served by each worker's second thread, even while it computes -----
    def fetch(self, rank: int, rids: list[str], timeout_s: float = 60.0) -> dict[str, bytes]:
        """Take the resident states of `rids` off worker `rank` (they leave it)."""
        req = next(self._ids)
        self._send_ctl(rank, ("fetch", req, list(rids)))
        deadline = time.monotonic() + timeout_s
        while req not in self._ctl_results:
            self._check_alive((rank,), "fetch")
            if time.monotonic() > deadline:
                raise TimeoutError(f"fetch from worker {rank} took over {timeout_s} s")
            try:
                self._route(self._recv(self.poll_s))
            except queue.Empty:
                continue
        out = self._ctl_results.pop(req)
        if isinstance(out, Exception):
            raise WorkerError(str(out))
        return out

    def drop(self, ranks, rids: list[str]) -> None:
        """Forget resident states (a request moved, finished elsewhere, failed or was cancelled)."""
        for r in ranks:
            if self._alive(r):
                self._send_ctl(r, ("drop", None, list(rids)))

    def cancel(self, ranks, rids: list[str]) -> None:
        """Stop stepping `rids` at the next step boundary of the job that holds them."""
        for r in ranks:
            if self._alive(r):
                self._send_ctl(r, ("cancel", None, list(rids)))

    # ----- the simple API: states travel with every call -----
    def prepare(self, reqs: list[GenRequest], rank: int = 0, model: str | None = None
                ) -> list[StepState]:
        model = model or self.presets[0]
        return [StepState.from_bytes(b)
                for b in self.wait(self.submit("prepare", (rank,), (model, reqs)))]

    def steps(self, ranks: tuple[int, ...], states: list[StepState], n: int = 1
              ) -> list[StepState]:
        """Run `n` steps of a batch of states on the workers `ranks` (SP degree = len(ranks))."""
        blobs = [s.to_bytes() for s in states]
        return [StepState.from_bytes(b)
                for b in self.wait(self.submit("steps", ranks, (blobs, n)))]

    def decode(self, states: list[StepState], rank: int = 0):
        return self.wait(self.submit("decode", (rank,), [s.to_bytes() for s in states]))

    # ----- liveness -----
    def _check_alive(self, ranks, what: str) -> None:
        for r in ranks:
            if not self._alive(r):
                raise WorkerLost(f"{self._death(r)} during {what}")

    def alive(self) -> list[int]:
        return [r for r in range(self.n) if self._alive(r)]

    def dead(self) -> list[int]:
        """Workers that died and are not yet being replaced (see `replace`)."""
        down = set(self.down())
        return [r for r in range(self.n) if not self._alive(r) and r not in down]

    def _lose_jobs_of(self, ranks) -> None:
        for jid, members in self._jobs.items():  # their results can no longer come
            if jid not in self._results and set(members) & set(ranks):
                self._results[jid] = ("lost", f"worker(s) {sorted(ranks)} died during job {jid}")

    def ready(self) -> bool:
        """Whether every replacement worker has started (without blocking)."""
        self.finished(timeout_s=0.0)
        for r in list(self._starting):
            if not self._alive(r):
                raise WorkerLost(f"replacement {self._death(r)} during start-up")
        return not self._starting

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WorkerPool(PoolBase):
    """`n` worker processes on this machine serving one or more presets; jobs run on any subset."""

    def __init__(self, preset: str | tuple[str, ...], n: int, model_path: str | None = None,
                 device: str = "cpu", collective_timeout_s: float = 60.0,
                 start_timeout_s: float = 300.0, poll_s: float = 0.2,
                 faults: dict | None = None, min_free_bytes: int = 2 << 30):
        """`faults` is a test hook: {request_id: {"kind": "oom"|"error"|"exit", "step": k,
        "rank": r (optional)}} makes the workers fail that request at that step.
        `min_free_bytes`: on CUDA, paused states go to host memory below this much free memory."""
        self._setup(preset, n, poll_s, model_path, device, collective_timeout_s, faults,
                     min_free_bytes)
        self._ctx = mp.get_context("spawn")
        self._open_store("127.0.0.1")
        self._inboxes = [self._ctx.Queue() for _ in range(n)]
        self._ctls = [self._ctx.Queue() for _ in range(n)]
        self._outbox = self._ctx.Queue()
        self.procs: list = [None] * n
        init = self._next_world(tuple(range(n)))
        for r in range(n):
            self._spawn(r, init, self.spec)
        self._await_ready(start_timeout_s)

    def _spawn(self, rank: int, init, spec: WorkerSpec) -> None:
        p = self._ctx.Process(target=worker_main, daemon=True,
                              args=(rank, spec, init, self._members, self._inboxes[rank],
                                    self._ctls[rank], self._outbox))
        p.start()
        self.procs[rank] = p
        self._starting[rank] = time.monotonic()

    def _send(self, rank: int, msg) -> None:
        self._inboxes[rank].put(msg)

    def _send_ctl(self, rank: int, msg) -> None:
        self._ctls[rank].put(msg)

    def _recv(self, timeout_s: float):
        return self._outbox.get(timeout=timeout_s) if timeout_s > 0 else self._outbox.get_nowait()

    def _alive(self, rank: int) -> bool:
        return self.procs[rank].is_alive()

    def _death(self, rank: int) -> str:
        return f"worker {rank} died (exit code {self.procs[rank].exitcode})"

    def replace(self, ranks: list[int]) -> None:
        """Start new processes for dead workers `ranks`; the survivors leave the old world after
        their queued jobs and join the new one (keeping models and resident states).  Does not
        wait: jobs submitted from now on queue behind the restart on every worker."""
        ranks = sorted(set(ranks))
        if any(self.procs[r].is_alive() for r in ranks):
            raise ValueError(f"replace: worker(s) {ranks} are not all dead")
        self._lose_jobs_of(ranks)
        init = self._next_world(self._members)  # the same ranks, a new world
        spec = dataclasses.replace(self.spec, faults={})  # faults do not follow into successors
        for r in ranks:
            # A new queue: the dead process may have died holding the old ones' locks.
            self._inboxes[r], self._ctls[r] = self._ctx.Queue(), self._ctx.Queue()
            self._spawn(r, init, spec)
        for r in range(self.n):
            if r not in ranks:
                self._inboxes[r].put((None, RESTART, (r,), (init, self._members)))
        self.restarts += len(ranks)

    def close(self) -> None:
        for q in [*self._inboxes, *self._ctls, self._outbox]:
            q.cancel_join_thread()  # never block the interpreter's exit on a dead reader
        for r, p in enumerate(self.procs):
            if p is not None and p.is_alive():
                self._inboxes[r].put(None)
        for p in self.procs:
            if p is None:
                continue
            p.join(5)
            if p.is_alive():
                p.kill()
