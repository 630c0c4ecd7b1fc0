"""Checkpoint files, written by the workers that hold the states.

A request's checkpoint is its state's bytes (`StepState.to_bytes`, or an emulated state's) in
`<directory>/<request id>.<step>.state`.  The engine asks for one every `checkpoint_every` steps
(`Run.want`); with `Run.save` the job's first rank hands the state to its `Saver` thread, which
writes and syncs the file and then tells the driver with a `Saved` (the path, not the bytes).
Why on the worker: a 720p video's state is ~28 MB, and at 64 GPUs the driver received a few per
second through its pipes, each unpickled on the thread that also plans; its decisions stalled
behind them.  Why a thread: a synced write takes tens of milliseconds on a disk, which the
worker's next job does not wait for.

The file appears whole or not at all (written under a temporary name, synced, renamed), so a
reader, or a server restarted after a crash, never sees half a state.  The directory's owner
(the server's job store, or the engine's scratch directory) removes the files; the server's
store trusts what is on disk, not what it was told last (see `server/store.py`).

No torch here: the emulated workers and the driver import this module.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Callable

from .liveness import pid_alive
from .protocol import Saved

SUFFIX = ".state"


def checkpoint_path(directory: str | Path, rid: str, steps: int) -> Path:
    return Path(directory) / f"{rid}.{steps}{SUFFIX}"


def step_of(path: Path, rid: str) -> int | None:
    """The step in `path`'s name if it is one of `rid`'s checkpoints, else None."""
    name = path.name
    if not (name.startswith(rid + ".") and name.endswith(SUFFIX)):
        return None
    step = name[len(rid) + 1:-len(SUFFIX)]
    return int(step) if step.isdigit() else None


def write_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` whole or not at all, synced before it takes the name; owner-only."""
    tmp = path.with_name(path.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk keeps no half-written file
        raise
    return path


def sweep_partial(directory: Path) -> int:
    """Remove the temporaries of writes cut short (`write_atomic` in a process that died): their
    writer's pid is in the name; a live writer's are left alone.  Returns how many went."""
    gone = 0
    for p in Path(directory).glob(f"*{SUFFIX}.*.*.tmp"):
        pid = p.name.split(".")[-3]
        if pid.isdigit() and not pid_alive(int(pid)):
            p.unlink(missing_ok=True)
            gone += 1
    return gone


def scratch_dir(prefix: str, root: str | None = None) -> str:
    """A new private directory `<root>/<prefix><pid>-XXXX`, after removing the ones of this
    prefix whose process is gone (a driver SIGKILLed never removed its own)."""
    import shutil
    import tempfile

    base = Path(root if root is not None else tempfile.gettempdir())
    for old in base.glob(f"{prefix}*-*"):
        pid = old.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)) and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=str(base))


class Saver(threading.Thread):
    """Writes the checkpoints a worker's jobs hand it, one after another, and reports each to
    the driver on `outbox` as a `Saved` (or its error: the request keeps its older checkpoint).
    `save(directory, rid, steps, data)`: `data` is the state's bytes, or a function that makes
    them (called on this thread, when making them needs no lock on the state)."""

    def __init__(self, rank: int, outbox):
        super().__init__(daemon=True, name=f"genserve-saver-{rank}")
        self.rank, self.outbox = rank, outbox
        self.todo: queue.SimpleQueue = queue.SimpleQueue()

    def save(self, directory: str, rid: str, steps: int, data: bytes | Callable[[], bytes]
             ) -> None:
        if not self.is_alive():
            self.start()
        self.todo.put((directory, rid, steps, data))

    def run(self) -> None:
        while True:
            directory, rid, steps, data = self.todo.get()
            blob = None
            try:
                blob = data() if callable(data) else data
                path = write_atomic(checkpoint_path(directory, rid, steps), blob)
                msg = Saved(rid, steps, str(path), directory=directory)
            except Exception as e:  # noqa: BLE001 - that checkpoint is lost, the thread goes on
                msg = Saved(rid, steps, error=f"worker {self.rank}: {type(e).__name__}: {e}",
                            directory=directory)
            del data, blob  # a state is tens of MB: gone before the next wait
            self.outbox.put(msg)
