"""Workers that die with their driver, and a driver that notices workers that hang.

No orphans (one machine, `WorkerPool`).  A worker process must not outlive its driver however the
driver ends (SIGKILL included): it would keep its GPU memory and its CPU threads.  Two guards, set
up by the process's entry point (`process.run_worker`) before the worker imports torch:
- `PR_SET_PDEATHSIG` = SIGKILL: the kernel kills the worker when its parent dies.  The "parent" is
  the thread that forked it, so the pool starts every process from one thread that lives as long
  as the driver (`start_process`), not from whichever thread asked (the server's engine thread
  replaces workers, and ends before the pool closes).  Under the fork server (the tests'), the
  parent is the fork server, which exits when the driver does (its "alive" pipe ends).  SIGKILL
  also ends a worker that is stopped (SIGSTOP), which no thread of its own could do.
- the lifeline: a pipe whose only write end the driver holds and never writes; a daemon thread of
  the worker blocks reading it and exits the process at end of file, which the kernel delivers
  as soon as the driver is gone, whoever its parent is.
multiprocessing's resource tracker ends by itself once the driver and the workers, which hold its
pipe, are gone; a fork server ends with the driver (the workers drop their copies of its pipe,
`process.py`).  Ray actors (`cluster/ray_pool.py`) are not detached: Ray kills them with their
driver.

Hung workers (both pools).  A worker sends a `Heartbeat` every `WorkerSpec.heartbeat_s` from a
thread of its own (`Pulse`), with the progress counter its main thread bumps as it works.  The
driver (`Watch`) declares a worker hung when nothing came from it for `worker_timeout_s` (SIGSTOP,
a GIL held forever), or when it has been running a job for that long without its counter moving
(a deadlock, a collective that never returns).  The pool then kills it, and it is lost like a dead
worker: its jobs end lost, the engine replaces it and rolls its requests back.  Limits: a progress
tick is a transformer block, so a single block (or a VAE decode) longer than the timeout is taken
for a hang; members of one job that stand still together cannot be told apart (a member waiting
in a collective for a stuck one), so the silent one goes first and the others' clocks start over,
and one stuck on its own is found a timeout later; a worker whose channel the driver stops reading
blocks on its next message, heartbeats included (the driver reads all that came before it judges).

This module imports no torch (the driver's side is here too).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Callable


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except PermissionError:  # someone else's process
            return True
        except OSError:
            return False


# ----- the worker's side -----
class Pulse(threading.Thread):
    """Sends `Heartbeat(rank, progress())` every `every_s` until `stop`."""

    def __init__(self, rank: int, outbox, every_s: float, progress: Callable[[], int]):
        super().__init__(daemon=True, name=f"genserve-pulse-{rank}")
        self.rank, self.outbox, self.every_s, self.progress = rank, outbox, every_s, progress
        self._stop = threading.Event()

    def run(self) -> None:
        from .protocol import Heartbeat

        while not self._stop.wait(self.every_s):
            try:
                self.outbox.put(Heartbeat(self.rank, self.progress()))
            except BrokenPipeError:  # the driver closed this worker's channel, or is gone
                os._exit(71)
            except Exception as e:  # noqa: BLE001 - a beat lost is not fatal; the next may go
                print(f"worker {self.rank}: heartbeat: {type(e).__name__}: {e}",
                      file=sys.stderr)

    def stop(self) -> None:
        self._stop.set()


# ----- the driver's side -----
class _Starter:
    """One daemon thread, for the life of the driver, that starts every worker process (see the
    module doc: a worker's parent-death signal follows the thread that forked it)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._todo: list = []
        self._cv = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def start(self, proc, timeout_s: float = 120.0) -> None:
        done, box = threading.Event(), []
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="genserve-process-starter")
                self._thread.start()
            self._todo.append((proc, done, box))
            self._cv.notify()
        if not done.wait(timeout_s):
            raise RuntimeError(f"starting a worker process took over {timeout_s:.0f} s")
        if box:
            raise box[0]

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._todo)
                proc, done, box = self._todo.pop(0)
            try:
                proc.start()
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                box.append(e)
            done.set()


_starter = _Starter()


def start_process(proc) -> None:
    """`proc.start()`, from the driver's starter thread."""
    _starter.start(proc)


class Watch:
    """The driver's view of its workers' heartbeats.  Times are the driver's, taken when a
    message is read, so a driver that was busy for a while reads what came meanwhile before it
    judges anyone."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._heard: dict[int, float] = {}    # rank -> when the last heartbeat was read
        self._progress: dict[int, int] = {}   # rank -> the counter it last reported
        self._moved: dict[int, float] = {}    # rank -> since when that counter is current

    def reset(self, rank: int, now: float) -> None:
        """A worker (re)started: heard from now, its counter starts anew."""
        self._heard[rank] = self._moved[rank] = now
        self._progress.pop(rank, None)

    def heard(self, rank: int, now: float, progress: int) -> None:
        self._heard[rank] = now
        if self._progress.get(rank) != progress:
            self._progress[rank] = progress
            self._moved[rank] = now

    def restart_clock(self, rank: int, now: float) -> None:
        """Progress is judged from now on: the worker was idle until now (an idle worker's
        counter rightly stands still), or a job-mate was just lost (it waited on that one)."""
        self._moved[rank] = now

    def overdue(self, now: float, ranks, busy) -> list[tuple[int, str]]:
        """Of `ranks` (started and alive), those to declare hung, with why, the silent ones
        first (a silent worker is the likelier cause of its job-mates' standing still); `busy`:
        the ranks running a job (the progress rule applies to them only)."""
        silent, stuck = [], []
        for r in ranks:
            quiet = now - self._heard.get(r, now)
            still = now - self._moved.get(r, now)
            if quiet > self.timeout_s:
                silent.append((r, f"no heartbeat for {quiet:.1f} s"))
            elif r in busy and still > self.timeout_s:
                stuck.append((r, f"no progress for {still:.1f} s while running a job"))
        return silent + stuck
