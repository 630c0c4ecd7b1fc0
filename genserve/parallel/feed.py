"""The driver's way to each worker: two one-way pipes (inbox, control) of length-prefixed pickles,
written by the driver's own thread, without blocking and without a thread per pipe.

Why not `multiprocessing.Queue`: its `put` hands the message to a feeder thread of its own, which
pickles and writes it later.  A pool of 64 workers had 128 of them; a decision that sends jobs to
dozens of workers woke dozens of threads, which then competed with the decision loop for the GIL,
and a job reached its workers only once its thread had run.  Here `put` pickles once
(`channel.frame`, shared by every worker a job goes to) and writes straight into the pipe while
it has room.  What does not fit (a worker stopped or far behind, a large input image) waits in that
pipe's backlog, in order, and one thread per pool (`Flusher`) writes it as the pipe drains: the
driver never blocks on a worker.  A write to a dead worker's pipe is dropped (its death shows on
its channel back, `channel.Receiver`).

The worker's end (`Inlet`) blocks in `get`; `put` from the worker itself (a `Shutdown` that ends
the thread reading it) is served before the pipe.  End of file (the driver closed the pipe) reads
as `Shutdown`.  Frames are those of `channel.py`: an 8-byte big-endian length, then the pickle.
"""

from __future__ import annotations

import collections
import os
import pickle
import select
import threading

from .channel import _CHUNK, frame, split_frames
from .protocol import Shutdown


class Feed:
    """The driver's end of one pipe to one worker.  Thread-safe; never blocks."""

    def __init__(self, conn, flusher: "Flusher"):
        self.conn = conn
        self.fd = conn.fileno()
        os.set_blocking(self.fd, False)
        self.broken: str | None = None
        self._flusher = flusher
        self._lock = threading.Lock()
        self._backlog: collections.deque[memoryview] = collections.deque()

    def put(self, msg) -> None:
        self.put_frame(frame(msg))

    def put_frame(self, data: bytes) -> None:
        with self._lock:
            if self.broken is not None:
                return
            if self._backlog:  # behind what waits: order is kept
                self._backlog.append(memoryview(data))
                return
            rest = self._write(memoryview(data))
            if rest:
                self._backlog.append(rest)
        if rest:
            self._flusher.watch(self)

    @property
    def pending(self) -> int:
        """Bytes waiting for room in the pipe."""
        with self._lock:
            return sum(len(v) for v in self._backlog)

    @property
    def waiting(self) -> bool:
        with self._lock:
            return bool(self._backlog)

    def _write(self, view: memoryview) -> memoryview | None:
        """Write what fits; the rest, or None.  Under the lock."""
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except BlockingIOError:
            return view
        except OSError as e:  # the worker is gone (EPIPE): nothing more reaches it
            self._fail(f"write: {e}")
        return None

    def _fail(self, why: str) -> None:
        self.broken = why
        self._backlog.clear()

    def flush(self) -> None:
        """Write the backlog while the pipe has room (the flusher's thread)."""
        with self._lock:
            while self._backlog:
                rest = self._write(self._backlog[0])
                if rest:
                    self._backlog[0] = rest
                    return
                if self._backlog:  # (emptied if the write failed)
                    self._backlog.popleft()

    def close(self) -> None:
        with self._lock:
            if self.broken is None:
                self._fail("closed by the driver")
            self.conn.close()


class Flusher(threading.Thread):
    """Writes the feeds' backlogs as their pipes drain: one thread for a whole pool, asleep
    unless a pipe is full."""

    def __init__(self, name: str = "genserve-flusher"):
        super().__init__(daemon=True, name=name)
        self._lock = threading.Lock()
        self._feeds: set[Feed] = set()
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.start()

    def watch(self, feed: Feed) -> None:
        with self._lock:
            if self._closed:  # the pool is closing: nothing more is written
                return
            self._feeds.add(feed)
            self._wake()

    def _wake(self) -> None:
        """Under the lock, before close: the wake pipe's descriptors are still this thread's
        (after close their numbers may be another file's)."""
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # already woken

    def run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                # A feed leaves the set only once seen empty here: a put that left a backlog
                # after that adds it again (`watch` comes after the backlog grew).
                feeds = {f.fd: f for f in self._feeds if f.broken is None and f.waiting}
                self._feeds = set(feeds.values())
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for fd in feeds:
                poller.register(fd, select.POLLOUT)
            try:
                ready = poller.poll()
            except OSError:  # a feed closed meanwhile: look again
                continue
            for fd, _ in ready:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                elif fd in feeds:
                    feeds[fd].flush()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake()
        self.join(timeout=1.0)
        if not self.is_alive():  # else two descriptors leak rather than close under its feet
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)


class Inlet:
    """The worker's end of a pipe from the driver: `get()` blocks for the next message; `put(msg)`
    (this process only) puts one ahead of the pipe's, e.g. a `Shutdown` for the thread reading
    it.  Picklable: it travels to the worker with its connection."""

    def __init__(self, conn):
        self.conn = conn
        self._buf = bytearray()
        self._msgs: collections.deque = collections.deque()
        self._local: collections.deque = collections.deque()
        self._wake: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._ended = False

    def __getstate__(self):
        return {"conn": self.conn}

    def __setstate__(self, state):
        self.__init__(state["conn"])

    def _wake_fds(self) -> tuple[int, int]:
        with self._lock:
            if self._wake is None:
                self._wake = os.pipe()
            return self._wake

    def put(self, msg) -> None:
        self._local.append(msg)
        os.write(self._wake_fds()[1], b"!")

    def close(self) -> None:
        """Release the pipe and the wake-up pipe (a worker's end with its process; an Inlet
        used within one process, e.g. a test's, here)."""
        with self._lock:
            wake, self._wake = self._wake, None
        for fd in wake or ():
            os.close(fd)
        self.conn.close()

    def get(self):
        wake_r, _ = self._wake_fds()
        fd = self.conn.fileno()
        while True:
            if self._local:
                return self._local.popleft()
            if self._msgs:
                return self._msgs.popleft()
            if self._ended:
                return Shutdown()  # the driver closed its end: nothing more will come
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.register(wake_r, select.POLLIN)
            ready = {f for f, _ in poller.poll()}
            if wake_r in ready:
                os.read(wake_r, 4096)
            if fd in ready:  # readable, or its end closed (POLLHUP): an empty read
                self._take(os.read(fd, _CHUNK))

    def _take(self, chunk: bytes) -> None:
        if not chunk:
            if self._buf:
                raise EOFError(f"the driver's pipe ended inside a message "
                               f"({len(self._buf)} bytes of it came)")
            self._ended = True
            return
        self._buf += chunk
        self._msgs.extend(pickle.loads(data) for data in split_frames(self._buf))
