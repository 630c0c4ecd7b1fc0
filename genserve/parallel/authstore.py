"""The store every world meets in (`world.rendezvous`): a key-value store the driver hosts, that
only the holders of the run's secret can use.

Why not torch's TCPStore (what the pools used before): it listens on every interface whatever
host it is given, has no authentication, and any client may list every key (`list_keys`), read
and write any.  Whoever reaches its port can then write its own address as a member's and receive
the states that members send each other, whose metadata is unpickled (`transfer.py`): code
execution in the workers.  Prefixing the keys with a secret would not help, since the keys can
be listed.

This store instead:
- listens on one address only: loopback on one machine, the node's cluster address under Ray;
- starts every connection with a mutual challenge-response on the run's 128-bit secret
  (HMAC-SHA256 over a random nonce from each side, compared in constant time): the secret never
  crosses the wire, a client that does not know it is dropped before a request of its is read,
  and a worker never talks to a server that does not know it either (a process that took the
  port after the driver died).  The workers get the secret in their spawn arguments (a pipe;
  under Ray, the actor call), never on a command line or in a log (`Rendezvous` leaves it out of
  its repr);
- speaks a few fixed binary frames, no pickle, so even an authenticated peer cannot make the
  driver run code; a blocking `get` or `wait` is polled by the client, so the server never
  blocks on a key, and a client killed in the middle of a request loses its connection only.

What it does not do: encrypt (on one machine the traffic stays on loopback; under Ray the
cluster's network must be trusted, as Ray's own ports require), or stop a local process from
opening connections (a denial of service, not a breach).  gloo's and NCCL's own connections have
no authentication; on one machine the workers' gloo sockets listen on loopback
(`worker_main.Worker.start`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import threading
import time
from datetime import timedelta

import torch.distributed as dist

_NONCE = 32
_HANDSHAKE_S = 5.0  # an unauthenticated peer holds a connection thread this long at most
_MAX_FRAME = 16 << 20  # the values are addresses and small flags
_LEN = struct.Struct("!I")
SET, GET, ADD, CAS, CHECK, DELETE, NUM = (bytes([i]) for i in range(1, 8))
_OK, _MISSING = b"ok", b"missing"


class StoreError(RuntimeError):
    """The store cannot be used: the handshake failed, the connection dropped, or a wait timed
    out."""


def new_secret() -> str:
    return os.urandom(16).hex()  # 128 bits


def _proof(secret: bytes, side: bytes, *nonces: bytes) -> bytes:
    return hmac.new(secret, side + b"".join(nonces), hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise StoreError("store connection closed")
        buf += chunk
    return bytes(buf)


def _send(sock: socket.socket, fields) -> None:
    body = b"".join(_LEN.pack(len(f)) + f for f in fields)
    sock.sendall(_LEN.pack(len(body)) + body)


def _recv(sock: socket.socket) -> list[bytes]:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > _MAX_FRAME:
        raise StoreError(f"store frame of {n} bytes")
    body, fields, i = _recv_exact(sock, n), [], 0
    while i < n:
        (k,) = _LEN.unpack_from(body, i)
        fields.append(body[i + _LEN.size:i + _LEN.size + k])
        i += _LEN.size + k
    return fields


def _bytes(v) -> bytes:
    return v.encode() if isinstance(v, str) else bytes(v)


class _Table:
    """The keys and values, with TCPStore's semantics (counters as decimal text; compare_set on a
    missing key sets it only when `expected` is empty)."""

    def __init__(self):
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def set(self, key: str, value: bytes) -> None:
        with self._lock:
            self._data[key] = value

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._data.get(key)

    def add(self, key: str, n: int) -> int:
        with self._lock:
            v = int(self._data.get(key, b"0")) + n
            self._data[key] = str(v).encode()
            return v

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        with self._lock:
            cur = self._data.get(key)
            if (cur is None and expected == b"") or (cur is not None and cur == expected):
                self._data[key] = desired
                return desired
            return expected if cur is None else cur

    def check(self, keys) -> bool:
        with self._lock:
            return all(k in self._data for k in keys)

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._data.pop(key, None) is not None

    def num_keys(self) -> int:
        with self._lock:
            return len(self._data)

    def serve(self, req: list[bytes]) -> list[bytes]:
        """One request frame -> its reply frame."""
        op, args = req[0], req[1:]
        key = args[0].decode() if args else ""
        if op == SET:
            self.set(key, args[1])
            return [_OK]
        if op == GET:
            v = self.get(key)
            return [_MISSING] if v is None else [_OK, v]
        if op == ADD:
            return [_OK, str(self.add(key, int(args[1]))).encode()]
        if op == CAS:
            return [_OK, self.compare_set(key, args[1], args[2])]
        if op == CHECK:
            return [_OK, b"1" if self.check([a.decode() for a in args]) else b"0"]
        if op == DELETE:
            return [_OK, b"1" if self.delete(key) else b"0"]
        if op == NUM:
            return [_OK, str(self.num_keys()).encode()]
        raise StoreError(f"unknown store op {op!r}")


class _Polling(dist.Store):
    """A `dist.Store` over `_call(request) -> reply`; blocking gets and waits poll `check`."""

    def __init__(self, timeout: timedelta):
        super().__init__()
        self._wait_s = timeout.total_seconds()

    def _call(self, fields) -> list[bytes]:
        raise NotImplementedError

    def _until(self, keys, timeout_s: float) -> None:
        deadline, pause = time.monotonic() + timeout_s, 0.001
        while not self.check(keys):
            if time.monotonic() > deadline:
                raise StoreError(f"timed out after {timeout_s:.0f} s waiting for store keys "
                                 f"{list(keys)[:4]}")
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def set(self, key, value) -> None:
        self._call([SET, key.encode(), _bytes(value)])

    def get(self, key) -> bytes:
        self._until([key], self._wait_s)
        reply = self._call([GET, key.encode()])
        if reply[0] != _OK:
            raise StoreError(f"store key {key!r} was deleted")
        return reply[1]

    def add(self, key, value) -> int:
        return int(self._call([ADD, key.encode(), str(int(value)).encode()])[1])

    def compare_set(self, key, expected, desired) -> bytes:
        return self._call([CAS, key.encode(), _bytes(expected), _bytes(desired)])[1]

    def check(self, keys) -> bool:
        return self._call([CHECK, *(k.encode() for k in keys)])[1] == b"1"

    def wait(self, keys, timeout=None) -> None:
        self._until(keys, self._wait_s if timeout is None else timeout.total_seconds())

    def delete_key(self, key) -> bool:
        return self._call([DELETE, key.encode()])[1] == b"1"

    def num_keys(self) -> int:
        return int(self._call([NUM])[1])


class _Local(_Polling):
    """The driver's own handle on its server's table (no socket)."""

    def __init__(self, table: _Table, timeout: timedelta):
        super().__init__(timeout)
        self._table = table

    def _call(self, fields) -> list[bytes]:
        return self._table.serve(fields)


class Client(_Polling):
    """A worker's connection to the driver's store (`connect` shares one per process)."""

    def __init__(self, host: str, port: int, secret: str, timeout: timedelta):
        super().__init__(timeout)
        key = bytes.fromhex(secret)
        sock = socket.create_connection((host, port), timeout=_HANDSHAKE_S)
        try:
            theirs = _recv_exact(sock, _NONCE)
            mine = os.urandom(_NONCE)
            sock.sendall(mine + _proof(key, b"client", theirs, mine))
            if not hmac.compare_digest(_recv_exact(sock, 32), _proof(key, b"server", mine,
                                                                       theirs)):
                raise StoreError("the store at that address does not know this run's secret")
        except (OSError, StoreError) as e:
            sock.close()
            raise StoreError(f"store {host}:{port}: handshake failed ({e})") from None
        sock.settimeout(None)
        self._sock = sock
        self._lock = threading.Lock()

    def _call(self, fields) -> list[bytes]:
        with self._lock:
            try:
                _send(self._sock, fields)
                return _recv(self._sock)
            except OSError as e:
                raise StoreError(f"store connection lost: {e}") from None


_clients: dict[tuple, Client] = {}
_clients_lock = threading.Lock()


def connect(host: str, port: int, secret: str, timeout: timedelta) -> Client:
    """This process's client of the store at `host`:`port` (one connection, shared by every
    world it joins: gloo keeps each world's store alive while it has groups)."""
    with _clients_lock:
        c = _clients.get((host, port, secret))
        if c is None:
            c = _clients[(host, port, secret)] = Client(host, port, secret, timeout)
        return c


