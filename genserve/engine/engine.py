"""The real engine: the simulator's policies driving real workers on a real clock.

Same contract as the simulator (`genserve.sim`): at every decision point (an arrival, a job done, a
cancellation, a worker lost, a policy's wake-up) the engine builds a `SchedulerState`, asks the
policy for a `Plan`, validates it with the simulator's own checks, and hands each assignment to the
worker set it names without waiting for any one of them: several groups run at once.

Where a request's state lives (`Request.gpus`): after a quantum it stays resident on the workers
that ran it (each member of an SP group holds a copy).  A request planned on the same set again
costs no transfer; one planned elsewhere is fetched from a holder and shipped with the job (the
move the simulator charges).  A new request travels as its prompt: the worker encodes it inside
the job, so the driver loop never waits for a text encoder.  Every `checkpoint_every` steps the
job also returns the state to host memory: the restart point if its worker dies.

Failures: a request whose prepare or step raises (bad input, out of memory) fails alone with the
reason; a worker that dies is replaced (`replace` of the pool) and the requests it held resume from
their last host-side checkpoint, or start over; every request ends exactly once.  A replacement the
pool cannot place yet (a Ray node gone and no room elsewhere) is `down`: plans leave it out until
it is back, and the others carry the load meanwhile.
"""

from __future__ import annotations

import heapq
import queue as queue_mod
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..latency import LatencyModel
from ..models.base import GenRequest
from ..parallel.protocol import JobError, JobLost, Moved, New, Resident, Run
from ..parallel.workers import PoolBase, WorkerError, WorkerLost
from ..policies.base import Assignment, Cluster, InFlight, Policy, SchedulerState
from ..request import Request, Status
from ..sim.simulator import (PlanError, SimResult, count_reasons, pause_unplanned, place_members,
                             validate_assignment)


@dataclass
class EngineResult(SimResult):
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    # Per request: (start, end, GPU set) of every quantum it ran.
    timeline: dict[str, list[tuple[float, float, tuple[int, ...]]]] = field(default_factory=dict)
    restarts: int = 0        # workers replaced
    recovered: int = 0       # requests rolled back to a checkpoint (or the start) after a loss
    moves_bytes: int = 0     # state bytes shipped through the driver


