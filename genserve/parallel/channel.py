"""One channel per worker back to the driver: a one-way pipe of length-prefixed pickles.

Why not one `multiprocessing.Queue` shared by all workers: its writers take a cross-process lock
and write into one pipe.  A worker killed in the middle of a large result leaves the lock held
(every other worker's results stop) and half a message in the pipe (the driver's read of it waits
for the rest forever): the whole pool wedges.  Here each worker has a pipe of its own
(`multiprocessing.Pipe(duplex=False)`); the driver closes its copy of the write end once the
worker started, so the worker's death reads as end of file, and it reads without blocking: a
message cut short, an undecodable one or end of file ends that channel, never the driver's loop.

Inside a worker the main thread and the control thread share the channel (`Sender`, with a
thread lock).  A frame is an 8-byte big-endian length and a pickle.
"""

from __future__ import annotations

import os
import pickle
import struct
import threading

_HEADER = struct.Struct("!Q")
_CHUNK = 1 << 20


def frame(msg) -> bytes:
    """`msg` as one frame (the driver's pipes to its workers, `feed.py`, send one to many)."""
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def split_frames(buf: bytearray) -> list[bytearray]:
    """The pickles of the complete frames at the start of `buf`, taken out of it (a frame cut
    short stays for the rest to arrive)."""
    out, start = [], 0
    while len(buf) - start >= _HEADER.size:
        (n,) = _HEADER.unpack_from(buf, start)
        end = start + _HEADER.size + n
        if len(buf) < end:
            break
        out.append(buf[start + _HEADER.size:end])
        start = end
    del buf[:start]
    return out


def _pipe_size(fd: int, size: int = 1 << 20) -> None:
    """Widen the pipe (Linux; fewer wake-ups for large results).  Best effort."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (ImportError, AttributeError, OSError):
        pass


class Sender:
    """The worker's end: `put(msg)`, from any thread of the worker.  Picklable (it travels to the
    spawned process with its connection; the lock is made anew there)."""

    def __init__(self, conn):
        self.conn = conn
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"conn": self.conn}

    def __setstate__(self, state):
        self.__init__(state["conn"])

    def put(self, msg) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)  # fails before a byte is sent
        fd = self.conn.fileno()
        with self._lock:
            for part in (_HEADER.pack(len(data)), data):
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view):]

    def close(self) -> None:
        self.conn.close()


class Receiver:
    """The driver's end.  `read()` takes what the pipe holds without blocking and returns the
    complete messages; `broken` then says why the channel ended, if it did (end of file, a message
    cut short, an undecodable one).  Wait for it with `multiprocessing.connection.wait`."""

    def __init__(self, conn):
        self.conn = conn
        self._buf = bytearray()
        self.broken: str | None = None
        os.set_blocking(conn.fileno(), False)
        _pipe_size(conn.fileno())

    def fileno(self) -> int:
        return self.conn.fileno()

    @property
    def partial(self) -> bool:
        """Whether a message has begun but not all of it arrived yet."""
        return bool(self._buf) and self.broken is None

    def read(self) -> list:
        msgs: list = []
        if self.broken is not None:
            return msgs
        while True:
            try:
                chunk = os.read(self.conn.fileno(), _CHUNK)
            except BlockingIOError:
                break
            except OSError as e:
                self.broken = f"channel error: {e}"
                return msgs
            if not chunk:
                self.broken = (f"end of file inside a message ({len(self._buf)} bytes of it came)"
                               if self._buf else "end of file")
                break
            self._buf += chunk
            if not self._frames(msgs):
                return msgs
        return msgs

    def _frames(self, msgs: list) -> bool:
        """Move the complete frames of the buffer to `msgs`; False if one did not decode."""
        for data in split_frames(self._buf):
            try:
                msgs.append(pickle.loads(data))
            except Exception as e:  # noqa: BLE001 - any decode failure ends the channel
                self.broken = f"undecodable message ({type(e).__name__}: {e})"
                return False
        return True

    def close(self) -> None:
        if self.broken is None:
            self.broken = "closed by the driver"
        self.conn.close()
