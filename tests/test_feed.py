"""The driver's pipes to its workers (`parallel/feed.py`): a put never blocks the driver, what does
not fit waits and arrives in order, a dead reader costs nothing, and the worker's end reads end of
file as `Shutdown` and serves its own process's puts first."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import struct
import threading
import time
from multiprocessing.connection import wait

import pytest

from genserve.parallel.channel import Receiver, Sender, frame
from genserve.parallel.feed import Feed, Flusher, Inlet
from genserve.parallel.protocol import Done, Drop, Ready, Shutdown


@pytest.fixture
def flusher():
    f = Flusher()
    yield f
    f.close()


def _pipe(flusher):
    r, w = mp.Pipe(duplex=False)
    return Feed(w, flusher), Inlet(r), r


def _capacity(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, 1032)  # F_GETPIPE_SZ


def test_what_does_not_fit_waits_and_arrives_whole_and_in_order(flusher):
    feed, inlet, r = _pipe(flusher)
    msgs = [Done(i, bytes([i]) * (100_000 + i)) if i % 3 else Ready(i) for i in range(30)]
    shared = frame(Drop(("a", "b")))
    for m in msgs:  # nobody reads yet: about 2 MB into a pipe of 64 KB
        feed.put(m)
    feed.put_frame(shared)
    assert feed.pending > 2 * _capacity(feed.fd)  # the puts returned; the rest waits
    got = [inlet.get() for _ in range(len(msgs) + 1)]
    assert got == msgs + [Drop(("a", "b"))]
    assert feed.pending == 0


def test_a_put_to_a_reader_that_is_gone_is_dropped_without_an_error(flusher):
    feed, inlet, r = _pipe(flusher)
    feed.put(Done(1, bytes(1 << 20)))  # part of it waits for room
    assert feed.pending > 0
    r.close()  # the worker died (its read end is gone)
    deadline = time.monotonic() + 10
    while feed.broken is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert feed.broken is not None and "Broken pipe" in feed.broken
    assert feed.pending == 0
    feed.put(Ready(0))  # and later puts are dropped
    assert feed.pending == 0


def test_the_workers_own_put_comes_first_and_wakes_a_blocked_get(flusher):
    feed, inlet, _ = _pipe(flusher)
    got = []
    t = threading.Thread(target=lambda: got.append(inlet.get()))
    t.start()
    time.sleep(0.2)
    assert t.is_alive()  # blocked: nothing came
    inlet.put(Shutdown())  # e.g. the worker's main thread ending its control thread
    t.join(10)
    assert got == [Shutdown()]
    feed.put(Ready(1))
    inlet.put(Ready(2))
    assert [inlet.get(), inlet.get()] == [Ready(2), Ready(1)]


def test_end_of_file_reads_as_shutdown_and_a_message_cut_short_as_an_error():
    r, w = mp.Pipe(duplex=False)
    inlet = Inlet(r)
    data = pickle.dumps(Ready(3))
    os.write(w.fileno(), struct.pack("!Q", len(data)) + data)
    w.close()  # the driver's end closed: nothing more will come
    assert [inlet.get(), inlet.get(), inlet.get()] == [Ready(3), Shutdown(), Shutdown()]

    r, w = mp.Pipe(duplex=False)
    inlet = Inlet(r)
    os.write(w.fileno(), struct.pack("!Q", len(data)) + data[:3])
    w.close()
    with pytest.raises(EOFError, match="inside a message"):
        inlet.get()


def _echo(inlet: Inlet, out: Sender) -> None:
    """A worker's loop: answer each message with its size, until `Shutdown`."""
    while not isinstance(msg := inlet.get(), Shutdown):
        out.put(Done(msg.job_id, len(msg.result)))


def test_a_stopped_worker_does_not_block_the_driver_and_gets_everything_once_resumed(flusher):
    ctx = mp.get_context("spawn")
    r, w = ctx.Pipe(duplex=False)
    back_r, back_w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_echo, args=(Inlet(r), Sender(back_w)), daemon=True)
    p.start()
    r.close()
    back_w.close()
    feed, rx = Feed(w, flusher), Receiver(back_r)
    try:
        os.kill(p.pid, signal.SIGSTOP)
        sizes = [3 << 20, 10, 1 << 20, 5]
        for i, n in enumerate(sizes):  # 4 MB to a process that reads nothing: puts return
            feed.put(Done(i, bytes(n)))
        assert feed.pending > 0
        os.kill(p.pid, signal.SIGCONT)
        got: list = []
        deadline = time.monotonic() + 60
        while len(got) < len(sizes) and time.monotonic() < deadline:
            wait([rx], 1.0)
            got += rx.read()
        assert got == [Done(i, n) for i, n in enumerate(sizes)]
        feed.put(Shutdown())
        p.join(30)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
        feed.close()
        rx.close()


def test_puts_racing_the_flusher_all_arrive_in_order(flusher):
    """The driver puts while the flusher drains and the reader reads in bursts: a put that leaves
    a backlog just as the flusher finds the last one written must still be flushed."""
    feed, inlet, _ = _pipe(flusher)
    sizes = [(i * 7919) % 90_000 + 1 for i in range(600)]
    got: list = []

    def read() -> None:
        for i in range(len(sizes)):
            got.append(inlet.get())
            if i % 50 == 0:
                time.sleep(0.005)  # the pipe fills meanwhile

    t = threading.Thread(target=read)
    t.start()
    for i, n in enumerate(sizes):
        feed.put(Done(i, n * b"x"))
    t.join(60)
    assert not t.is_alive(), f"{len(got)} of {len(sizes)} arrived; {feed.pending} bytes stuck"
    assert [(m.job_id, len(m.result)) for m in got] == list(enumerate(sizes))
