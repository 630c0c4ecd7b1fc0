"""Durable jobs: what the server accepted survives its crash.

One SQLite database in the results directory (`jobs.db`, WAL journal, synchronous FULL: a
transaction that returned is on disk) holds a row per job (spec, owner, idempotency key, status,
error, files, times) and a row per request (steps done at its newest checkpoint, its output file
once written).  A job is inserted before its client gets an answer; every later change is written
by the service's writer thread, never by the engine's loop or the event loop.

Denoising states live beside it as files, `checkpoints/<request id>.<step>.state`
(`StepState.to_bytes`), written by the workers themselves (`parallel/saver.py`; by the writer
thread when a state came back as bytes) to a temporary name, synced and renamed into place, so a
file with a step in its name is always whole: on a restart the newest one is the resume point,
whatever the database says (the rename may have happened just before a crash that lost its row
update, or before the worker could report it).  The temporaries of writes cut short by a crash
are removed at the next start.

What does not survive: the steps a request ran since its newest checkpoint (they run again), an
image kept in memory for a synchronous answer (its file is on disk), and a client's open
connection (it polls, or retries with the same `Idempotency-Key`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..kinds import Kind
from ..parallel.saver import checkpoint_path, step_of, sweep_partial, write_atomic
from ..spec import GenSpec

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,              -- '' when the server has no API keys
    idempotency_key TEXT,
    created_at REAL NOT NULL,         -- unix seconds
    deadline_at REAL NOT NULL,        -- unix seconds
    best_effort INTEGER NOT NULL,
    spec TEXT NOT NULL,               -- JSON: kind, the GenSpec fields, n, slo_ms, seconds
    status TEXT NOT NULL,             -- queued | in_progress | completed | failed
    cancelled INTEGER NOT NULL DEFAULT 0,
    error TEXT,                       -- JSON {code, message} when failed
    completed_at REAL,
    expires_at REAL,
    files TEXT NOT NULL DEFAULT '[]'  -- JSON list of file names under <results>/<job id>/
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    steps_done INTEGER NOT NULL DEFAULT 0,   -- at its newest checkpoint
    file TEXT                                 -- its output, once on disk
);
CREATE INDEX IF NOT EXISTS requests_job ON requests(job_id);
"""


@dataclass
class JobRow:
    """A job as stored (see `SCHEMA`); `requests` maps request id -> (steps done, file)."""

    id: str
    owner: str | None
    idempotency_key: str | None
    created_at: float
    deadline_at: float
    best_effort: bool
    spec: dict
    status: str
    cancelled: bool
    error: dict | None
    completed_at: float | None
    expires_at: float | None
    files: list[str]
    requests: dict[str, tuple[int, str | None]]


def spec_record(kind: Kind, gen: GenSpec, n: int, slo_ms: float | None,
                seconds: str | None) -> dict:
    return {"kind": kind.value, **asdict(gen), "n": n, "slo_ms": slo_ms, "seconds": seconds}


def spec_from_record(d: dict) -> tuple[Kind, GenSpec, dict]:
    """(kind, spec, the rest: n, slo_ms, seconds); unknown keys are ignored."""
    gen = GenSpec(**{k: d[k] for k in _GEN_FIELDS if k in d})
    return Kind(d["kind"]), gen, {k: d.get(k) for k in ("n", "slo_ms", "seconds")}


_GEN_FIELDS = tuple(f.name for f in fields(GenSpec))


