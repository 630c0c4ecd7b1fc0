"""Worker processes: one per device, one torch.distributed world, groups made on first use.

The driver (the engine, or `genserve generate --sp K`) never loads a model: it sends jobs to the
workers (`worker_main.py`) and receives results, all as the typed messages of `protocol.py`.  A
job names its ranks (the GPU set; SP degree = its size).  Two ways to use the pool:
- `prepare` / `steps` / `decode`: states travel with every call as bytes (`StepState`), so each call
  may use another worker set of another degree: elastic re-sharding via host memory.  Simple, and
  what `genserve generate --sp K` uses.
- `submit(ranks, Run(...))`: the engine's job.  States stay resident on the workers that stepped
  them; to move one to another set the driver asks its holder to send it (`send_state`) straight
  to the job that takes it (`transfer.py`); the bytes of a state come to the driver only as a
  checkpoint on a pool that shares no directory with its workers (`shares_files` False: Ray), or
  by `fetch` (the old way of moving, kept for comparison); otherwise workers write checkpoints
  to files themselves (`saver.py`) and report them with a `Saved`.

The engine's API: `submit(ranks, job) -> job id`; `finished(timeout_s) -> [job id]`;
`result(job id) -> Done | JobError | JobLost` (a `Run` is `Done` with a `RunResult`); `outputs()
-> [Output]` (a `Run`'s encoded outputs, sent apart from its result); `saved() -> [Saved]` (its
checkpoint files, likewise);
`wait(job id, timeout_s) -> Done.result` (raises `WorkerError` / `WorkerLost`); `fetch(rank,
rids) -> {rid: bytes}`; `transfer_id()` and `send_state(holder, rid, dst, transfer)`; `drop` /
`cancel(ranks, rids)`; and the life cycle (`alive`, `dead`,
`down`, `replace`, `ready`, `close`).

Failures: a job error comes back as `JobError` and the worker stays up.  A worker that dies is
noticed within `poll_s`; one that hangs (no heartbeat, or a job with no progress, for
`worker_timeout_s`: see `liveness.py`) is killed and counted in `hung`, and is then lost the same
way: its pending jobs end as lost (`JobLost` from `result`, `WorkerLost` from `wait`), the other
workers stay usable for groups that do not include it, and `replace(rank)` starts a new process in
its place; the survivors join the new world between two of their jobs, keeping their models and
resident states.  `close` returns within a few seconds whatever state the workers are in.

Worlds meet in a store the driver hosts (`authstore.py`): on loopback here, and only clients that
know the run's secret, which the workers get in their spawn arguments, can use it.  Worker
processes die with the driver however it ends (`liveness.py`).

Transport on one machine (`WorkerPool`): per worker an inbox and a control pipe (driver -> worker,
`feed.py`: written by the driver's thread without blocking, a message pickled once for all the
workers it goes to; renewed when a worker is replaced) and a channel of its own back
(`channel.py`: a one-way pipe the driver reads without blocking).  A worker's
death reads as end of file on its channel; a message cut short or one that does not decode ends
that worker as well (it is killed if it still runs): its jobs end lost, the others never wait.

`PoolBase` holds what does not depend on where the workers run; `WorkerPool` runs them as processes
of this machine, `genserve.cluster.RayWorkerPool` as Ray actors across nodes.  This module imports
no torch at module level.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing as mp
import os
import shutil
import time
from multiprocessing.connection import wait as wait_for

from .cfg import cfg_layout
from .channel import Receiver, Sender, frame
from .feed import Feed, Flusher, Inlet
from .liveness import Watch, start_process
from .process import run_worker
from .protocol import Heartbeat, SendState
from .protocol import (JOBS, TO_DRIVER, Cancel, Decode, Done, Drop, Fetch, Fetched, Job, JobError,
                       JobLost, MakeGroups, Outcome, Output, Prepare, Ready, Rendezvous, Restart,
                       Run, Saved, Shutdown, StartFailed, Steps, Task, handler)
from .world import WorkerSpec, abandon

# A worker silent, or running a job without progress, this long is declared hung (the pools'
# default; the server passes its own).
WORKER_TIMEOUT_S = 60.0
# How often the driver looks for hung workers (seconds).
HUNG_CHECK_S = 0.1


class WorkerError(RuntimeError):
    """A job failed inside a worker (the worker is still alive)."""


class WorkerLost(RuntimeError):
    """A worker process died while the driver waited for it."""


class PoolBase:
    """Job bookkeeping shared by the process pool (one machine) and the Ray pool (a cluster).

    A transport gives each worker an inbox (run in order), a control queue (served while the worker
    computes) and a way back to the driver; subclasses provide them (`_send`, `_send_ctl`,
    `_poll`), liveness (`_alive`, `_death`, `_kill_hung`) and the life cycle.

    `restarts`: workers replaced; `hung`: workers declared hung (and killed).
    """

    n: int
    presets: tuple[str, ...]
    poll_s: float
    restarts: int = 0
    hung: int = 0
    # Whether the workers see the driver's files (one machine): they then write checkpoints
    # themselves (`Run.save`), else the states come back as bytes.
    shares_files: bool = False
    # Whether a poll may see a death that `_alive` has not reported yet (then `alive()` is asked
    # again after every poll); False where the transport clears the memo itself on a death.
    deaths_seen_by_poll: bool = True

    def _setup(self, preset: str | tuple[str, ...], n: int, poll_s: float,
               model_path: str | None, device: str, timeout_s: float, faults: dict | None,
               min_free_bytes: int, worker_timeout_s: float | None = None,
               loopback: bool = False, emulate=None) -> None:
        """What every pool knows: its workers' spec and the job books."""
        if n < 1:
            raise ValueError(f"workers must be >= 1, got {n}")
        wt = WORKER_TIMEOUT_S if worker_timeout_s is None else float(worker_timeout_s)
        if not wt > 0:
            raise ValueError(f"worker_timeout_s must be > 0, got {worker_timeout_s}")
        self.n, self.poll_s, self.worker_timeout_s = n, poll_s, wt
        self.presets = (preset,) if isinstance(preset, str) else tuple(preset)
        # Several beats per timeout, so that one beat late (a busy driver, a long message ahead of
        # it on the channel) is never taken for silence.
        self.spec = WorkerSpec(self.presets, model_path, device, timeout_s, dict(faults or {}),
                               min_free_bytes, heartbeat_s=min(1.0, wt / 4), loopback=loopback,
                               emulate=emulate)
        self.restarts = self.hung = 0
        self._hung_checked = 0.0
        self._alive_now: list[int] | None = None  # `alive()` as of the last poll
        self._alive_at = 0.0
        self._watch = Watch(wt)
        self._ids = itertools.count()
        self._results: dict[int, Outcome] = {}
        self._jobs: dict[int, tuple[int, ...]] = {}
        self._fetched: dict[int, Fetched] = {}
        self._outputs: list[Output] = []
        self._saved: list[Saved] = []
        self._starting: dict[int, float] = {}
        self._members: tuple[int, ...] = ()  # the current world (see `_next_world`)
        self._made: set[tuple[int, ...]] = set()  # its process groups
        self._generation = 0  # its number
        self._prefix = ""  # its key prefix: names it in `SendState`

    def _open_store(self, host: str) -> None:
        """The store every world meets in (see `world.rendezvous`), listening on `host` only;
        only holders of this run's secret can use it (`authstore.py`)."""
        from .authstore import Server, new_secret

        self._host, self._secret = host, new_secret()
        self._server = Server(host, self._secret)
        self._store = self._server.local  # the driver's handle (`abandon`)

    def _next_world(self, members: tuple[int, ...]) -> Rendezvous:
        """Make the world of `members` current (no groups made in it yet) and return its
        rendezvous.  It supersedes the current one: if that has not formed, its members are
        waiting for one that is gone now, so they are let go (abandoned)."""
        if self._generation:
            abandon(self._store, f"world{self._generation}/")
        self._generation += 1
        self._members, self._made = tuple(members), set()
        self._prefix = f"world{self._generation}/"
        return Rendezvous(self._host, self._server.port, self._prefix, self._secret)

    # ----- transport (subclasses) -----
    def _send(self, rank: int, msg) -> None:
        """Put an inbox message (`protocol.INBOX`) to worker `rank`."""
        raise NotImplementedError

    def _send_ctl(self, rank: int, msg) -> None:
        """Put a control message (`protocol.CONTROL`) to worker `rank`."""
        raise NotImplementedError

    def _send_all(self, ranks, msg, ctl: bool = False) -> None:
        """The same message to each of `ranks` (a transport may encode it once)."""
        send = self._send_ctl if ctl else self._send
        for r in ranks:
            send(r, msg)

    def _poll(self, timeout_s: float) -> list:
        """The workers' messages that arrived, waiting up to `timeout_s` for the first (0: do not
        wait); empty if none came."""
        raise NotImplementedError

    def _alive(self, rank: int) -> bool:
        raise NotImplementedError

    def _death(self, rank: int) -> str:
        """How worker `rank` died, for messages."""
        raise NotImplementedError

    def _kill_hung(self, rank: int, why: str) -> None:
        """Kill worker `rank`, declared hung for `why`, without waiting: from now on it is not
        `_alive` and `_death` says why."""
        raise NotImplementedError

    def down(self) -> list[int]:
        """Workers that are being replaced and take no jobs yet (none on one machine: there a
        replacement starts at once and jobs queue behind its start-up)."""
        return []

    @property
    def nodes(self) -> tuple[int, ...]:
        """The node of each worker, as small integers; empty: all on this machine."""
        return ()

    # ----- the workers' messages -----
    def _on_ready(self, msg: Ready) -> None:
        self._starting.pop(msg.rank, None)
        now = time.monotonic()
        # The others may have waited for this one to form their world: that time is not theirs
        # (see `_check_hung`), their progress is judged from now on.
        for r in range(self.n):
            self._watch.restart_clock(r, now)
        self._watch.reset(msg.rank, now)

    def _on_heartbeat(self, msg: Heartbeat) -> None:
        self._watch.heard(msg.rank, time.monotonic(), msg.progress)

    def _on_start_failed(self, msg: StartFailed) -> None:
        self.close()
        raise WorkerError(msg.message)

    def _on_fetched(self, msg: Fetched) -> None:
        self._fetched[msg.req_id] = msg

    def _on_output(self, msg: Output) -> None:
        self._outputs.append(msg)

    def _on_saved(self, msg: Saved) -> None:
        self._saved.append(msg)

    def _on_outcome(self, msg: Outcome) -> None:
        if msg.job_id in self._jobs and msg.job_id not in self._results:  # late ones of lost jobs
            self._results[msg.job_id] = msg                                # are dropped

    _ROUTES = {Ready: _on_ready, StartFailed: _on_start_failed, Fetched: _on_fetched,
               Done: _on_outcome, JobError: _on_outcome, JobLost: _on_outcome,
               Output: _on_output, Saved: _on_saved, Heartbeat: _on_heartbeat}

    def _route(self, msg) -> None:
        handler(self._ROUTES, msg)(self, msg)

    def _pump(self, timeout_s: float) -> None:
        for msg in self._poll(timeout_s):
            self._route(msg)
        if self.deaths_seen_by_poll:
            self._alive_now = None  # deaths seen by this poll count from here on
        now = time.monotonic()
        # Not on every turn of the engine's loop (every few ms): it asks every process whether
        # it runs, which at 64 workers was most of a turn; the timeouts it enforces are seconds.
        if now - self._hung_checked >= HUNG_CHECK_S:
            self._hung_checked = now
            self._check_hung()  # asks every process afresh (`alive()` is current after it)

    # ----- hung workers (see liveness.py) -----
    def set_worker_timeout(self, seconds: float) -> None:
        """Change `worker_timeout_s` (the server sets it once the step times are known; the
        heartbeat interval stays what the workers started with)."""
        if not seconds > 0:
            raise ValueError(f"worker_timeout_s must be > 0, got {seconds}")
        self.worker_timeout_s = self._watch.timeout_s = float(seconds)

    def _running(self) -> dict[int, tuple[int, ...]]:
        """Jobs submitted whose results have not come: job id -> ranks."""
        return {j: rs for j, rs in self._jobs.items() if j not in self._results}

    def _check_hung(self) -> None:
        """Kill the workers that went silent, or that run a job without progress, for
        `worker_timeout_s`; they are then lost like dead ones.  Never waits."""
        now = time.monotonic()
        running = self._running()
        # While a world forms around a starting worker, everyone waits for it (its start has
        # its own deadline): the progress rule rests until it is up (`_on_ready` then starts
        # every clock over).
        busy = set() if self._starting else {r for rs in running.values() for r in rs}
        self._alive_now = None
        ranks = [r for r in self.alive() if r not in self._starting]
        spared: set[int] = set()
        for r, why in self._watch.overdue(now, ranks, busy):
            if r in spared and why.startswith("no progress"):
                continue
            self.hung += 1
            # Its job-mates may have been waiting on it (a collective), and stand still for that
            # reason alone: their clocks start over (if one is stuck too, the next round says so).
            for rs in running.values():
                if r in rs:
                    for m in rs:
                        self._watch.restart_clock(m, now)
                        spared.add(m)
            self._kill_hung(r, why)

    def _await_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._starting:
            if time.monotonic() > deadline:
                self.close()
                raise WorkerLost(f"workers {sorted(self._starting)} did not start within "
                                 f"{timeout_s:.0f} s")
            self._pump(self.poll_s)
            try:
                self._check_alive(list(self._starting), "start-up")
            except WorkerLost:  # a pool that never started holds nothing afterwards
                self.close()
                raise

    # ----- jobs -----
    def submit(self, ranks: tuple[int, ...], job: Job) -> int:
        """Run `job` on the workers `ranks` (SP degree = their number; half of it for a `Run`
        with `cfg_split`, whose rank count must be even); returns its id.  Does not wait: see
        `finished` and `result`, or `wait`."""
        if not isinstance(job, JOBS):
            raise TypeError(f"submit: a {type(job).__name__} is not a job (one of "
                            f"{', '.join(t.__name__ for t in JOBS)})")
        ranks = tuple(sorted(ranks))
        if not ranks or ranks[0] < 0 or ranks[-1] >= self.n or len(set(ranks)) != len(ranks):
            raise ValueError(f"ranks {ranks} are not distinct workers of 0..{self.n - 1}")
        sets = _group_sets(ranks, job)  # before anything is sent: a bad layout is refused
        self._check_alive(ranks, "submit", memo=True)
        now, busy = time.monotonic(), {r for rs in self._running().values() for r in rs}
        for r in ranks:
            if r not in busy:  # idle until now: its progress is judged from now on
                self._watch.restart_clock(r, now)
        new = tuple(g for g in sets if g not in self._made)
        if new:  # the first job of these sets in this world: every member makes them, in order
            self._send_all(self._members, MakeGroups(new))
            self._made.update(new)
        job_id = next(self._ids)
        self._jobs[job_id] = ranks
        self._send_all(ranks, Task(job_id, ranks, job))
        return job_id

    def finished(self, timeout_s: float = 0.0) -> list[int]:
        """Jobs that ended (waiting up to `timeout_s` for the first): a result arrived, or a
        member died (the job is then lost; see `result`)."""
        self._pump(timeout_s)
        alive = set(self.alive())
        for jid, ranks in self._jobs.items():
            if jid in self._results:
                continue
            dead = [r for r in ranks if r not in alive]
            if dead:
                self._results[jid] = JobLost(jid, f"{self._death(dead[0])} during job {jid}")
        return [j for j in self._results if j in self._jobs]

    def outputs(self) -> list[Output]:
        """The encoded outputs (`Output`) that arrived since the last call: they travel apart from
        their jobs' results (see `protocol.OutputFormat`); any poll (`finished`) collects them."""
        got, self._outputs = self._outputs, []
        return got

    def saved(self) -> list[Saved]:
        """The checkpoint files (`Saved`) workers reported since the last call (see `Run.save`);
        any poll collects them."""
        got, self._saved = self._saved, []
        return got

    def result(self, job_id: int) -> Outcome:
        """How an ended job ended: `Done` (its `result`), `JobError` or `JobLost` (a `message`).
        An error at SP > 1 whose group lost a member is reported as lost: the death caused it."""
        outcome = self._results.pop(job_id)
        ranks = self._jobs.pop(job_id)
        if isinstance(outcome, JobError) and len(ranks) > 1:
            time.sleep(self.poll_s)  # the survivors' error can beat the death notice
            dead = [r for r in ranks if not self._alive(r)]
            if dead:
                return JobLost(job_id, self._death(dead[0]))
        return outcome

    def wait(self, job_id: int, timeout_s: float | None = None):
        """The job's `Done.result`; raises `WorkerLost` or `WorkerError`, or `TimeoutError`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while job_id not in self.finished(timeout_s=self.poll_s):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} on workers {self._jobs[job_id]} took over "
                                   f"{timeout_s} s")
        outcome = self.result(job_id)
        if isinstance(outcome, JobLost):
            raise WorkerLost(outcome.message)
        if isinstance(outcome, JobError):
            raise WorkerError(outcome.message)
        return outcome.result

    # ----- control: served by each worker's second thread, even while it computes -----
    def fetch(self, rank: int, rids: list[str], timeout_s: float = 60.0) -> dict[str, bytes]:
        """Take the resident states of `rids` off worker `rank` (they leave it)."""
        req = next(self._ids)
        self._send_ctl(rank, Fetch(tuple(rids), req))
        deadline = time.monotonic() + timeout_s
        while req not in self._fetched:
            self._check_alive((rank,), "fetch")
            if time.monotonic() > deadline:
                raise TimeoutError(f"fetch from worker {rank} took over {timeout_s} s")
            self._pump(self.poll_s)
        reply = self._fetched.pop(req)
        if reply.error is not None:
            raise WorkerError(reply.error)
        return dict(reply.states)

    def transfer_id(self) -> int:
        """A new transfer's id (the job's `Incoming` names it, and so does its `send_state`)."""
        return next(self._ids)

    def send_state(self, holder: int, rid: str, dst: int, transfer: int) -> None:
        """Have worker `holder` send its state of `rid` to worker `dst` (the first rank of a job
        that takes it as `Incoming(rid, holder, transfer)`), in the current world.  Does not
        wait: the job waits for the state.  Send it after the job, in the order of the jobs, so
        that both ends take their transfers in one order (see `transfer.py`); a dead holder is
        skipped (its receiver sees it dead and reports the state lost)."""
        if holder in self.alive():
            self._send_ctl(holder, SendState(rid, dst, transfer, self._prefix))

    # These three are on the engine's decision path: liveness as of `alive()` (a message to a
    # worker that died since is never read, and its death is handled where it is noticed).
    def drop(self, ranks, rids: list[str]) -> None:
        """Forget resident states (a request moved, finished elsewhere, failed or was cancelled)."""
        live = set(self.alive())
        self._send_all([r for r in ranks if r in live], Drop(tuple(rids)), ctl=True)

    def cancel(self, ranks, rids: list[str]) -> None:
        """Stop stepping `rids` at the next step boundary of the job that holds them."""
        live = set(self.alive())
        self._send_all([r for r in ranks if r in live], Cancel(tuple(rids)), ctl=True)

    # ----- the simple API: states travel with every call -----
    def prepare(self, reqs: list, rank: int = 0) -> list:
        """`GenRequest`s (all of one model) -> their `StepState`s, encoded on worker `rank`."""
        from ..models.base import StepState

        job = Prepare(reqs[0].spec.model, tuple(reqs))
        return [StepState.from_bytes(b) for b in self.wait(self.submit((rank,), job))]

    def steps(self, ranks: tuple[int, ...], states: list, n: int = 1) -> list:
        """Run `n` steps of a batch of states on the workers `ranks` (SP degree = len(ranks))."""
        from ..models.base import StepState

        job = Steps(tuple(s.to_bytes() for s in states), n)
        return [StepState.from_bytes(b) for b in self.wait(self.submit(ranks, job))]

    def decode(self, states: list, rank: int = 0):
        return self.wait(self.submit((rank,), Decode(tuple(s.to_bytes() for s in states))))

    # ----- liveness -----
    def _check_alive(self, ranks, what: str, memo: bool = False) -> None:
        """`memo`: as of `alive()` (a death shows there once a poll saw it), not one question
        per process (a syscall each: a submit at SP 8 asked eight)."""
        live = set(self.alive()) if memo else None
        for r in ranks:
            if not (r in live if memo else self._alive(r)):
                raise WorkerLost(f"{self._death(r)} during {what}")

    def alive(self) -> list[int]:
        """The live workers, as of the last poll if that was under `HUNG_CHECK_S` ago (the
        engine asks for every assignment: one question per process each time was most of a
        decision at 64 workers)."""
        now = time.monotonic()
        if self._alive_now is None or now - self._alive_at > HUNG_CHECK_S:
            self._alive_now, self._alive_at = self._alive_all(), now
        return list(self._alive_now)

    def _alive_all(self) -> list[int]:
        """Ask every worker whether it runs (subclasses: in fewer system calls)."""
        return [r for r in range(self.n) if self._alive(r)]

    def dead(self) -> list[int]:
        """Workers that died and are not yet being replaced (see `replace`)."""
        alive, down = set(self.alive()), set(self.down())
        return [r for r in range(self.n) if r not in alive and r not in down]

    def _lose_jobs_of(self, ranks) -> None:
        for jid, members in self._jobs.items():  # their results can no longer come
            if jid not in self._results and set(members) & set(ranks):
                self._results[jid] = JobLost(jid, f"worker(s) {sorted(ranks)} died during job "
                                                  f"{jid}")

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


def _group_sets(ranks: tuple[int, ...], job: Job) -> tuple[tuple[int, ...], ...]:
    """The process groups `job` on `ranks` needs, in the order they are made: the whole set's
    (member broadcasts, cancels, Ulysses; a CFG-parallel run's swaps too), then for a
    CFG-parallel run its halves."""
    sets = (ranks,) if len(ranks) > 1 else ()
    if isinstance(job, Run) and job.cfg_split:
        sets += cfg_layout(ranks).groups()
    return sets


def _emulator_context():
    """Emulated workers fork from a fork server that imported their modules once: 64 of them
    start in seconds instead of a minute of interpreters importing the same things on two cores
    (a fork server already running, e.g. the tests', is used as it is)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["genserve.parallel.process", "genserve.emulate.worker",
                                "genserve.emulate.frames", "numpy", "PIL.Image",
                                "PIL.ImageDraw", "av"])
    return ctx


