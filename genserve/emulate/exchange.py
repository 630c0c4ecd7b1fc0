"""How emulated workers pass states to each other: a Unix socket each, in the pool's directory.

Real workers move a state over torch.distributed (`parallel/transfer.py`); emulated ones have no
torch, so each listens on `<exchange>/rank<r>.sock` and a sender connects, writes one message and
closes.  The receiver's listener files the message under its key (`Parcel`, `JobEnd`: typed, like
every message between processes) and wakes whoever waits for it.

Time comes from the model, bytes are real: the job that waits for a state is charged what the
link would take (`LatencyModel.move_time`), and the state's payload (its real size, `trailer`
bytes) follows its header on the same connection from a thread of the sender's.  Not on the job's
path: copying megabytes through Python sockets takes this machine's CPU time, which a time scale
would multiply into trace time that an NVLink transfer never takes.

A wait ends when its message comes, when its sender is gone, or at the world's timeout: each
worker writes `<exchange>/pid.<r>` ("pid generation") when it starts, so a receiver waiting on
rank r sees at once that r's process died (or that a replacement, started in a later world, stands
in its place and will never send what the dead one owed): as a real receiver sees the peer's
socket close.
"""

from __future__ import annotations

import os
import pickle
import queue
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

from ..parallel.liveness import pid_alive

_HEADER = struct.Struct("!Q")


@dataclass(frozen=True)
class Parcel:
    """A state's header (`EmuState.header`) for the receiver's `key`, its payload's size
    (`trailer`: that many bytes follow the message), or why it cannot come (`lost`)."""

    key: str
    state: bytes = b""
    lost: str | None = None
    trailer: int = 0


@dataclass(frozen=True)
class JobEnd:
    """From an SP job's first rank to its other members: where each request's state ended
    (`steps`: the step index reached; `dropped`: failed, cancelled or lost ones, which leave
    them).  The other members take the same steps on their copies, as real ones run in lockstep
    and the first rank's cancel decisions win."""

    key: str
    steps: dict[str, int] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()


Message = Union[Parcel, JobEnd]


def generation(prefix: str) -> int:
    """The number of a world from its key prefix ("world3/" -> 3)."""
    m = re.search(r"(\d+)", prefix)
    return int(m.group(1)) if m else 0


class Exchange:
    def __init__(self, root: str, rank: int, generation_started: int):
        self.root, self.rank = Path(root), rank
        self._box: dict[str, Message] = {}
        self._cv = threading.Condition()
        self.received = 0  # payload bytes taken in (see the module doc)
        self._trailers: queue.SimpleQueue = queue.SimpleQueue()
        path = self.root / f"rank{rank}.sock"
        path.unlink(missing_ok=True)  # a dead predecessor's
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(64)
        tmp = self.root / f".pid.{rank}.{os.getpid()}"
        tmp.write_text(f"{os.getpid()} {generation_started}")
        tmp.replace(self.root / f"pid.{rank}")
        threading.Thread(target=self._listen, daemon=True, name=f"emu-exchange-{rank}").start()
        threading.Thread(target=self._send_trailers, daemon=True,
                         name=f"emu-payloads-{rank}").start()

    # ----- receiving -----
    def _listen(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            try:
                head = _recv_exactly(conn, _HEADER.size)
                msg = pickle.loads(_recv_exactly(conn, _HEADER.unpack(head)[0]))
            except (OSError, EOFError, pickle.UnpicklingError):
                return  # a sender that died mid-message: its receiver sees it dead
            if isinstance(msg, (Parcel, JobEnd)):
                with self._cv:
                    self._box[msg.key] = msg
                    self._cv.notify_all()
            left = getattr(msg, "trailer", 0)
            buf = bytearray(min(left, 1 << 20))
            while left > 0:  # the payload: read in full (real bytes), then dropped
                k = conn.recv_into(buf, min(left, len(buf)))
                if not k:
                    return
                left -= k
                self.received += k

    def take(self, key: str, sender: int, generation: int, timeout_s: float,
             tick: Callable[[], None]) -> Message | None:
        """The message filed under `key`, waiting for it; None if `sender` died (or was replaced
        after world `generation`) or `timeout_s` passed.  `tick()` runs while waiting: waiting
        for a peer is not being stuck."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while key not in self._box:
                if time.monotonic() > deadline or not self.alive(sender, generation):
                    return None
                tick()
                self._cv.wait(0.05)
            return self._box.pop(key)

    def _registered(self, rank: int) -> tuple[int, int] | None:
        """(pid, generation started) from rank `rank`'s pid file; None if there is none."""
        try:
            pid, started = (int(x) for x in (self.root / f"pid.{rank}").read_text().split())
        except (OSError, ValueError):
            return None
        return pid, started

    def alive(self, rank: int, generation: int) -> bool:
        """Whether the process that was rank `rank` in world `generation` still runs."""
        got = self._registered(rank)
        return got is not None and got[1] <= generation and pid_alive(got[0])

    def joined(self, rank: int, generation: int) -> bool:
        """Whether rank `rank` is up for world `generation`: its pid file names a live process
        (or one started for a later world), not a dead one whose replacement is still starting."""
        got = self._registered(rank)
        return got is not None and (got[1] > generation or pid_alive(got[0]))

    # ----- sending -----
    def send(self, dst: int, msg: Message) -> bool:
        """Deliver `msg` to rank `dst` (itself included); False if it is not listening (dead).
        A `Parcel`'s trailer goes after it, from the payload thread (see the module doc)."""
        if dst == self.rank:
            with self._cv:
                self._box[msg.key] = msg
                self._cv.notify_all()
            return True
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.root / f"rank{dst}.sock"))
            s.sendall(_HEADER.pack(len(data)) + data)
        except OSError:
            s.close()
            return False
        if getattr(msg, "trailer", 0):
            self._trailers.put((s, msg.trailer))
        else:
            s.close()
        return True

    def _send_trailers(self) -> None:
        while True:
            s, n = self._trailers.get()
            chunk = bytes(min(n, 1 << 20))
            try:
                with s:
                    while n > 0:
                        n -= s.send(memoryview(chunk)[:min(n, len(chunk))])
            except OSError:
                pass  # the receiver died: nothing waits for these bytes

    def close(self) -> None:
        self._sock.close()


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:])
        if not k:
            raise EOFError("connection closed mid-message")
        got += k
    return bytes(buf)
