"""The driver/worker protocol without worker processes: typed messages, dispatch on their type,
the per-worker channel's framing (a message cut short or undecodable ends that channel), and the
driver's modules importing without torch and without an import cycle."""

from __future__ import annotations

import ast
import multiprocessing as mp
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from multiprocessing.connection import wait
from pathlib import Path

import pytest

from genserve.parallel.channel import Receiver, Sender
from genserve.parallel.liveness import Watch
from genserve.parallel.protocol import (TO_DRIVER, Done, Drop, Fetch, Heartbeat, JobError, JobLost,
                                        MakeGroups, Noop, Ready, Rendezvous, Restart, Run,
                                        RunResult, Steps, Task, UnknownMessage, handler)
from genserve.parallel.workers import PoolBase

ROOT = Path(__file__).resolve().parents[1]


def test_dispatch_finds_the_handler_of_the_exact_type_and_names_an_unknown_one():
    table = {Ready: lambda m: ("ready", m.rank), Done: lambda m: ("done", m.job_id)}
    assert handler(table, Ready(3))(Ready(3)) == ("ready", 3)
    with pytest.raises(UnknownMessage, match="no handler for message type Drop .*Done, Ready"):
        handler(table, Drop(("a",)))
    with pytest.raises(UnknownMessage, match="message type tuple"):
        handler(table, ("done", 1, None))  # the old tuples are no message


def test_messages_are_frozen_values_with_sequences_as_tuples():
    t = Task(1, [0, 1], Steps([b"x"], 2))
    assert t.ranks == (0, 1) and t.job.states == (b"x",)
    assert pickle.loads(pickle.dumps(t)) == t
    with pytest.raises(AttributeError):
        t.job_id = 2  # frozen


def _bare_pool(n: int = 2) -> PoolBase:
    pool = PoolBase()
    pool._setup("tiny-t2i", n, 0.01, None, "cpu", 10.0, None, 0)
    pool.sent = []
    pool._send = lambda r, m: pool.sent.append((r, m))
    pool._alive = lambda r: True
    return pool


def test_the_driver_refuses_what_is_not_a_job_and_routes_by_type():
    pool = _bare_pool()
    with pytest.raises(TypeError, match="a str is not a job .*Run"):
        pool.submit((0,), "run")
    pool._members = (0, 1)
    jid = pool.submit((1, 0), Noop())
    assert pool.sent == [(0, MakeGroups(((0, 1),))), (1, MakeGroups(((0, 1),))),
                         (0, Task(jid, (0, 1), Noop())), (1, Task(jid, (0, 1), Noop()))]
    pool._route(JobError(jid, "boom"))
    pool._route(Done(jid, None))  # a second answer (another member's) is dropped
    assert pool.result(jid) == JobError(jid, "boom")
    with pytest.raises(UnknownMessage, match="message type Fetch"):
        pool._route(Fetch(("a",), 1))  # a control message never comes back to the driver


def test_a_worker_answers_an_unknown_job_type_with_an_error_naming_it():
    pytest.importorskip("torch")
    from genserve.parallel.worker_main import Worker
    from genserve.parallel.world import WorkerSpec

    out = queue.Queue()
    w = Worker(0, WorkerSpec(("tiny-t2i",)), out)
    w._task(Task(7, (0,), RunResult()))  # a dataclass of the protocol, but not a job
    err = out.get_nowait()
    assert isinstance(err, JobError) and err.job_id == 7
    assert "no handler for message type RunResult" in err.message
    w._task(Task(8, (0,), Noop(reply_bytes=3)))
    assert out.get_nowait() == Done(8, b"\0\0\0")
    with pytest.raises(UnknownMessage, match="message type Fetch"):
        handler(w._inbox, Fetch((), 1))  # a control message in the inbox
    w._task(Task(9, (0,), Run("nope", (), 1)))
    assert "model='nope': not served" in out.get_nowait().message


# ----- heartbeats: who the driver declares hung -----

def test_a_heartbeat_is_a_frozen_message_to_the_driver_and_a_secret_stays_out_of_reprs():
    hb = Heartbeat(2, 17)
    assert isinstance(hb, TO_DRIVER) and pickle.loads(pickle.dumps(hb)) == hb
    with pytest.raises(AttributeError):
        hb.progress = 18
    rdv = Rendezvous("127.0.0.1", 5, "world1/", "ab" * 16)
    assert "ab" * 16 not in repr(rdv) and "ab" * 16 not in repr(Restart(rdv, (0,)))


def test_the_watch_declares_the_silent_and_the_stuck_but_not_the_idle():
    w = Watch(3.0)
    for r in range(4):
        w.reset(r, 0.0)
    for t in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
        w.heard(0, t, 1)            # idle: the same counter, and no job
        w.heard(1, t, 7)            # runs a job, the same counter: stuck
        w.heard(2, t, int(t * 10))  # runs a job and moves
        if t <= 1.0:
            w.heard(3, t, 1)        # then silent (SIGSTOP)
    assert w.overdue(3.5, range(4), busy={1, 2}) == []
    assert w.overdue(6.5, range(4), busy={1, 2}) == [(3, "no heartbeat for 5.5 s"),
                                                     (1, "no progress for 5.5 s while running a job")]
    w.restart_clock(1, 6.5)  # e.g. it got its job only now
    assert w.overdue(7.0, [1], busy={1}) == []
    w.reset(3, 7.0)  # a new process in its place
    assert w.overdue(7.0, range(4), busy={1, 2}) == []