class JobStore:
    """The jobs database; thread-safe (one connection behind a lock: writes are short)."""

    def __init__(self, results: Path):
        self.path = Path(results) / "jobs.db"
        self.checkpoints = Path(results) / "checkpoints"
        self.checkpoints.mkdir(mode=0o700, parents=True, exist_ok=True)
        sweep_partial(self.checkpoints)
        self.path.touch(mode=0o600, exist_ok=True)  # owners' hashes and prompts: not for others
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, statements: list[tuple[str, tuple]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ----- writes -----
    def add(self, row: JobRow) -> None:
        """Insert a job and its requests in one transaction (raises sqlite3.IntegrityError when
        the owner already used its idempotency key)."""
        self._tx([("INSERT INTO jobs (id, owner, idempotency_key, created_at, deadline_at, "
                   "best_effort, spec, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (row.id, row.owner or "", row.idempotency_key, row.created_at,
                    row.deadline_at, int(row.best_effort), json.dumps(row.spec), row.status))]
                 + [("INSERT INTO requests (id, job_id) VALUES (?, ?)", (rid, row.id))
                    for rid in row.requests])

    def set_status(self, job_id: str, status: str) -> None:
        self._tx([("UPDATE jobs SET status = ? WHERE id = ? AND status NOT IN "
                   "('completed', 'failed')", (status, job_id))])

    def cancel(self, job_id: str) -> None:
        self._tx([("UPDATE jobs SET cancelled = 1 WHERE id = ?", (job_id,))])

    def request_file(self, rid: str, name: str) -> None:
        self._tx([("UPDATE requests SET file = ? WHERE id = ?", (name, rid))])

    def end(self, job_id: str, status: str, completed_at: float, expires_at: float,
            files: list[str], error: dict | None) -> None:
        self._tx([("UPDATE jobs SET status = ?, completed_at = ?, expires_at = ?, files = ?, "
                   "error = ? WHERE id = ?",
                   (status, completed_at, expires_at, json.dumps(files),
                    json.dumps(error) if error else None, job_id))])

    def delete(self, job_ids: list[str]) -> None:
        self._tx([("DELETE FROM jobs WHERE id = ?", (j,)) for j in job_ids])

    # ----- checkpoints -----
    def save_checkpoint(self, rid: str, steps: int, state: bytes) -> Path:
        """Write `rid`'s state at `steps` atomically, then record it (`adopt_checkpoint`)."""
        path = write_atomic(checkpoint_path(self.checkpoints, rid, steps), state)
        self.adopt_checkpoint(rid, steps, path)
        return path

    def adopt_checkpoint(self, rid: str, steps: int, path: Path) -> None:
        """`path` (written whole, by a worker or by `save_checkpoint`) is `rid`'s state at
        `steps`: record it; older checkpoints of it go (a newer one may already be there)."""
        self._tx([("UPDATE requests SET steps_done = ? WHERE id = ?", (steps, rid))])
        for old in self._checkpoint_files(rid):
            if step_of(old, rid) < steps:
                old.unlink(missing_ok=True)

    def newest_checkpoint(self, rid: str) -> tuple[int, Path] | None:
        found = [(step_of(p, rid), p) for p in self._checkpoint_files(rid)]
        return max(found) if found else None

    def drop_checkpoints(self, rid: str) -> None:
        for p in self._checkpoint_files(rid):
            p.unlink(missing_ok=True)

    def _checkpoint_files(self, rid: str) -> list[Path]:
        return [p for p in self.checkpoints.glob(f"{rid}.*.state") if step_of(p, rid) is not None]

    # ----- reads -----
    def find(self, owner: str | None, idempotency_key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT id FROM jobs WHERE owner = ? AND idempotency_key = ?",
                                   (owner or "", idempotency_key)).fetchone()
        return row[0] if row else None

    def load(self) -> list[JobRow]:
        with self._lock:
            jobs = self._db.execute(
                "SELECT id, owner, idempotency_key, created_at, deadline_at, best_effort, spec, "
                "status, cancelled, error, completed_at, expires_at, files FROM jobs "
                "ORDER BY created_at, id").fetchall()
            reqs = self._db.execute(
                "SELECT job_id, id, steps_done, file FROM requests ORDER BY id").fetchall()
        by_job: dict[str, dict] = {}
        for job_id, rid, steps, file in reqs:
            by_job.setdefault(job_id, {})[rid] = (steps, file)
        return [JobRow(id=j[0], owner=j[1] or None, idempotency_key=j[2], created_at=j[3],
                       deadline_at=j[4], best_effort=bool(j[5]), spec=json.loads(j[6]),
                       status=j[7], cancelled=bool(j[8]),
                       error=json.loads(j[9]) if j[9] else None, completed_at=j[10],
                       expires_at=j[11], files=json.loads(j[12]),
                       requests=by_job.get(j[0], {}))
                for j in jobs]