class WorkerPool(PoolBase):
    """`n` worker processes on this machine serving one or more presets; jobs run on any subset."""

    # How worker processes start: "spawn" (a fresh interpreter each), or "forkserver" (forked
    # from a server that imported torch & co. once; the tests use it, see tests/_spawn.py).
    # Emulated workers always fork (`_emulator_context`).
    start_method: str = "spawn"
    # `close`: how long workers get to take their `Shutdown`, then how long to wait for them to be
    # reaped once killed.
    close_grace_s: float = 2.0
    close_reap_s: float = 2.0
    shares_files = True
    deaths_seen_by_poll = False  # a death is an end of file on its channel: `_break`

    def __init__(self, preset: str | tuple[str, ...], n: int, model_path: str | None = None,
                 device: str = "cpu", collective_timeout_s: float = 60.0,
                 start_timeout_s: float = 300.0, poll_s: float = 0.2,
                 faults: dict | None = None, min_free_bytes: int = 2 << 30,
                 worker_timeout_s: float | None = None, emulate=None):
        """`faults` is a test hook: {request_id: {"kind": "oom"|"error"|"exit"|"hang", "step": k,
        "rank": r (optional)}} makes the workers fail that request at that step.
        `min_free_bytes`: on CUDA, paused states go to host memory below this much free memory.
        `worker_timeout_s`: a worker silent, or running a job without progress, this long is
        declared hung, killed and lost (None: `WORKER_TIMEOUT_S`).
        `emulate`: a `genserve.emulate.Emulation`: the workers emulate GPUs with the timings of
        its profile (no model is loaded; `preset` names the real models they stand for)."""
        self._exchange = None
        if emulate is not None:  # where the emulated workers pass states (see emulate/exchange.py)
            from .saver import scratch_dir

            emulate.validate()
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self._exchange = scratch_dir("genserve-emu-", shm)
            emulate = dataclasses.replace(emulate, exchange=self._exchange)
        self._setup(preset, n, poll_s, model_path, device, collective_timeout_s, faults,
                    min_free_bytes, worker_timeout_s, loopback=True, emulate=emulate)
        self._ctx = _emulator_context() if emulate is not None else mp.get_context(
            self.start_method)
        self._closed = False
        # The lifeline (see liveness.py): every worker gets the read end; the driver holds the
        # only write end, never writes, and its exit (any exit) ends the workers.
        self._lifeline, self._lifeline_w = self._ctx.Pipe(duplex=False)
        self._open_store("127.0.0.1")
        # The driver's ends of each worker's inbox and control pipe (see feed.py).
        self._flusher = Flusher()
        self._inboxes: list[Feed | None] = [None] * n
        self._ctls: list[Feed | None] = [None] * n
        self._chans: list[Receiver | None] = [None] * n
        self._broken: dict[int, str] = {}  # rank -> how its channel ended
        self.procs: list = [None] * n
        world = self._next_world(tuple(range(n)))
        for r in range(n):
            self._spawn(r, world, self.spec)
        self._await_ready(start_timeout_s)

    def _spawn(self, rank: int, world: Rendezvous, spec: WorkerSpec) -> None:
        """A process for `rank`, with a new inbox, control pipe and channel (a dead predecessor's
        pipes may hold half a message).  Its target is `process.run_worker`, which
        ties it to the driver's life and then runs `worker_main` (the secret travels in `world`,
        pickled through the start pipe, never on a command line)."""
        for feed in (self._inboxes[rank], self._ctls[rank]):
            if feed is not None:
                feed.close()
        inbox_r, inbox_w = self._ctx.Pipe(duplex=False)
        ctl_r, ctl_w = self._ctx.Pipe(duplex=False)
        reader, writer = self._ctx.Pipe(duplex=False)
        p = self._ctx.Process(target=run_worker, daemon=True,
                              args=(self._lifeline, rank, spec, world, self._members,
                                    Inlet(inbox_r), Inlet(ctl_r), Sender(writer)))
        start_process(p)
        # The worker holds the only read ends of its pipes and the only write end of its
        # channel now: its death reads as end of file, and a write to it fails instead of
        # filling a pipe nobody reads.
        for end in (writer, inbox_r, ctl_r):
            end.close()
        self._inboxes[rank] = Feed(inbox_w, self._flusher)
        self._ctls[rank] = Feed(ctl_w, self._flusher)
        if self._chans[rank] is not None:
            self._chans[rank].close()
        self._chans[rank] = Receiver(reader)
        self._broken.pop(rank, None)
        self.procs[rank] = p
        self._starting[rank] = time.monotonic()

    def _send(self, rank: int, msg) -> None:
        self._inboxes[rank].put(msg)

    def _send_ctl(self, rank: int, msg) -> None:
        self._ctls[rank].put(msg)

    def _send_all(self, ranks, msg, ctl: bool = False) -> None:
        feeds = self._ctls if ctl else self._inboxes
        data = frame(msg)  # pickled once for all of them: a Task goes to every rank of its job
        for r in ranks:
            feeds[r].put_frame(data)

    def _poll(self, timeout_s: float) -> list:
        chans = {ch: r for r, ch in enumerate(self._chans) if ch is not None}
        msgs: list = []
        ready = wait_for(list(chans), timeout_s)
        while ready:
            for ch in ready:
                msgs += self._read(chans[ch], ch)
            # A message under way is read to its end while its worker keeps writing it; one that
            # stalls for a poll is left for the next call (a dead writer reads as end of file).
            partial = [ch for ch in chans if ch.partial]
            ready = wait_for(partial, self.poll_s) if partial else []
        return msgs

    def _read(self, rank: int, ch: Receiver) -> list:
        got = ch.read()
        msgs = [m for m in got if isinstance(m, TO_DRIVER)]
        why = ch.broken
        if len(msgs) < len(got):
            bad = next(m for m in got if not isinstance(m, TO_DRIVER))
            why = f"it sent a {type(bad).__name__}, not a message to the driver"
        if why is not None:
            self._break(rank, why)
        return msgs

    def _break(self, rank: int, why: str) -> None:
        """Worker `rank`'s channel ended: the worker is lost (and killed, if it still runs)."""
        self._chans[rank].close()
        self._chans[rank] = None
        self._broken[rank] = why
        self._alive_now = None
        p = self.procs[rank]
        p.join(0.5)  # after end of file it is exiting: let its exit code show
        if p.is_alive():
            p.kill()  # certain; it is reaped later (`is_alive`), the loop does not wait for it

    def _kill_hung(self, rank: int, why: str) -> None:
        self._chans[rank].close()  # nothing more of it is read: a late result would be stale
        self._chans[rank] = None
        self._broken[rank] = f"declared hung: {why}"
        self._alive_now = None
        self.procs[rank].kill()  # SIGKILL ends a stopped process too

    def _alive(self, rank: int) -> bool:
        return rank not in self._broken and self.procs[rank].is_alive()

    def _alive_all(self) -> list[int]:
        # One poll over every process's sentinel (readable once it exited) instead of a poll
        # each: at 64 workers the engine's liveness checks were a large part of a decision.
        procs = {self.procs[r].sentinel: r for r in range(self.n) if r not in self._broken}
        ended = set(wait_for(list(procs), 0)) if procs else set()
        for s in ended:
            self.procs[procs[s]].is_alive()  # reaps it: its exit code shows
        return sorted(r for s, r in procs.items() if s not in ended)

    def _death(self, rank: int) -> str:
        why = self._broken.get(rank, "")
        if why.startswith("declared hung"):
            return f"worker {rank} was {why}, and killed"
        return (f"worker {rank} died (exit code {self.procs[rank].exitcode}"
                + (f"; its channel: {why})" if why else ")"))

    def replace(self, ranks: list[int]) -> None:
        """Start new processes for dead workers `ranks`; the survivors leave the old world after
        their queued jobs and join the new one (keeping models and resident states).  Does not
        wait: jobs submitted from now on queue behind the restart on every worker.  A closed
        pool starts nothing."""
        ranks = sorted(set(ranks))
        if self._closed:
            return
        if any(self._alive(r) for r in ranks):
            raise ValueError(f"replace: worker(s) {ranks} are not all dead")
        self._lose_jobs_of(ranks)
        world = self._next_world(self._members)  # the same ranks, a new world
        spec = dataclasses.replace(self.spec, faults={})  # faults do not follow into successors
        for r in ranks:
            self._spawn(r, world, spec)
        for r in range(self.n):
            if r not in ranks:
                self._send(r, Restart(world, self._members))
        self._alive_now = None
        self.restarts += len(ranks)

    def close(self) -> None:
        """Stop every worker and release everything the pool holds, within `close_grace_s` +
        `close_reap_s` whatever the workers' state (busy, stopped, stuck, starting, dead): they
        get their `Shutdown` and one shared grace period, then SIGKILL.  Nothing is left for the
        interpreter's exit to wait on: no live child (multiprocessing joins its children at
        exit, without a timeout), no thread of its own left, no store connection."""
        if self._closed:
            return
        self._closed = True
        for r, p in enumerate(self.procs):
            if p is not None and self._alive(r):
                self._inboxes[r].put(Shutdown())
        procs = [p for p in self.procs if p is not None]
        for limit in (self.close_grace_s, self.close_reap_s):
            deadline = time.monotonic() + limit
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
            for p in procs:
                if p.is_alive():
                    p.kill()
        for ch in self._chans:
            if ch is not None:
                ch.close()
        for feed in [*self._inboxes, *self._ctls]:
            if feed is not None:
                feed.close()
        self._flusher.close()
        self._lifeline_w.close()  # any worker still up (none should be) ends now
        self._lifeline.close()
        self._server.close()
        if self._exchange is not None:
            shutil.rmtree(self._exchange, ignore_errors=True)
