"""The worker process's entry point on one machine (`WorkerPool`): ties the process to the
driver's life, then runs `worker_main` (see `liveness.py` for why both guards).  No torch at
module level: the guards are up before the worker imports it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent (thread) ends (Linux; False
    elsewhere, where the lifeline alone guards)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _exit_at_end_of(lifeline) -> None:
    try:
        while os.read(lifeline.fileno(), 1):
            pass  # nothing is ever written; any byte is ignored
    except OSError:
        pass
    # The driver is gone: nobody will read this worker's results.  Exit at once, without the
    # interpreter's teardown (other threads may hold locks or sit in a collective).
    os._exit(70)


def watch_lifeline(lifeline) -> threading.Thread:
    t = threading.Thread(target=_exit_at_end_of, args=(lifeline,), daemon=True,
                         name="genserve-lifeline")
    t.start()
    return t


def _let_the_fork_server_go() -> None:
    """Under the fork server, a child inherits the server's "alive" pipe (so that it could start
    processes through it too), and the server runs while any holder lives.  A worker never starts
    processes: it closes its copy, so that the server ends with the driver, and the kernel then
    kills the server's children (`die_with_parent`), a stopped worker included.  multiprocessing
    keeps that descriptor in a private attribute (CPython 3.8-3.13): if it is not there, nothing is
    done, and a stopped worker would then outlive the driver under the fork server only."""
    try:
        from multiprocessing import forkserver

        server = forkserver._forkserver
        fd = server._forkserver_alive_fd
    except AttributeError:
        return
    if fd is not None:
        server._forkserver_alive_fd = None
        os.close(fd)


def entry_point(spec):
    """The worker's main function for `spec` (a `WorkerSpec`): the real one (torch), or the
    emulated one (`spec.emulate`)."""
    if spec.emulate is not None:
        from ..emulate.worker import worker_main
    else:
        from .worker_main import worker_main
    return worker_main


def run_worker(lifeline, *args) -> None:
    """The worker process's target (`WorkerPool`): the guards above, then `worker_main(*args)`.
    After a `Shutdown` the process exits without the interpreter's teardown, which took seconds
    (torch and diffusers modules); every message has been written by then (`Sender.put` writes
    through)."""
    die_with_parent()
    watch_lifeline(lifeline)  # also covers a driver that died before the line above
    # A worker ends by its driver only (`Shutdown`, the guards above, SIGKILL).  SIGTERM or
    # SIGINT sent to the whole process group (a systemd stop, Ctrl-C in a terminal) is the
    # driver's to handle, by draining: a worker that died of it mid-drain was replaced.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _let_the_fork_server_go()
    worker_main = entry_point(args[1])  # torch (a real worker): imported once the guards are up
    worker_main(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
