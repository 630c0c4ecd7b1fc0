"""The engine's backend of the executor core: quanta carried out as jobs on worker processes.

Where a request's state lives (`Request.gpus`): after a quantum it stays resident on the workers
that ran it (each member of an SP group holds a copy).  A request planned on the same set again
costs no transfer (nor on a subset of it).  Planned elsewhere, its state goes straight from a holder
to the new set (`parallel/transfer.py`; a rank of the new set that holds it broadcasts it instead):
the decision only sends messages and the job waits on its worker for the state, so the loop never
waits for a move; a state whose holder dies first comes back lost and the request resumes from its
checkpoint.  A new request travels as its prompt: the worker encodes it inside the job, so the loop
never waits for a text encoder.

Checkpoints: every `checkpoint_every` steps the job also saves the state, the restart point if its
worker dies.  With a `checkpoint_dir` (on a pool whose workers share this machine's files) the
worker writes it there itself and reports the path (`Saved`, `parallel/saver.py`): the bytes never
reach the driver, whose loop they used to stall.  A resume reads the file on the job's workers
(`Stored`).  Without one (Ray), the state comes back in the run's result and is kept in memory.
A checkpoint counts once it is reported: a newer one replaces it (its file goes), one older than
what the request holds, or for a request that ended, is deleted.

Outputs: raw arrays in the run's result (`output=None`: exactness tests, replay), or encoded on
the worker (`OutputFormat`: the server).  An encoded output comes in an `Output` message of its
own after decode (see `worker_main.Encoder`); meanwhile its request is `Finishing`: off the GPUs
(the quantum ends and frees them at the run's `Done`), all steps done, still RUNNING.  It
finishes when its `Output` arrives (fails if encoding failed); if its worker dies first, it rolls
back to its checkpoint and runs again, like any request a dead worker held.

Failures: a request whose prepare or step raises (bad input, out of memory) fails alone with the
reason; a worker that dies is replaced (`replace` of the pool) and the requests it held resume from
their last checkpoint, or start over; every request ends exactly once.  A replacement the
pool cannot place yet (a Ray node gone and no room elsewhere) is `down`: plans leave it out until
it is back, and the others carry the load meanwhile.
"""

from __future__ import annotations

import logging
import os
import queue as queue_mod
from dataclasses import dataclass

from ..executor import (Backend, Cancelled, Ended, Failed, Finishing, Outcome, Quantum,
                        RolledBack, Stepped)
from ..models.output import Encoded
from ..parallel.protocol import (Held, Incoming, JobError, JobLost, Moved, New, Output,
                                 OutputFormat, Resident, Run, RunResult, Saved, Stored)
from ..parallel.workers import PoolBase, WorkerError, WorkerLost
from ..policies.base import Assignment, Cluster
from ..request import Request


log = logging.getLogger("genserve.engine")


@dataclass(frozen=True)
class Resume:
    """A request that comes back with its checkpoint file (`parallel/saver.py`) at its
    `steps_done`: a restarted server resuming what it had accepted."""

    request: Request
    path: str


@dataclass(frozen=True)
class Checkpoint:
    """A request's restart point: its state at `steps`, in the file `path` or (no shared
    directory) in memory as `state`."""

    steps: int
    path: str = ""
    state: bytes = b""

    def member(self, rid: str) -> Stored | Moved:
        return Stored(rid, self.path) if self.path else Moved(rid, self.state)