class Server:
    """The driver's store: listens on `host` only (port chosen by the system), one daemon thread
    per connection; `local` is the driver's own handle (`world.abandon` takes it)."""

    def __init__(self, host: str, secret: str, timeout: timedelta = timedelta(seconds=300)):
        self._key = bytes.fromhex(secret)
        family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
        self._sock = socket.create_server((host, 0), family=family)
        self.host, self.port = host, self._sock.getsockname()[1]
        self._table = _Table()
        self.local = _Local(self._table, timeout)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="genserve-store").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="genserve-store-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(_HANDSHAKE_S)
            mine = os.urandom(_NONCE)
            conn.sendall(mine)
            reply = _recv_exact(conn, _NONCE + 32)
            theirs, proof = reply[:_NONCE], reply[_NONCE:]
            if not hmac.compare_digest(proof, _proof(self._key, b"client", mine, theirs)):
                return  # not one of ours: nothing of it is read further
            conn.sendall(_proof(self._key, b"server", theirs, mine))
            conn.settimeout(None)
            while True:
                _send(conn, self._table.serve(_recv(conn)))
        except (OSError, StoreError, ValueError, IndexError, struct.error):
            return  # the peer left, or sent what is not a request: its connection ends
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        """Stop listening and end every connection (the threads then exit)."""
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns), set()
        for s in (self._sock, *conns):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
