"""Adversarial tests of the driver's pipes to its workers (`parallel/feed.py`, `WorkerPool`).

The first two failed before `Flusher` stopped using its wake pipe once closed (a closed flusher
wrote into, or closed again, descriptor numbers the process may have reused meanwhile); the last
covers a failure path of the pool: a stopped worker with a backlog killed and replaced, and
`close()` with another stopped worker holding a backlog.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest

from genserve.parallel.feed import Feed, Flusher
from genserve.parallel.protocol import Done, Drop, Noop


def _take_numbers(numbers) -> list[int]:
    """Open pipes until the process holds every number of `numbers` again (as any other code of
    the driver would, opening files, sockets or pipes); the descriptors opened."""
    held: list[int] = []
    for _ in range(64):
        if set(numbers) <= set(held):
            return held
        held += os.pipe()
    for fd in held:
        os.close(fd)
    pytest.skip("the freed descriptor numbers were not reused")


def _drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


# ----- a closed flusher -----

def test_a_put_after_the_flusher_closed_writes_nothing_into_a_recycled_descriptor():
    """`Flusher._wake` after `close()` writes b"!" to `_wake_w`, a number closed and possibly
    reused: the byte lands in whatever file now has it (here: another pipe of the process)."""
    fl = Flusher()
    r, w = mp.Pipe(duplex=False)
    feed = Feed(w, fl)
    wake_w = fl._wake_w
    fl.close()
    held = _take_numbers([wake_w])
    try:
        feed.put(Done(1, bytes(1 << 20)))  # does not fit the pipe: the feed asks for the flusher
        read_end = held[held.index(wake_w) - 1]  # os.pipe() gives (read, write)
        assert _drain(read_end) == b"", "the closed flusher wrote into a descriptor not its own"
    finally:
        for fd in held:
            os.close(fd)
        feed.close()
        r.close()


def test_closing_a_flusher_twice_closes_nothing_it_does_not_own():
    """`Flusher.close` is not idempotent: a second call `os.close`s the numbers again, which by
    then may belong to another file of the process."""
    fl = Flusher()
    numbers = (fl._wake_r, fl._wake_w)
    fl.close()
    held = _take_numbers(numbers)
    try:
        fl.close()  # e.g. a pool closed twice, or a close on an error path after a close
        for fd in numbers:
            os.fstat(fd)  # still open: the flusher must not have closed it
    finally:
        for fd in held:
            try:
                os.close(fd)
            except OSError:
                pass


# ----- the pool -----

def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _big_drop(n: int = 1000) -> Drop:
    return Drop(tuple(f"{i:06d}" * 170 for i in range(n)))  # about 1 MB, distinct strings


def test_a_stopped_worker_with_a_backlog_is_killed_replaced_and_closed_cleanly():
    from genserve.emulate import Emulation
    from genserve.parallel.workers import WorkerPool

    before = set(threading.enumerate())
    pool = WorkerPool(("sd3-medium",), 3, emulate=Emulation("h200", 50.0, 8))
    try:
        os.kill(pool.procs[1].pid, signal.SIGSTOP)
        for _ in range(4):
            pool._send_all((1,), _big_drop(), ctl=True)
            pool._send(1, _big_drop())
        old_in, old_ctl = pool._inboxes[1], pool._ctls[1]
        assert old_in.pending > 0 and old_ctl.pending > 0
        assert pool.wait(pool.submit((0, 2), Noop()), 30) is None  # the others are not held up

        fds = _fds()
        os.kill(pool.procs[1].pid, signal.SIGKILL)
        pool.procs[1].join(10)
        deadline = time.monotonic() + 10
        while 1 in pool.alive() and time.monotonic() < deadline:
            pool.finished(0.2)
        assert 1 not in pool.alive()
        deadline = time.monotonic() + 10  # the flusher sees the dead reader: backlog dropped
        while (old_in.pending or old_ctl.pending) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert old_in.pending == old_ctl.pending == 0
        cpu = time.process_time()
        time.sleep(0.5)
        assert time.process_time() - cpu < 0.2  # nobody spins on the dead pipes

        pool.replace([1])
        deadline = time.monotonic() + 60
        while pool._starting and time.monotonic() < deadline:
            pool.finished(0.2)
        assert old_in.broken is not None and old_ctl.broken is not None
        assert pool.wait(pool.submit((0, 1, 2), Noop()), 30) is None
        assert pool.fetch(1, [], timeout_s=30) == {}
        assert _fds() <= fds + 2  # the old pipes went with the old worker

        os.kill(pool.procs[2].pid, signal.SIGSTOP)  # close with a stopped worker and a backlog
        for _ in range(3):
            pool._send(2, _big_drop())
        assert pool._inboxes[2].pending > 0
    finally:
        t = time.monotonic()
        pool.close()
        took = time.monotonic() - t
    assert took < pool.close_grace_s + pool.close_reap_s + 1.5
    assert not pool._flusher.is_alive()
    assert all(not p.is_alive() for p in pool.procs)
    left = [t.name for t in set(threading.enumerate()) - before]
    assert not [n for n in left if "flusher" in n], left
