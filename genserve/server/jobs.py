"""A client's job as the server keeps it (`Job`, holding its `JobSpec`), and its row in the job
store (`store.JobRow`) both ways."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from ..request import Kind
from ..spec import GenSpec
from .store import JobRow, spec_from_record, spec_record


@dataclass
class JobSpec:
    """A validated request (see `schemas.py`): `n` outputs of `gen`, the i-th with seed
    `gen.seed + i`."""

    kind: Kind
    gen: GenSpec
    n: int = 1
    slo_ms: float | None = None
    seconds: str | None = None


@dataclass
class Job:
    id: str
    spec: JobSpec
    owner: str | None
    created_at: float
    request_ids: list[str]
    deadline: float  # unix seconds
    status: str = "queued"  # queued | in_progress | completed | failed
    steps_done: dict[str, int] = field(default_factory=dict)
    completed_at: float | None = None
    error: dict | None = None
    files: list[str] = field(default_factory=list)
    cancelled: bool = False
    best_effort: bool = False
    ended: set = field(default_factory=set)
    version: int = 0
    expires_at: float | None = None
    images: dict[str, bytes] = field(default_factory=dict)  # PNGs until the response takes them
    idempotency_key: str | None = None
    # DELETE /v1/videos/{id} before it ended: hidden from then on (the answer said deleted), and
    # expired as soon as it ends, so the janitor removes it and a restart does not bring it back.
    deleted: bool = False

    @property
    def progress(self) -> int:
        total = self.spec.gen.steps * len(self.request_ids)
        if self.status == "completed":
            return 100
        return int(100 * sum(self.steps_done.values()) / total) if total else 0

    @property
    def final(self) -> bool:
        return self.status in ("completed", "failed")


def hidden(job: Job) -> bool:
    """Nobody sees it any more: expired, or deleted while it still ran."""
    return job.deleted or expired(job)


def expired(job: Job) -> bool:
    """Past its TTL (the janitor removes it at its next round; until then nobody sees it)."""
    return job.final and job.expires_at is not None and job.expires_at <= time.time()


def unseeded(spec: JobSpec) -> JobSpec:
    return replace(spec, gen=replace(spec.gen, seed=0))


def row_of(job: Job) -> JobRow:
    s = job.spec
    return JobRow(id=job.id, owner=job.owner, idempotency_key=job.idempotency_key,
                  created_at=job.created_at, deadline_at=job.deadline,
                  best_effort=job.best_effort,
                  spec=spec_record(s.kind, s.gen, s.n, s.slo_ms, s.seconds), status=job.status,
                  cancelled=job.cancelled, error=job.error, completed_at=job.completed_at,
                  expires_at=job.expires_at, files=list(job.files),
                  requests={rid: (0, None) for rid in job.request_ids})


def job_of_row(row: JobRow) -> Job:
    kind, gen, rest = spec_from_record(row.spec)
    spec = JobSpec(kind, gen, n=rest["n"], slo_ms=rest["slo_ms"], seconds=rest["seconds"])
    rids = sorted(row.requests, key=lambda rid: int(rid.rpartition("-")[2]))
    job = Job(id=row.id, spec=spec, owner=row.owner, created_at=row.created_at,
              request_ids=rids, deadline=row.deadline_at, status=row.status,
              completed_at=row.completed_at, error=row.error, files=list(row.files),
              cancelled=row.cancelled, best_effort=row.best_effort, expires_at=row.expires_at,
              idempotency_key=row.idempotency_key)
    done = job.status == "completed"
    job.steps_done = {rid: gen.steps if done or row.requests[rid][1] else row.requests[rid][0]
                      for rid in rids}
    job.ended = {rid for rid in rids if done or row.requests[rid][1]}
    if not job.final:
        job.files = sorted(row.requests[rid][1] for rid in job.ended)
    return job