class WorkerBackend(Backend):
    # False: the old way of moving a state, through the driver (the decision fetches it from its
    # holder, then ships its bytes in the job).  Kept for bench/data_path.py's comparison; on the
    # class, since the engine makes a backend per run.
    direct_moves = True

    def __init__(self, pool: PoolBase, clock, checkpoint_every: int, poll_s: float,
                 idle_poll_s: float, gpus_per_node: int, keep: bool, result,
                 output: OutputFormat | None = None, on_checkpoint=None,
                 checkpoint_dir: str = "", owns_checkpoints: bool = False):
        """`checkpoint_dir`: where workers write checkpoints (empty: they come back as bytes);
        `owns_checkpoints`: whether a request's file goes when it ends (the engine's scratch
        directory), or stays for the directory's owner (the server's job store) to remove."""
        self.pool, self.clock, self.output = pool, clock, output
        self.on_checkpoint = on_checkpoint
        self.checkpoint_dir, self.owns_checkpoints = checkpoint_dir, owns_checkpoints
        self.checkpoint_every, self.poll_s, self.idle_poll_s = (checkpoint_every, poll_s,
                                                                idle_poll_s)
        self.gpus_per_node, self.keep, self.res = gpus_per_node, keep, result
        self.incoming: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self.cancels: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self.timed_cancels: list[tuple[float, str]] = []
        self.host: dict[str, Checkpoint] = {}
        self.reading: dict[str, str] = {}  # request -> the checkpoint file its job reads
        self._early_saves: list[Saved] = []  # for requests in flight: judged once they land
        self.cancel_pending: set[str] = set()
        self.jobs: dict[int, int] = {}  # pool job id -> quantum key
        self.down: tuple[int, ...] = ()
        self.awaiting: dict[str, int] = {}  # Finishing request -> the rank encoding its output
        self._early: list[Output] = []  # outputs that came before their run's result

    def cluster(self) -> Cluster:
        """The pool's real layout when it knows one (Ray: which GPUs share a node), else the
        uniform `gpus_per_node` (one machine, or a simulated layout for experiments)."""
        return Cluster(self.pool.n, min(self.gpus_per_node, self.pool.n), self.pool.nodes)

    # ----- events from outside the loop -----
    def take_external(self) -> None:
        while not self.incoming.empty():
            item = self.incoming.get()
            if isinstance(item, Resume):
                self.host[item.request.id] = Checkpoint(item.request.steps_done, item.path)
                item = item.request
            self.core.add(item)

    def events(self, now: float) -> bool:
        changed = False
        while self.timed_cancels and self.timed_cancels[0][0] <= now:
            self.cancels.put(self.timed_cancels.pop(0)[1])
        if not self.cancels.empty():
            self.take_external()  # a cancel is put after its submit: what it names is in by now
        while not self.cancels.empty():
            self._cancel(self.cancels.get(), now)
            changed = True
        if self.output is not None:  # before deaths: what arrived is kept
            changed = self._take_outputs(now) or changed
        self._take_saved()
        return self._recover(now) or changed

    def _cancel(self, rid: str, now: float) -> None:
        r = self.core.by_id.get(rid)
        if r is None or r.is_final:
            return
        q = self.core.in_flight(rid)
        if q is not None:  # stops at the job's next step boundary; the first rank decides
            self.pool.cancel((min(q.gpus),), [rid])
            self.cancel_pending.add(rid)
            return
        if r.gpus:
            self.pool.drop(r.gpus, [rid])
        self.core.end(r, now, cancelled=True)

    def unavailable(self) -> set[int]:
        return set(self.down)

    def expecting(self) -> bool:
        return bool(self.down)

    # ----- starting a quantum -----
    def source(self, a: Assignment, members: list[Request], now: float) -> Run | None:
        if set(a.gpus) & set(self.pool.dead()):
            return None  # a death noticed since the plan began: recover, then plan again
        srcs = tuple(self._source(m, a.gpus, now) for m in members)
        every = self.checkpoint_every
        want = tuple(m.id for m in members if every and m.remaining_steps > a.steps
                     and (m.steps_done + a.steps) // every > m.steps_done // every)
        return Run(members[0].model, srcs, a.steps, want, self.output,
                   self.checkpoint_dir if want else "", cfg_split=a.cfg_split)

    def _source(self, r: Request, gpus: tuple[int, ...], now: float
                ) -> Resident | Held | Incoming | Moved | Stored | New:
        """What the job needs to run `r` on `gpus`: its state from where it lives (see
        `_from_holders`), from its checkpoint (a file, or bytes), or the prompt (a new request,
        encoded by the worker).  Waits for nothing: a move is asked for once the job is submitted."""
        if r.gpus and set(r.gpus) == set(gpus):
            return Resident(r.id)
        if r.gpus:
            member = self._from_holders(r, gpus)
            if member is not None:
                return member
            self._roll_back(r, now)  # the holder is gone: fall back to the checkpoint
        if r.steps_done:
            ck = self.host.get(r.id)
            if ck is None or ck.steps != r.steps_done:
                self._roll_back(r, now)
                ck = self.host.get(r.id)
            if ck is not None:
                if ck.path:
                    self.reading[r.id] = ck.path
                return ck.member(r.id)
        return New(r.id, r.spec)

    def _from_holders(self, r: Request, gpus: tuple[int, ...]
                      ) -> Resident | Held | Incoming | Moved | None:
        """`r`'s state from the live workers that hold it: every rank of the job does (resident),
        one does (`Held`: it broadcasts it in the job's group), or none (`Incoming`: the first
        holder sends it, see `start`).  Holders not needed drop their copies.  None: no holder
        is alive (or, on the old path, the fetch failed)."""
        alive = set(self.pool.alive())
        holders = [g for g in r.gpus if g in alive]
        inside = [g for g in holders if g in gpus]
        if not holders:
            return None
        if set(gpus) <= set(holders):
            member, keep = Resident(r.id), set(gpus)
        elif not self.direct_moves:
            member, keep = self._fetch(r, holders[0]), set()
        elif inside:
            member, keep = Held(r.id, inside[0]), set(inside)
        else:
            member, keep = Incoming(r.id, holders[0], self.pool.transfer_id()), {holders[0]}
        if set(r.gpus) - keep:
            self.pool.drop(set(r.gpus) - keep, [r.id])
        return member

    def _fetch(self, r: Request, holder: int) -> Moved | None:
        """The old path: the state through the driver, which waits for it (up to a minute)."""
        try:
            blob = self.pool.fetch(holder, [r.id]).get(r.id)
        except (WorkerLost, WorkerError, TimeoutError):
            return None
        if blob is None:
            return None
        self.res.moves_bytes += len(blob)
        return Moved(r.id, blob)

    def start(self, q: Quantum, members: list[Request], job: Run) -> bool:
        moves = [m for m in job.members if isinstance(m, Incoming)]
        try:
            jid = self.pool.submit(q.gpus, job)
        except WorkerLost:  # a member found dead at submit: as a lost job
            for m in moves:  # never asked to send: its holder forgets it
                self.pool.drop([m.src], [m.rid])
            outcomes = self._lost(q)
            for rid, o in outcomes.items():
                r = self.core.by_id[rid]
                if isinstance(o, Cancelled):
                    self.core.end(r, q.start, cancelled=True)
                else:
                    self.core.roll_back(r, q.start, o.steps_done)
            return False
        self.jobs[jid] = q.key
        # Asked for after the job, assignment after assignment: the holders send in the order the
        # receivers take them (see parallel/transfer.py).
        for m in moves:
            self.pool.send_state(m.src, m.rid, min(q.gpus), m.transfer)
        return True

    # ----- results -----
    def wait(self, until: float | None) -> None:
        if self.clock.virtual:
            if until is not None:
                self.clock.advance_to(until)
            return
        if not (self.incoming.empty() and self.cancels.empty()):
            return
        wait = self.poll_s if self.core.inflight or self.core.finishing else self.idle_poll_s
        if until is not None:
            wait = min(wait, self.clock.seconds_until(until))
        self.pool.finished(timeout_s=wait)

    def next_end(self) -> float | None:
        """On the virtual clock (the parity test) a job ends when predicted."""
        if self.clock.virtual and self.core.inflight:
            return min(q.end for q in self.core.inflight.values())
        return None

    def ended(self, now: float) -> list[Ended]:
        out = []
        for jid in self.pool.finished(timeout_s=0.0):
            key = self.jobs.pop(jid, None)
            res = self.pool.result(jid)
            if key is None:  # a job of an earlier run on this pool, halted with it in flight
                continue
            q = self.core.inflight[key]
            if isinstance(res, JobLost):
                outcomes = self._lost(q)
            elif isinstance(res, JobError):  # not pinned on one request (SP > 1): all fail
                self.pool.drop(q.gpus, list(q.requests))
                outcomes = {rid: Failed(f"worker_error: {res.message}".strip())
                            for rid in q.requests}
            else:
                if self.keep:
                    for rid in (x for x in q.requests if x not in res.result.lost):
                        self.res.timeline.setdefault(rid, []).append((q.start, now, q.gpus))
                outcomes = {rid: self._outcome(rid, res.result, q) for rid in q.requests}
            for rid in q.requests:
                self.reading.pop(rid, None)
            ran = q.cost if self.clock.virtual else now - q.start
            out.append(Ended(q.key, ran, outcomes))
        return out

    def _outcome(self, rid: str, res: RunResult, q: Quantum) -> Outcome:
        """`rid`'s outcome of the run (`Finishing`: every step done, its output is being encoded
        on the job's first rank and comes in an `Output` message of its own)."""
        r = self.core.by_id[rid]
        if rid in res.lost:  # its state never came (its holder died): back to its checkpoint
            if rid in self.reading:  # that checkpoint: unreadable, it starts over
                log.warning("request %s: %s; it starts over", rid, res.lost[rid])
                self._forget_checkpoint(rid)
            return (Cancelled() if rid in self.cancel_pending
                    else RolledBack(self._checkpoint_step(rid)))
        if rid in res.failed:
            return Failed(res.failed[rid])
        if rid in res.cancelled:
            return Cancelled()
        steps = res.steps[rid]
        if rid in res.blobs:
            self._keep(rid, Checkpoint(steps, state=res.blobs[rid]))
        if steps == r.steps:
            if self.output is not None:
                self.awaiting[rid] = min(q.gpus)  # the first rank decodes and encodes
                return Finishing(steps)
            out = res.outputs[rid]
            self.res.output_bytes += out.nbytes
            if self.keep:
                self.res.outputs[rid] = out
            return Stepped(steps, out)
        if rid in self.cancel_pending:
            self.pool.drop(q.gpus, [rid])
            return Cancelled()
        return Stepped(steps)

    # ----- encoded outputs -----
    def _take_outputs(self, now: float) -> bool:
        """Finish the requests whose `Output` came (`core.finishing`).  One that comes before its run's result
        waits for it; one for a request no longer awaited (cancelled, or rolled back after its
        worker was taken for dead) is dropped."""
        got, self._early = self._early + self.pool.outputs(), []
        changed = False
        for o in got:
            r = self.core.by_id.get(o.rid)
            if o.rid not in self.awaiting:
                if r is not None and self.core.in_flight(o.rid) is not None:
                    self._early.append(o)
                continue
            del self.awaiting[o.rid]
            changed = True
            if o.error is not None:
                self.core.end(r, now, failed=o.error)
                continue
            out = Encoded(o.data, o.media_type)
            self.res.output_bytes += len(o.data)
            if self.keep:
                self.res.outputs[o.rid] = out
            self.core.complete(r, now, out)
        return changed

    def _lost_outputs(self, dead: set[int], now: float) -> None:
        """Finishing requests whose encoding worker died: their output is gone with it; they run
        again from their checkpoints (or the start)."""
        for rid, rank in list(self.awaiting.items()):
            if rank in dead:
                del self.awaiting[rid]
                self._roll_back(self.core.by_id[rid], now)

    def on_end(self, r: Request) -> None:
        self.awaiting.pop(r.id, None)  # a cancel while its output was being encoded
        if r.id in self.cancel_pending:  # clears the worker's cancel mark
            self.cancel_pending.discard(r.id)
            if r.gpus:
                self.pool.drop(r.gpus, [r.id])
        ck = self.host.pop(r.id, None)
        if ck is not None and ck.path and self.owns_checkpoints:
            _unlink(ck.path)

    # ----- checkpoints -----
    def _take_saved(self) -> None:
        """Adopt the checkpoint files workers reported (`Saved`).  Any step up to the one a
        request reached is a valid restart point (steps are deterministic).  One beyond it, for a
        request in flight, waits for the job's result (the file may come first)."""
        got, self._early_saves = self._early_saves + self.pool.saved(), []
        for s in got:
            if s.directory and s.directory != self.checkpoint_dir:
                # An earlier run's on this pool, late: its request may share an id with one of
                # this run, and its file is that run's to keep or remove.
                log.debug("request %s: a checkpoint for another run's directory %s ignored",
                          s.rid, s.directory)
                continue
            r = self.core.by_id.get(s.rid)
            if s.error is not None:
                # Only a request still running needs it: a failed save of an earlier run's
                # request on this pool (its scratch directory went with that run while the
                # worker's saver still wrote) or of an ended one costs nothing.
                if r is None or r.is_final:
                    log.debug("request %s: checkpoint at step %d not saved (%s), and not needed",
                              s.rid, s.steps, s.error)
                    continue
                log.warning("request %s: checkpoint at step %d not saved: %s", s.rid, s.steps,
                            s.error)
                continue
            if (r is not None and not r.is_final and s.steps > r.steps_done
                    and self.core.in_flight(s.rid) is not None):
                self._early_saves.append(s)
                continue
            ck = self.host.get(s.rid)
            if (r is None or r.is_final or s.steps > r.steps_done
                    or (ck is not None and s.steps <= ck.steps)):
                _unlink(s.path)  # it ended, or rolled back past it, or a newer one is held
                continue
            self._keep(s.rid, Checkpoint(s.steps, s.path))

    def _keep(self, rid: str, ck: Checkpoint) -> None:
        """`ck` is `rid`'s restart point from now on; the older one's file goes."""
        old = self.host.get(rid)
        self.host[rid] = ck
        if old is not None and old.path and old.path != ck.path:
            _unlink(old.path)
        if self.on_checkpoint is not None:
            self.on_checkpoint(rid, ck.steps, ck.path or ck.state)

    def _forget_checkpoint(self, rid: str) -> None:
        ck = self.host.pop(rid, None)
        if ck is not None and ck.path:
            _unlink(ck.path)

    # ----- failures -----
    def _lost(self, q: Quantum) -> dict[str, Outcome]:
        """A job's worker died: its requests go back to their checkpoints (or the start)."""
        self.pool.drop([g for g in q.gpus if g not in self.pool.dead()], list(q.requests))
        return {rid: Cancelled() if rid in self.cancel_pending
                else RolledBack(self._checkpoint_step(rid)) for rid in q.requests}

    def _checkpoint_step(self, rid: str) -> int:
        """The step of `rid`'s checkpoint to resume from (0: none usable)."""
        r, ck = self.core.by_id[rid], self.host.get(rid)
        if ck and ck.steps > r.steps_done:
            del self.host[rid]
        return ck.steps if ck and ck.steps <= r.steps_done else 0

    def _roll_back(self, r: Request, now: float) -> None:
        self.core.roll_back(r, now, self._checkpoint_step(r.id))

    def _recover(self, now: float) -> bool:
        """Replace newly dead workers; paused requests they held move to surviving copies or go
        back to their checkpoints.  Also notices workers coming back (a Ray pool re-placing
        them, possibly on another node).  Returns whether anything changed."""
        changed = False
        down = tuple(self.pool.down())
        if down != self.down:  # a worker placed again may sit on another node
            self.down, changed, self.core.cluster = down, True, self.cluster()
        dead = set(self.pool.dead())
        if not dead:
            return changed
        self._lost_outputs(dead, now)
        busy = {rid for q in self.core.inflight.values() for rid in q.requests}
        for r in list(self.core.queue.values()):
            if r.id in busy or not set(r.gpus) & dead:
                continue
            left = tuple(g for g in r.gpus if g not in dead)
            if left:
                r.relocate(left)
            else:
                self._roll_back(r, now)
        self.pool.replace(sorted(dead))
        self.res.restarts += len(dead)
        self.down = tuple(self.pool.down())
        return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # a full or read-only disk must not stop the loop
        log.warning("checkpoint %s not removed: %s", path, e)
