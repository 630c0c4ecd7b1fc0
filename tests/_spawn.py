"""Processes for the multi-process tests.

`run_world(target, world, tmp_path, *args)`: a fresh world of `world` spawned processes for one
call; `target(rank, world, init_method, *args, out_queue)` must put `(rank, result)` on the queue.

`WorldPool`: processes started once and reused by many calls (the `world_pool` session fixture in
conftest.py).  Spawning a process that imports torch and diffusers costs several CPU-seconds, far
more than the tiny-model work the tests then do, so the tests share these; and they are forked
from a fork server that imported those modules once (`PRELOAD`) rather than each importing them
again (the fork server only imports: it builds no model and runs no torch op).  Each call gets a
fresh world all the same: `pool.run(target, world, *args)` runs
`target(rank, world, init_method, *args)` on ranks 0..world-1 with a new rendezvous and returns
`{rank: what target returned}`.  A target that uses torch.distributed initialises the default
group from `init_method` and destroys it before returning, as it would in a process of its own.
A call whose rank raises, dies or times out fails with the rank's traceback (and the pool
processes' output), and the pool is torn down (ranks still blocked in a collective cannot be
trusted again); the next call starts new processes.

`forked_worker_pools()`: genserve WorkerPools made inside fork their workers from the same server.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import sys
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
    def __init__(self, tid: int, world: int, label: str, log_at: int):
        self.tid, self.world, self.label, self.log_at = tid, world, label, log_at


# What the tests' pool processes import: the tiny presets' diffusers / transformers classes, torch
# and genserve's models and sequence parallelism.  Imported once, in the fork server.
PRELOAD = ("torch", "torch.distributed", "numpy", "genserve.models", "genserve.parallel",
           "genserve.parallel.sequence",
           "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3",
           "diffusers.pipelines.flux.pipeline_flux", "diffusers.pipelines.wan.pipeline_wan",
           "transformers.models.clip.modeling_clip", "transformers.models.t5.modeling_t5",
           "transformers.models.umt5.modeling_umt5")


# The fork server's, hence the pool processes', stdout and stderr: kept out of pytest's output
# (the server outlives any one test's capture), quoted when a call fails.
LOG = os.path.join(tempfile.gettempdir(), f"genserve-test-world-{os.getpid()}.log")


def start_fork_server(preload: tuple[str, ...] = PRELOAD) -> None:
    """Start the fork server now, if not running (it imports `preload` in the background), so
    that the first pool call does not wait for those imports; its output goes to LOG."""
    from multiprocessing import forkserver

    mp.get_context("forkserver").set_forkserver_preload(list(preload))
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    log = os.open(LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        forkserver.ensure_running()  # the server inherits fds 1 and 2 now (if it starts now)
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log):
            os.close(fd)
    if not _cleanup:
        _cleanup.append(atexit.register(lambda: os.path.exists(LOG) and os.unlink(LOG)))


_cleanup: list = []


def _log_since(offset: int, limit: int = 4000) -> str:
    try:
        with open(LOG, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return text if len(text) <= limit else "..." + text[-limit:]


def _log_size() -> int:
    try:
        return os.path.getsize(LOG)
    except OSError:
        return 0


class WorldPool:
    """Up to `size` processes, started when a call first needs them (see module doc).
    `start_method` "spawn" (preload unused) gives each a fresh interpreter instead."""

    def __init__(self, size: int = 4, timeout_s: float = 300.0, start_method: str = "forkserver",
                 preload: tuple[str, ...] = PRELOAD):
        self.size, self.timeout_s = size, timeout_s
        self._ctx = mp.get_context(start_method)
        self._forkserver = start_method == "forkserver"
        self._preload = preload
        self._procs: list = []
        self._inboxes: list = []
        self._outbox = None
        self._pending: Pending | None = None
        self._tid = 0
        self._dir = tempfile.mkdtemp(prefix="genserve-test-world-")
        self.spawned = 0  # processes started so far (a respawn after a failure counts again)
        atexit.register(self.shutdown)  # also when used without the fixture

    def _grow(self, n: int) -> None:
        if self._forkserver and len(self._procs) < n:
            start_fork_server(self._preload)
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
        self._pending = Pending(self._tid, world, label or getattr(target, "__name__", "task"),
                                _log_size())
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
            log = _log_since(pending.log_at) if self._forkserver else ""
            raise WorldFailed(f"{pending.label} on a world of {pending.world}:\n" + "\n".join(
                f"--- rank {r}: {errors[r]}" for r in sorted(errors))
                + (f"\n--- the pool processes' output meanwhile ({LOG}):\n{log}" if log else ""))
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


@contextlib.contextmanager
def forked_worker_pools():
    """genserve `WorkerPool`s made inside start their workers from the fork server above (torch,
    diffusers and genserve's models imported once) instead of spawning fresh interpreters: about
    7 CPU-seconds less per worker here.  The workers run the same code on the same pickled
    arguments; what differs from spawn: they see the environment of the fork server's start, not
    os.environ at the pool's start, and modules come pre-imported.  Keep some tests on spawn (the
    production path): test_workers does."""
    from genserve.parallel.workers import WorkerPool

    start_fork_server()
    WorkerPool.start_method = "forkserver"
    try:
        yield
    finally:
        WorkerPool.start_method = "spawn"


def pair_groups(rank: int, world: int):
    """Inside a gloo world (an even number of ranks): make the pair groups (0, 1), (2, 3), ...
    (collective: every rank, in one order) and return `group_of(k)` for this rank: None for SP
    1, its pair for 2, the whole world for `world`.  Every rank steps at every degree, each pair
    doing the same work."""
    import torch.distributed as dist

    from genserve.parallel import GroupCache

    groups = GroupCache(range(world))
    for base in range(0, world - 1, 2):
        groups.make((base, base + 1))
    pair = (rank // 2 * 2, rank // 2 * 2 + 1)

    def group_of(k: int):
        if k == 1:
            return None
        return dist.group.WORLD if k == world else groups.get(pair)

    return group_of
