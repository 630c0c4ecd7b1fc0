"""Spawned processes for the multi-process tests.

`run_world(target, world, tmp_path, *args)`: a fresh world of `world` processes for one call;
`target(rank, world, init_method, *args, out_queue)` must put `(rank, result)` on the queue.

`WorldPool`: processes spawned once and reused by many calls (the `world_pool` session fixture in
conftest.py).  Spawning a process that imports torch and diffusers costs several CPU-seconds, far
more than the tiny-model work the tests then do, so the tests share these.  Each call gets a fresh
world all the same: `pool.run(target, world, *args)` runs `target(rank, world, init_method, *args)`
on ranks 0..world-1 with a new rendezvous, and returns `{rank: what target returned}`.  A target
that uses torch.distributed initialises the default group from `init_method` and destroys it
before returning, as it would in a process of its own.  A call whose rank raises, dies or times
out fails with the rank's traceback, and the pool is torn down (ranks still blocked in a
collective cannot be trusted again); the next call spawns new processes.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import tempfile
import time
import traceback


def run_world(target, world: int, tmp_path, *args, timeout_s: float = 300.0) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = f"file://{os.path.join(tmp_path, 'rdzv')}"
    procs = [ctx.Process(target=target, args=(r, world, init, *args, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=timeout_s) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return res


def _serve(rank: int, inbox, outbox) -> None:
    """A pool process: run each task sent to this rank, send back its result or traceback."""
    parent = mp.parent_process()
    while True:
        try:
            task = inbox.get(timeout=1.0)
        except queue.Empty:
            if not parent.is_alive():  # pytest was killed: do not linger
                os._exit(1)
            continue
        if task is None:  # the parent has every result: skip the slow interpreter teardown
            os._exit(0)
        tid, target, world, init, args = task
        try:
            result = target(rank, world, init, *args)
            pickle.dumps(result)  # fails here, reported, rather than in the queue's thread
            outbox.put((tid, rank, True, result))
        except BaseException:  # noqa: BLE001 - reported to the test, which fails
            outbox.put((tid, rank, False, traceback.format_exc()))


class WorldFailed(AssertionError):
    pass


class Pending:
    def __init__(self, tid: int, world: int, label: str):
        self.tid, self.world, self.label = tid, world, label


class WorldPool:
    """Up to `size` spawned processes, started when a call first needs them (see module doc)."""

    def __init__(self, size: int = 4, timeout_s: float = 300.0):
        self.size, self.timeout_s = size, timeout_s
        self._ctx = mp.get_context("spawn")
        self._procs: list = []
        self._inboxes: list = []
        self._outbox = None
        self._pending: Pending | None = None
        self._tid = 0
        self._dir = tempfile.mkdtemp(prefix="genserve-test-world-")
        self.spawned = 0  # processes started so far (a respawn after a failure counts again)
        atexit.register(self.shutdown)  # also when used without the fixture

    def _grow(self, n: int) -> None:
        if self._outbox is None:
            self._outbox = self._ctx.Queue()
        while len(self._procs) < n:
            rank = len(self._procs)
            inbox = self._ctx.Queue()
            p = self._ctx.Process(target=_serve, args=(rank, inbox, self._outbox),
                                  name=f"test-world-rank{rank}")
            p.start()
            self._procs.append(p)
            self._inboxes.append(inbox)
            self.spawned += 1

    def submit(self, target, world: int, *args, label: str | None = None) -> Pending:
        """Start `target` on ranks 0..world-1; `wait` for the results (one call at a time)."""
        assert 1 <= world <= self.size, f"world {world} > pool size {self.size}"
        if self._pending is not None:  # abandoned by a test that failed before its wait
            try:
                self.wait(self._pending)
            except WorldFailed:
                pass
        self._grow(world)
        self._tid += 1
        init = f"file://{os.path.join(self._dir, f'rdzv-{self._tid}')}"
        for r in range(world):
            self._inboxes[r].put((self._tid, target, world, init, args))
        self._pending = Pending(self._tid, world, label or getattr(target, "__name__", "task"))
        return self._pending

    def wait(self, pending: Pending) -> dict:
        assert pending is self._pending, "not the call in flight"
        self._pending = None
        got, errors = {}, {}
        deadline = time.monotonic() + self.timeout_s
        grace = None  # after a failure: a moment for the other ranks' own errors
        while len(got) + len(errors) < pending.world:
            now = time.monotonic()
            if grace is not None and now > grace:
                break
            try:
                tid, rank, ok, val = self._outbox.get(timeout=0.2)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(self._procs[:pending.world])
                        if not p.is_alive() and r not in got and r not in errors]
                for r, code in dead:
                    errors[r] = f"process exited with code {code}"
                if dead and grace is None:
                    grace = now + 2.0
                if now > deadline:
                    missing = sorted(set(range(pending.world)) - set(got) - set(errors))
                    errors.update({r: f"no result within {self.timeout_s:.0f} s" for r in missing})
                    break
                continue
            assert tid == pending.tid, (tid, pending.tid)
            if ok:
                got[rank] = val
            else:
                errors[rank] = val
                if grace is None:
                    grace = time.monotonic() + 2.0
        if errors or len(got) < pending.world:
            self.close(force=True)  # ranks may be stuck in a collective: start afresh next time
            missing = sorted(set(range(pending.world)) - set(got) - set(errors))
            errors.update({r: "no result (another rank failed first)" for r in missing})
            raise WorldFailed(f"{pending.label} on a world of {pending.world}:\n" + "\n".join(
                f"--- rank {r}: {errors[r]}" for r in sorted(errors)))
        return got

    def run(self, target, world: int, *args, label: str | None = None) -> dict:
        return self.wait(self.submit(target, world, *args, label=label))

    def close(self, force: bool = False) -> None:
        """Stop every process (politely unless `force`, then by force) and forget them."""
        if not force:
            for inbox in self._inboxes:
                try:
                    inbox.put(None)
                except (OSError, ValueError):
                    pass
        for p in self._procs:
            if not force:
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for q in [*self._inboxes, self._outbox]:
            if q is not None:
                q.close()
                q.cancel_join_thread()
        self._procs, self._inboxes, self._outbox, self._pending = [], [], None, None

    def shutdown(self) -> None:
        self.close()
        shutil.rmtree(self._dir, ignore_errors=True)
