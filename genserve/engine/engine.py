"""The real engine: the executor core driving worker processes on a real clock.

Same loop, policies and checks as the simulator (`genserve.executor`): at every decision point
(an arrival, a job done, a cancellation, a worker lost, a policy's wake-up) the core builds a
`SchedulerState`, asks the policy for a `Plan`, validates it, and hands each assignment to the
worker set it names without waiting for any one of them: several groups run at once.  What is
the engine's own (states resident on workers, moves, checkpoints, cancellation, worker loss) is
in its backend, `genserve.engine.backend`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

import numpy as np

from ..executor import ExecResult, ExecutorCore
from ..executor.clock import RealClock
from ..latency import LatencyModel
from ..models.output import Encoded
from ..parallel.protocol import OutputFormat
from ..parallel.saver import scratch_dir
from ..parallel.workers import PoolBase
from ..policies.base import Policy
from ..request import Request
from .backend import Resume, WorkerBackend


@dataclass
class EngineResult(ExecResult):
    # Finished outputs: raw arrays, or `models.output.Encoded` files (`Engine(output=...)`).
    outputs: dict[str, np.ndarray | Encoded] = field(default_factory=dict)
    # Per request: (start, end, GPU set) of every quantum it ran.
    timeline: dict[str, list[tuple[float, float, tuple[int, ...]]]] = field(default_factory=dict)
    restarts: int = 0        # workers replaced
    moves_bytes: int = 0     # state bytes shipped through the driver
    output_bytes: int = 0    # output bytes that reached the driver (arrays, or encoded files)


class Engine:
    def __init__(self, policy: Policy, pool: PoolBase, latency: LatencyModel,
                 gpus_per_node: int = 8, time_scale: float = 1.0, poll_s: float = 0.005,
                 checkpoint_every: int = 4, on_update=None, idle_poll_s: float = 0.05,
                 clock=None, output: OutputFormat | None = None, on_checkpoint=None,
                 checkpoint_dir: str | None = None):
        """`on_update(request, output)` is called from the engine's thread whenever a request
        arrives, runs steps, pauses or ends (`output` when it finished: the image/video array, or
        its `Encoded` file).  `output`: None, outputs come back as raw arrays (bit-exact checks);
        an `OutputFormat`, workers encode them (PNG / MP4) and only the files reach the driver,
        each request finishing when its file arrives (see `backend`).
        `clock`: a `RealClock(time_scale)` by default; a `VirtualClock` runs the engine on
        predicted times (with a pool that honours them: the parity test).
        `on_checkpoint(request_id, steps_done, saved)` is called from the engine's thread with
        every checkpoint (every `checkpoint_every` steps): `saved` is the path of the file a
        worker wrote, or the state's bytes on a pool that shares no files with its workers (Ray).
        It must not block.
        `checkpoint_dir`: where workers write checkpoints, left to its owner to clean (the
        server's job store); None: a scratch directory per run, in memory where the machine has
        /dev/shm, removed with everything in it when the run ends."""
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 steps (0: never), got "
                             f"{checkpoint_every}")
        self.policy, self.pool, self.latency = policy, pool, latency
        self.clock = clock or RealClock(time_scale)
        self.on_update = on_update
        self._opts = dict(checkpoint_every=checkpoint_every, poll_s=poll_s,
                          idle_poll_s=idle_poll_s, gpus_per_node=gpus_per_node, output=output,
                          on_checkpoint=on_checkpoint)
        self.checkpoint_dir = checkpoint_dir
        self._halt = False
        self._scratch: str | None = None
        self._new_core(keep=True, running=False)

    def _new_core(self, keep: bool, running: bool = True) -> None:
        """`running`: for a run or `serve` (the constructor's core runs nothing: no scratch)."""
        pool = self.pool
        self.res = EngineResult(requests=[], num_gpus=pool.n, busy_gpu_s=0.0, end_time=0.0,
                                decisions=0, preemptions=0, migrations=0)
        self._drop_scratch()
        where, owns = "", False
        if pool.shares_files and self._opts["checkpoint_every"] and running:
            where, owns = self.checkpoint_dir, False
            if where is None:
                where = scratch_dir("genserve-ck-", _scratch_root())
                self._scratch = where
                owns = True
        self.backend = WorkerBackend(pool, self.clock, keep=keep, result=self.res,
                                     checkpoint_dir=str(where), owns_checkpoints=owns,
                                     **self._opts)
        self.core = ExecutorCore(self.backend.cluster(), self.latency, self.policy, self.backend,
                                 self.clock, listener=self.on_update, keep=keep, result=self.res)

    @property
    def cluster(self):
        return self.core.cluster

    @property
    def _t0(self) -> float:
        return self.clock.t0

    def now(self) -> float:
        return self.clock()

    def cancel(self, request_id: str) -> None:
        """Cancel a request (thread-safe); it stops at its next step boundary."""
        self.backend.cancels.put(request_id)

    def submit(self, request: Request, checkpoint: str | None = None) -> None:
        """Add a request while `serve` runs (thread-safe).  Its `arrival` is on the engine clock
        (`now()`); set it to `now()` for a request arriving now.  `checkpoint`: the file of its
        saved state at `request.steps_done` steps (a request resumed after a restart), which
        the workers read."""
        if checkpoint is not None:
            if not 0 < request.steps_done < request.steps:
                raise ValueError(f"request {request.id}: a saved state needs 0 < steps_done < "
                                 f"steps, got {request.steps_done}/{request.steps}")
            request = Resume(request, str(checkpoint))
        self.backend.incoming.put(request)

    def halt(self) -> None:
        """Make `serve` return at its next iteration, even with work left (shutdown)."""
        self._halt = True

    @property
    def down_workers(self) -> tuple[int, ...]:
        """Workers the pool is still replacing, as of the loop's last look (thread-safe read)."""
        return self.backend.down

    def predicted_end(self, job_id: int) -> float:
        """When the quantum of pool job `job_id` is expected to end (clock seconds)."""
        return self.core.inflight[self.backend.jobs[job_id]].end

    def run(self, requests: list[Request], cancel_at: dict[str, float] | None = None
            ) -> EngineResult:
        """Serve `requests` (arrival times on the engine clock, seconds from now) and return when
        all have ended; `cancel_at` cancels requests at given times, as a client would."""
        if len({r.id for r in requests}) != len(requests):
            raise ValueError("request ids must be unique")
        self._new_core(keep=True)
        if not self.clock.virtual:
            self.clock.restart()  # a run's clock starts now; a server's started with the engine
        for r in sorted(requests, key=lambda r: (r.arrival, r.id)):
            self.core.add(r)
        self.res.requests = list(requests)
        self.backend.timed_cancels = sorted((t, rid) for rid, t in (cancel_at or {}).items())
        try:
            self.core.run(lambda: self._halt or self.core.drained())
        finally:
            self._drop_scratch()
        return self.res

    def serve(self, stop) -> EngineResult:
        """Serve requests given to `submit` until `stop` (a threading.Event) is set and nothing is
        left to do.  Ended requests are forgotten (after `on_update` saw them)."""
        incoming, cancels = self.backend.incoming, self.backend.cancels
        self._new_core(keep=False)
        self.backend.incoming, self.backend.cancels = incoming, cancels
        try:
            self.core.run(lambda: self._halt or (stop.is_set() and self.core.drained()
                                                and self.backend.incoming.empty()))
        finally:
            self._drop_scratch()
        return self.res

    def _drop_scratch(self) -> None:
        """The run's scratch checkpoint directory goes with the run (a late file with it)."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def _scratch_root() -> str | None:
    """/dev/shm where it has room for a few hundred video states (a container's default 64 MB
    does not), else the temporary directory."""
    try:
        if shutil.disk_usage("/dev/shm").free >= 4 << 30:
            return "/dev/shm"
    except OSError:
        pass
    return None
