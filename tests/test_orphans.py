"""The pool's processes end with their driver, and the driver's `close` is bounded.

Each test runs a driver (a small script making a WorkerPool) as a process of its own: one is
SIGKILLed, and none of its processes may outlive it; the other closes its pool after a double
worker death and must then exit on its own, promptly."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]

# The production start path (spawn) or the tests' (forkserver, argv[1]), from a thread that ends
# before the workers are used: a worker's parent-death signal must follow the driver, not that
# thread.
ORPHANS = r"""
import json, multiprocessing as mp, sys, threading, time
sys.path.insert(0, sys.argv[2])
from _spawn import PRELOAD
from genserve.parallel.protocol import Noop
from genserve.parallel.workers import WorkerPool


def main():
    WorkerPool.start_method = sys.argv[1]
    if sys.argv[1] == "forkserver":
        mp.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    made = []
    t = threading.Thread(target=lambda: made.append(WorkerPool("tiny-t2i", 2)))
    t.start()
    t.join()
    pool = made[0]
    time.sleep(0.5)
    for r in range(2):
        assert pool.wait(pool.submit((r,), Noop()), timeout_s=60) is None
    print(json.dumps([p.pid for p in pool.procs]), flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
"""

# A worker killed, its replacement killed while the new world forms, replaced again; then, at
# close, one worker busy with a long job and one stopped.
CLOSE = r"""
import json, multiprocessing as mp, os, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
from _spawn import PRELOAD
from genserve.models import GenRequest, GenSpec
from genserve.parallel.protocol import Noop, Steps
from genserve.parallel.workers import WorkerPool


def kill(pool, r):
    os.kill(pool.procs[r].pid, signal.SIGKILL)
    pool.procs[r].join(10)


def main():
    WorkerPool.start_method = "forkserver"
    mp.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    pool = WorkerPool("tiny-t2i", 3, collective_timeout_s=300)
    kill(pool, 1)
    pool.finished(0.0)
    pool.replace([1])  # 0 and 2 meet the new 1 in a new world ...
    time.sleep(0.3)
    kill(pool, 1)  # ... which dies while that world forms
    pool.finished(0.0)
    assert pool.dead() == [1], pool.dead()
    pool.replace([1])
    deadline = time.monotonic() + 120
    while not pool.ready():
        assert time.monotonic() < deadline, "no replacement"
        time.sleep(0.05)
    assert pool.wait(pool.submit((0, 1, 2), Noop()), timeout_s=120) is None
    (s,) = pool.prepare([GenRequest("r", GenSpec("tiny-t2i", 64, 64, steps=5000, seed=1,
                                                 prompt="x"))])
    pool.submit((0,), Steps((s.to_bytes(),), 5000))  # busy for a minute
    os.kill(pool.procs[2].pid, signal.SIGSTOP)
    time.sleep(0.5)
    t0 = time.monotonic()
    pool.close()
    took = time.monotonic() - t0
    left = [t.name for t in threading.enumerate()
            if not t.daemon and t is not threading.main_thread()]
    print(json.dumps({"close_s": took, "threads": left,
                      "children": [p.pid for p in mp.active_children()],
                      "restarts": pool.restarts}), flush=True)


if __name__ == "__main__":
    main()
"""


def _start(tmp_path: Path, source: str, *args: str) -> subprocess.Popen:
    script = tmp_path / "driver.py"
    script.write_text(source)
    log = open(tmp_path / "driver.log", "wb")
    return subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=log, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            start_new_session=True)


def _line(proc: subprocess.Popen, tmp_path: Path, timeout_s: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline().decode() if ready else ""
    assert line, (f"the driver printed nothing in {timeout_s:.0f} s (exit code {proc.poll()}):\n"
                  + (tmp_path / "driver.log").read_text(errors="replace")[-3000:])
    return line


def _parents() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            out[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _descendants(pid: int) -> set[int]:
    parents, found, todo = _parents(), set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parents.items() if pp == p} - found
        found |= kids
        todo += kids
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent's reaping is left


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:100]
    except OSError:
        return "?"


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_no_process_of_a_killed_driver_outlives_it(tmp_path, start_method):
    """SIGKILL of the driver: every process it started (the workers, one of them stopped,
    multiprocessing's resource tracker, the fork server) is gone within seconds."""
    proc = _start(tmp_path, ORPHANS, start_method, str(ROOT / "tests"))
    family: set[int] = set()
    try:
        workers = json.loads(_line(proc, tmp_path, 240))
        family = _descendants(proc.pid)
        assert set(workers) <= family, (workers, family)
        os.kill(workers[1], signal.SIGSTOP)  # no thread of its own can run: only the kernel helps
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 5
        while (left := [p for p in family if _running(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left, "outlived the driver: " + "; ".join(f"{p} {_cmd(p)}" for p in left)
    finally:
        proc.kill()
        proc.wait(10)
        for p in family:  # a failed run leaves nothing behind either
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_close_after_a_double_death_is_bounded_and_the_driver_then_exits(tmp_path):
    """After a worker and its replacement died (the second while the new world formed), with one
    worker in a long job and one stopped, `close` returns within a few seconds, leaves no live
    child nor non-daemon thread, and the driver process then exits at once on its own."""
    proc = _start(tmp_path, CLOSE, str(ROOT / "tests"))
    try:
        got = json.loads(_line(proc, tmp_path, 240))
        t0 = time.monotonic()
        code = proc.wait(30)
        exit_s = time.monotonic() - t0
        assert code == 0, (tmp_path / "driver.log").read_text(errors="replace")[-3000:]
        assert got["restarts"] == 2
        assert got["close_s"] < 4.5, got
        assert got["threads"] == [] and got["children"] == [], got
        assert exit_s < 3, exit_s
    finally:
        for p in _descendants(proc.pid):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.wait(10)