class _Clock:
    def __init__(self):
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_the_pool_kills_the_silent_worker_of_a_job_and_spares_its_waiting_job_mate(monkeypatch):
    """Workers 0 and 1 run an SP-2 job; 0 stops (no more beats) and 1, waiting for it in a
    collective, stops progressing at the same time.  Only 0 is declared hung; 1's clock starts
    over.  The progress rule rests while a worker starts (its world waits for it)."""
    from genserve.parallel import workers

    clock = _Clock()
    monkeypatch.setattr(workers, "time", clock)
    pool = _bare_pool(3)
    pool._setup("tiny-t2i", 3, 0.01, None, "cpu", 10.0, None, 0, worker_timeout_s=3.0)
    pool._send = lambda r, m: None
    killed, dead = [], set()
    pool._alive = lambda r: r not in dead
    pool._kill_hung = lambda r, why: (killed.append((r, why)), dead.add(r))
    for r in range(3):
        pool._route(Ready(r))
    jid = pool.submit((0, 1), Noop())
    for _ in range(5):
        clock.sleep(1.0)
        pool._route(Heartbeat(1, 5))
        pool._route(Heartbeat(2, 0))
        pool._check_hung()
    assert killed == [(0, "no heartbeat for 4.0 s")] and pool.hung == 1
    pool._results[jid] = JobLost(jid, "worker 0 hung")
    clock.sleep(2.5)
    pool._check_hung()
    assert len(killed) == 1
    # 2 runs a job that stands still while worker 0 is replaced (starting): it waits for it.
    pool._starting[0] = clock.now
    dead.clear()
    pool.submit((2,), Noop())
    for _ in range(5):
        clock.sleep(1.0)
        pool._route(Heartbeat(1, 5))
        pool._route(Heartbeat(2, 0))
        pool._check_hung()
    assert len(killed) == 1
    pool._route(Ready(0))
    for _ in range(4):
        clock.sleep(1.0)
        for r in range(3):
            pool._route(Heartbeat(r, 0))
        pool._check_hung()
    assert killed[1:] == [(2, "no progress for 4.0 s while running a job")] and pool.hung == 2


def _pair():
    r, w = mp.Pipe(duplex=False)
    return Receiver(r), Sender(w), w


def _read_until(rx: Receiver, n: int) -> list:
    got: list = []
    while len(got) < n and rx.broken is None:
        assert wait([rx], 10), "nothing came"
        got += rx.read()
    return got


def test_channel_carries_messages_larger_than_the_pipe_and_ends_at_end_of_file():
    rx, tx, _ = _pair()
    big = Done(1, bytes(5 << 20))
    t = threading.Thread(target=lambda: [tx.put(Ready(0)), tx.put(big), tx.put(Ready(1))])
    t.start()
    assert _read_until(rx, 3) == [Ready(0), big, Ready(1)]
    t.join()
    assert rx.broken is None and not rx.partial
    tx.close()
    assert wait([rx], 10) and rx.read() == [] and rx.broken == "end of file"


def test_a_message_cut_short_by_its_writers_death_ends_the_channel():
    rx, _, w = _pair()
    data = pickle.dumps(Done(1, bytes(1000)))
    os.write(w.fileno(), struct.pack("!Q", len(data)) + data[:100])
    assert wait([rx], 10) and rx.read() == []
    assert rx.partial and rx.broken is None  # a live writer may still send the rest
    w.close()
    assert wait([rx], 10) and rx.read() == []
    assert rx.broken == "end of file inside a message (108 bytes of it came)"


def test_an_undecodable_message_ends_the_channel_after_the_good_ones():
    rx, _, w = _pair()
    good = pickle.dumps(Ready(0))
    os.write(w.fileno(), struct.pack("!Q", len(good)) + good + struct.pack("!Q", 5) + b"junk!")
    assert wait([rx], 10)
    assert rx.read() == [Ready(0)]
    assert rx.broken.startswith("undecodable message (UnpicklingError")


def test_the_drivers_modules_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import genserve.parallel.workers, genserve.parallel.protocol, genserve.cluster\n"
            "import genserve.profiler\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def _imports(path: Path, module: str) -> set[str]:
    """genserve modules `module` imports anywhere in its file (lazy imports included)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            name = f"{base}.{node.module}" if node.level and node.module else \
                base if node.level else node.module
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("genserve")}


def test_the_pool_and_the_worker_form_no_import_cycle_even_through_lazy_imports():
    files = {}
    for p in (ROOT / "genserve").rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {m: {d for d in _imports(p, m) if d in files and d != m} for m, p in files.items()}
    start = ["genserve.parallel.workers", "genserve.cluster.ray_pool"]
    path: list[str] = []

    def visit(m: str, seen: set) -> None:
        assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
        if m in seen:
            return
        seen.add(m)
        path.append(m)
        for d in sorted(graph[m]):
            visit(d, seen)
        path.pop()

    seen: set = set()
    for m in start:
        visit(m, seen)
    assert "genserve.parallel.worker_main" in seen and "genserve.profiler" in seen