class Engine:
    def __init__(self, policy: Policy, pool: PoolBase, latency: LatencyModel,
                 gpus_per_node: int = 8, time_scale: float = 1.0, poll_s: float = 0.005,
                 checkpoint_every: int = 4, on_update=None, idle_poll_s: float = 0.05):
        """`on_update(request, output)` is called from the engine's thread whenever a request
        arrives, runs steps, pauses or ends (`output`: the image/video array when it finished)."""
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 steps (0: never), got "
                             f"{checkpoint_every}")
        self.policy, self.pool, self.latency = policy, pool, latency
        self._gpus_per_node = gpus_per_node
        self.cluster = self._cluster()
        self._down: tuple[int, ...] = ()
        self.time_scale = time_scale  # trace seconds per wall second (arrivals only)
        self.poll_s = poll_s
        self.checkpoint_every = checkpoint_every
        self.on_update, self.idle_poll_s = on_update, idle_poll_s
        self._cancels: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self._incoming: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self._t0 = time.monotonic()
        self._halt = False

    def _cluster(self) -> Cluster:
        """The pool's real layout when it knows one (Ray: which GPUs share a node), else the
        uniform `gpus_per_node` (one machine, or a simulated layout for experiments)."""
        return Cluster(self.pool.n, min(self._gpus_per_node, self.pool.n), self.pool.nodes)

    def cancel(self, request_id: str) -> None:
        """Cancel a request (thread-safe); it stops at its next step boundary."""
        self._cancels.put(request_id)

    def submit(self, request: Request) -> None:
        """Add a request while `serve` runs (thread-safe).  Its `arrival` is on the engine clock
        (`now()`); set it to `now()` for a request arriving now."""
        self._incoming.put(request)

    def halt(self) -> None:
        """Make `serve` return at its next iteration, even with work left (shutdown)."""
        self._halt = True

    @property
    def down_workers(self) -> tuple[int, ...]:
        """Workers the pool is still replacing, as of the loop's last look (thread-safe read)."""
        return self._down

    def now(self) -> float:
        return (time.monotonic() - self._t0) * self.time_scale

    # ----- the loop -----
    def run(self, requests: list[Request], cancel_at: dict[str, float] | None = None
            ) -> EngineResult:
        """Serve `requests` (arrival times on the engine clock, seconds from now) and return when
        all have ended; `cancel_at` cancels requests at given times, as a client would."""
        if len({r.id for r in requests}) != len(requests):
            raise ValueError("request ids must be unique")
        self._reset(requests, keep=True)
        self._timed_cancels = sorted((t, rid) for rid, t in (cancel_at or {}).items())
        self._loop(lambda: not (self._arrivals or self.queue or self.inflight))
        self.res.end_time = self.now()
        return self.res

    def serve(self, stop) -> EngineResult:
        """Serve requests given to `submit` until `stop` (a threading.Event) is set and nothing is
        left to do.  Ended requests are forgotten (after `on_update` saw them)."""
        self._reset([], keep=False)
        self._loop(lambda: stop.is_set() and not (self._arrivals or self.queue or self.inflight
                                                   or not self._incoming.empty()))
        self.res.end_time = self.now()
        return self.res

    def _reset(self, requests: list[Request], keep: bool) -> None:
        if keep:  # a run's clock starts now; a server's clock started with the engine
            self._t0 = time.monotonic()
        self._keep = keep
        self.by_id = {r.id: r for r in requests}
        self._arrivals: list[tuple[float, str]] = sorted((r.arrival, r.id) for r in requests)
        self._timed_cancels: list[tuple[float, str]] = []
        self.queue: dict[str, Request] = {}
        self.inflight: dict[int, tuple[Assignment, float]] = {}
        self.host: dict[str, tuple[bytes, int]] = {}      # checkpoints: (state, steps done)
        self.cancel_pending: set[str] = set()
        self.free = set(range(self.cluster.num_gpus))
        self.res = EngineResult(requests=list(requests), num_gpus=self.cluster.num_gpus,
                                busy_gpu_s=0.0, end_time=0.0, decisions=0, preemptions=0,
                                migrations=0, reasons=Counter())
        self._last_reason: dict[str, str] = {}
        self._wake: float | None = None
        self._replan = False  # an assignment was dropped at dispatch: plan again next turn

    def _loop(self, done) -> None:
        while True:
            self._take_incoming()
            while self._arrivals and self.by_id[self._arrivals[0][1]].is_final:
                heapq.heappop(self._arrivals)  # cancelled before it arrived
            if done() or self._halt:
                return
            now = self.now()
            changed = self._wake is not None and now >= self._wake
            if changed:
                self._wake = None
            if self._replan:
                changed, self._replan = True, False
            while self._arrivals and self._arrivals[0][0] <= now:
                r = self.by_id[heapq.heappop(self._arrivals)[1]]
                if not r.is_final:
                    self.queue[r.id] = r
                    self._notify(r)
                    changed = True
            while self._timed_cancels and self._timed_cancels[0][0] <= now:
                self.cancel(self._timed_cancels.pop(0)[1])
            if not self._cancels.empty():
                # A cancel is put after its submit: whatever it names is in _incoming by now.
                self._take_incoming()
            while not self._cancels.empty():
                self._cancel(self._cancels.get(), now)
                changed = True
            wait = 0.0
            if not changed and self._incoming.empty():
                # Block on the workers until the next arrival, wake-up or timed cancel.
                due = [t for t in (self._wake,
                                   self._arrivals[0][0] if self._arrivals else None,
                                   self._timed_cancels[0][0] if self._timed_cancels else None)
                       if t is not None]
                wait = self.poll_s if self.inflight else self.idle_poll_s
                if due:
                    wait = min(wait, max((min(due) - now) / self.time_scale, 0.0))
            for job in self.pool.finished(timeout_s=wait):
                self._complete(job, self.now())
                changed = True
            if self._recover(self.now()):
                changed = True
            if changed and self.queue and self.free:
                now = self.now()
                asked = self._decide(now)
                if asked is not None and asked > now and (self._wake is None
                                                          or asked < self._wake):
                    self._wake = asked
                if (not self.inflight and self.queue and not self._arrivals
                        and self._wake is None and not self._down and not self._replan):
                    raise PlanError(f"policy {self.policy.describe()} stalled at t={now:.3f}: "
                                    f"{len(self.queue)} requests wait, nothing runs")

    def _take_incoming(self) -> None:
        while not self._incoming.empty():
            r = self._incoming.get()
            if r.id in self.by_id:
                raise ValueError(f"request id {r.id!r} is already in the engine")
            self.by_id[r.id] = r
            heapq.heappush(self._arrivals, (r.arrival, r.id))

    def _notify(self, r: Request, output=None) -> None:
        """Tell the listener (the API layer) that `r` changed: arrived, ran steps, paused, ended."""
        if self.on_update is not None:
            self.on_update(r, output)
        if r.is_final and not self._keep:
            self.by_id.pop(r.id, None)

    # ----- decisions -----
    def _decide(self, now: float) -> float | None:
        """Plan and dispatch; returns the policy's wake-up time, if any.  An assignment whose
        worker is found dead before its job is sent is dropped (or rolled back, if its requests
        were placed already) and `_replan` asks the loop to plan again."""
        running = [self.by_id[rid] for a, _ in self.inflight.values() for rid in a.requests]
        free = self.free.difference(self._down)  # workers Ray has not placed again yet
        state = SchedulerState(
            now=now, cluster=self.cluster, free_gpus=tuple(sorted(free)),
            queue=list(self.queue.values()),
            inflight=[InFlight(a.gpus, a.requests, self._estimated_end(a, t))
                      for a, t in self.inflight.values()],
            latency=self.latency, running=running)
        t0 = time.perf_counter()
        plan = self.policy.schedule(state)
        self.res.decision_wall_s.append(time.perf_counter() - t0)
        self.res.decisions += 1
        count_reasons(plan, self._last_reason, self.res.reasons, now)
        for a in plan.assignments:
            members = validate_assignment(a, free, self.queue, self.latency)
            if set(a.gpus) & set(self.pool.dead()):
                self._replan = True  # a death noticed since the plan began: recover, re-plan
                continue
            srcs = [self._source(m, a.gpus, now) for m in members]
            every = self.checkpoint_every
            want = [m.id for m in members if every and m.remaining_steps > a.steps
                    and (m.steps_done + a.steps) // every > m.steps_done // every]
            self.res.migrations += place_members(members, a.gpus, now, self.queue)
            try:
                job = self.pool.submit(a.gpus, Run(members[0].model, tuple(srcs), a.steps,
                                                   tuple(want)))
            except WorkerLost:  # noticed while the states were being fetched: as a lost job
                self._lose(a, now)
                self._replan = True
                continue
            self.inflight[job] = (a, now)
            self.free.difference_update(a.gpus)
            free.difference_update(a.gpus)
            for m in members:
                self._notify(m)
        paused = [r for r in self.queue.values() if r.status is Status.RUNNING]
        self.res.preemptions += pause_unplanned(self.queue, now)
        for r in paused:
            self._notify(r)
        return plan.wake_at

    def _source(self, r: Request, gpus: tuple[int, ...], now: float) -> Resident | Moved | New:
        """What the job needs to run `r` on `gpus`: nothing (resident there), the state's bytes
        (it moves), or the prompt (a new request, encoded by the worker)."""
        if r.gpus and set(r.gpus) == set(gpus):
            return Resident(r.id)
        if r.gpus:
            alive = self.pool.alive()
            holder = next((g for g in r.gpus if g in alive), None)
            blob = None
            if holder is not None:
                try:
                    blob = self.pool.fetch(holder, [r.id]).get(r.id)
                except (WorkerLost, WorkerError, TimeoutError):
                    blob = None
            self.pool.drop(set(r.gpus) - set(gpus) - {holder}, [r.id])
            if blob is not None:
                self.res.moves_bytes += len(blob)
                return Moved(r.id, blob)
            self._roll_back(r, now)  # the holder is gone: fall back to the checkpoint
        ck = self.host.get(r.id)
        if ck is not None and ck[1] == r.steps_done and r.steps_done > 0:
            return Moved(r.id, ck[0])
        if r.steps_done:
            self._roll_back(r, now)
            if r.id in self.host:
                return Moved(r.id, self.host[r.id][0])
        return New(r.id, GenRequest(id=r.id, prompt=r.prompt, height=r.height, width=r.width,
                                    frames=r.frames, steps=r.steps, guidance=r.guidance,
                                    seed=r.seed))

    def _estimated_end(self, a: Assignment, started: float) -> float:
        lead = self.by_id[a.requests[0]]
        try:
            step = self.latency.request_step_time(lead, len(a.requests), len(a.gpus))
        except ValueError:
            return started
        return started + a.steps * step

    # ----- results -----
    def _complete(self, job: int, now: float) -> None:
        a, started = self.inflight.pop(job)
        outcome = self.pool.result(job)
        self.free.update(a.gpus)
        self.res.busy_gpu_s += (now - started) * len(a.gpus)
        if isinstance(outcome, JobLost):
            self._lose(a, now)
            return
        if isinstance(outcome, JobError):  # not pinned on one request (SP > 1): all fail
            for rid in a.requests:
                self._end(self.by_id[rid], now, failed=f"worker_error: {outcome.message}".strip())
            self.pool.drop(a.gpus, list(a.requests))
            return
        out = outcome.result  # a RunResult
        for rid in a.requests:
            r = self.by_id[rid]
            if self._keep:
                self.res.timeline.setdefault(rid, []).append((started, now, a.gpus))
            if rid in out.failed:
                self._end(r, now, failed=out.failed[rid])
                continue
            if rid in out.cancelled:
                self._end(r, now, cancelled=True)
                continue
            done = out.steps[rid] - r.steps_done
            if done > 0:
                r.advance(done)
            if rid in out.blobs:
                self.host[rid] = (out.blobs[rid], r.steps_done)
            if r.remaining_steps == 0:
                if self._keep:
                    self.res.outputs[rid] = out.outputs[rid]
                r.finish(now)
                self.host.pop(rid, None)
                if rid in self.cancel_pending:  # a cancel that came too late: it finished
                    self.cancel_pending.discard(rid)
                    self.pool.drop(a.gpus, [rid])  # clears the worker's cancel mark
                self._notify(r, out.outputs[rid])
            elif rid in self.cancel_pending:
                self.pool.drop(a.gpus, [rid])
                self._end(r, now, cancelled=True)
            else:
                self.queue[rid] = r
                self._notify(r)

    def _end(self, r: Request, now: float, failed: str | None = None,
             cancelled: bool = False) -> None:
        if failed is not None:
            r.fail(now, failed)
        elif cancelled:
            r.cancel(max(now, r.arrival))  # cancelled before it arrived: at its arrival
        if r.id in self.cancel_pending and r.gpus:
            self.pool.drop(r.gpus, [r.id])  # clears the worker's cancel mark
        self.host.pop(r.id, None)
        self.cancel_pending.discard(r.id)
        self.queue.pop(r.id, None)
        self._notify(r)

    def _cancel(self, rid: str, now: float) -> None:
        r = self.by_id.get(rid)
        if r is None or r.is_final:
            return
        if any(rid in a.requests for a, _ in self.inflight.values()):
            for a, _ in self.inflight.values():
                if rid in a.requests:
                    self.pool.cancel((min(a.gpus),), [rid])  # the first rank decides
            self.cancel_pending.add(rid)
            return
        if r.gpus:
            self.pool.drop(r.gpus, [rid])
        self._end(r, now, cancelled=True)

    # ----- failures -----
    def _lose(self, a: Assignment, now: float) -> None:
        """A job's worker died: its requests go back to their checkpoints (or the start)."""
        self.pool.drop([g for g in a.gpus if g not in self.pool.dead()], list(a.requests))
        for rid in a.requests:
            r = self.by_id[rid]
            if rid in self.cancel_pending:
                self._end(r, now, cancelled=True)
                continue
            self._roll_back(r, now)
            self.queue[rid] = r
            self._notify(r)

    def _roll_back(self, r: Request, now: float) -> None:
        ck = self.host.get(r.id)
        r.rollback(now, ck[1] if ck and ck[1] <= r.steps_done else 0)
        if ck and ck[1] > r.steps_done:
            del self.host[r.id]
        self.res.recovered += 1

    def _recover(self, now: float) -> bool:
        """Replace newly dead workers; paused requests they held move to surviving copies or go
        back to their checkpoints.  Also notices workers coming back (a Ray pool re-placing
        them, possibly on another node).  Returns whether anything changed."""
        changed = False
        down = tuple(self.pool.down())
        if down != self._down:
            # A worker placed again may sit on another node.
            self._down, changed, self.cluster = down, True, self._cluster()
        dead = set(self.pool.dead())
        if not dead:
            return changed
        busy = {rid for a, _ in self.inflight.values() for rid in a.requests}
        for r in list(self.queue.values()):
            if r.id in busy or not set(r.gpus) & dead:
                continue
            left = tuple(g for g in r.gpus if g not in dead)
            if left:
                r.relocate(left)
            else:
                self._roll_back(r, now)
        self.pool.replace(sorted(dead))
        self.res.restarts += len(dead)
        self._down = tuple(self.pool.down())
        return True
