"""The serving layer under the HTTP API: jobs, admission, results on disk, metrics.

A `Job` is what a client asked for: an image request of n images (n engine requests) or one video.
The engine runs in its own thread (`Engine.serve`); it reports every change of a request through
`on_update`, which updates the job and wakes whoever waits on it in the asyncio loop.  Outputs come
encoded (PNG / MP4 made by the workers, `Engine(output=...)`): nothing here encodes.  A writer
thread puts the bytes on disk (never the engine's loop); a job is completed only once its files
are there, with its `job.json`.  An image job's PNGs also stay in memory until its synchronous
response takes them, so that answer never reads back what was just written.  Finished jobs stay
readable from `results_dir` until their TTL passes, also across a restart of the server.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..catalog import MODELS
from ..engine import Engine
from ..latency import LatencyModel
from ..models.output import Encoded
from ..parallel.protocol import OutputFormat
from ..policies import make_policy
from ..request import Kind, Request, Status
from ..spec import GenSpec
from ..workload import standalone_sp
from .config import ServeConfig
from .metrics import ServeMetrics

log = logging.getLogger("genserve.server")


class ApiError(Exception):
    """An answer other than success: HTTP status, OpenAI-style error body, optional headers."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}


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
    deadline: float  # engine clock
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

    @property
    def progress(self) -> int:
        total = self.spec.gen.steps * len(self.request_ids)
        if self.status == "completed":
            return 100
        return int(100 * sum(self.steps_done.values()) / total) if total else 0

    @property
    def final(self) -> bool:
        return self.status in ("completed", "failed")


class Service:
    def __init__(self, cfg: ServeConfig):
        cfg.validate()
        self.cfg = cfg
        self.metrics = ServeMetrics()
        self.jobs: dict[str, Job] = {}
        self._lock = threading.RLock()
        self._listeners: list = []  # callables(job) run on every change, from any thread
        self.draining = False
        self.started = False
        self.engine_error: str | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="genserve-writer")
        self.results = Path(cfg.results_dir)
        self.results.mkdir(parents=True, exist_ok=True)
        self._load_results()

    # ----- lifecycle -----
    def start(self) -> None:
        from ..parallel.workers import WorkerPool
        from ..profiler import profile_workers, write_profile

        cfg = self.cfg
        device = "cpu" if cfg.device == "cpu" else "cuda"
        if cfg.ray:
            from ..cluster import RayWorkerPool
            self.pool = RayWorkerPool(cfg.presets, cfg.workers or None, cfg.model_path, device,
                                      address=cfg.ray, cpus_per_worker=cfg.ray_cpus_per_worker)
        else:
            self.pool = WorkerPool(cfg.presets, cfg.workers, cfg.model_path, device)
        if cfg.profile == "measure":
            prof_dir = self.results / ".profile"
            write_profile(prof_dir, "local", *profile_workers(list(cfg.presets), (1, 2, 4),
                                                              reps=3, pool=self.pool))
            self.latency = LatencyModel(prof_dir)
        else:
            self.latency = LatencyModel(cfg.profile)
        for p in cfg.presets:
            self.latency.profile_of(p)  # a clear error now, not inside the policy
        self.engine = Engine(make_policy(cfg.policy), self.pool, self.latency,
                             checkpoint_every=cfg.checkpoint_every, on_update=self._on_update,
                             output=OutputFormat(fps=cfg.fps))
        self.metrics.watch_engine(self.engine)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run_engine, name="genserve-engine",
                                        daemon=True)
        self._thread.start()
        self._janitor = threading.Thread(target=self._expire_loop, daemon=True)
        self._janitor.start()
        self.started = True

    def _run_engine(self) -> None:
        try:
            self.engine.serve(self._stop)
        except Exception as e:  # noqa: BLE001 - a policy or engine bug: fail what is pending
            log.exception("engine stopped")
            self.engine_error = f"{type(e).__name__}: {e}"
            with self._lock:
                for job in self.jobs.values():
                    if not job.final:
                        self._fail(job, "engine_error", self.engine_error)

    def stop(self) -> None:
        """Shut down: requests still running end failed (`server_shutdown`); then the engine
        thread, the workers and the writer stop."""
        if self.started:
            self.started = False
            self._stop.set()
            with self._lock:
                for job in self.jobs.values():
                    if not job.final:
                        self._fail(job, "server_shutdown", "the server stopped before this "
                                   "job finished")
                        self._changed(job)
            self.engine.halt()
            self._thread.join(timeout=30)
            self.pool.close()
        self._writer.shutdown(wait=True)

    def drain(self, timeout_s: float | None = None) -> bool:
        """Stop admitting; wait for running work to end.  True if everything ended in time."""
        self.draining = True
        deadline = time.monotonic() + (self.cfg.drain_timeout_s if timeout_s is None
                                       else timeout_s)
        while time.monotonic() < deadline:
            with self._lock:
                if all(j.final for j in self.jobs.values()):
                    return True
            time.sleep(0.05)
        return False

    def healthy(self) -> bool:
        return self.started and self.engine_error is None and self._thread.is_alive()

    # ----- jobs -----
    def submit(self, spec: JobSpec, owner: str | None, slo_factor: float = 1.0) -> Job:
        gen = spec.gen
        if self.draining:
            raise ApiError(503, "the server is draining: not taking new requests", "draining",
                           headers={"Retry-After": "30"})
        if not self.healthy():
            raise ApiError(503, f"the engine is not running ({self.engine_error or 'stopped'})",
                           "engine_unavailable")
        if gen.model not in self.cfg.presets:
            raise ApiError(400, f"model {gen.model!r} is not served here; served: "
                                f"{', '.join(self.cfg.presets)}", "model_not_found", "model")
        k = standalone_sp(gen.model, gen.height, gen.width, gen.frames, self.latency,
                          self.cfg.workers)
        alone = self.latency.standalone(Request("probe", spec.kind, gen), k)
        with self._lock:
            waiting = sum(1 for j in self.jobs.values()
                          if j.status == "queued" and j.spec.kind is spec.kind)
            limit = (self.cfg.max_waiting_images if spec.kind is Kind.IMAGE
                     else self.cfg.max_waiting_videos)
            if waiting >= limit:
                retry = max(1, math.ceil(alone * waiting / self.cfg.workers))
                self.metrics.rejected("queue_full", spec.kind.value)
                raise ApiError(429, f"{waiting} {spec.kind.value} requests are waiting (limit "
                                    f"{limit}); retry later", "queue_full",
                               headers={"Retry-After": str(retry)})
            slo = (spec.slo_ms / 1e3 if spec.slo_ms is not None
                   else self.cfg.slo_scale * slo_factor * alone)
            best_effort = alone > slo
            if best_effort and self.cfg.infeasible == "reject":
                self.metrics.rejected("slo_infeasible", spec.kind.value)
                raise ApiError(422, f"slo_ms={slo * 1e3:.0f} cannot be met: this request takes "
                                    f"about {alone * 1e3:.0f} ms alone", "slo_infeasible",
                               "slo_ms")
            now = self.engine.now()
            job = Job(id=("video_" if spec.kind is Kind.VIDEO else "img_") + uuid.uuid4().hex,
                      spec=spec, owner=owner, created_at=time.time(), request_ids=[],
                      deadline=now + slo, best_effort=best_effort)
            for i in range(spec.n):
                rid = f"{job.id}-{i}"
                job.request_ids.append(rid)
                job.steps_done[rid] = 0
            self.jobs[job.id] = job
            for i, rid in enumerate(job.request_ids):
                self.metrics.submitted(spec.kind.value)
                self.engine.submit(Request(rid, spec.kind, replace(gen, seed=gen.seed + i),
                                           arrival=now, deadline=now + slo, standalone=alone))
        return job

    def get(self, job_id: str, owner: str | None) -> Job:
        job = self.jobs.get(job_id)
        if job is None or (self.cfg.api_keys and job.owner != owner):
            raise ApiError(404, f"no job {job_id!r}", "not_found", "id")
        return job

    def list(self, owner: str | None, kind: Kind | None = None) -> list[Job]:
        with self._lock:
            return sorted((j for j in self.jobs.values()
                           if (not self.cfg.api_keys or j.owner == owner)
                           and (kind is None or j.spec.kind is kind)),
                          key=lambda j: (j.created_at, j.id))

    def cancel(self, job_id: str, owner: str | None) -> Job:
        job = self.get(job_id, owner)
        with self._lock:
            if not job.final:
                job.cancelled = True
                for rid in job.request_ids:
                    self.engine.cancel(rid)
        return job

    def delete(self, job_id: str, owner: str | None) -> Job:
        """Cancel a job that has not ended; forget an ended one (record and files)."""
        job = self.get(job_id, owner)
        with self._lock:
            if not job.final:
                return self.cancel(job_id, owner)
            self.jobs.pop(job.id, None)
        shutil.rmtree(self.results / job.id, ignore_errors=True)
        return job

    def queue_position(self, job: Job) -> int | None:
        """0-based place among jobs of its kind not started yet (None once it runs)."""
        if job.status != "queued":
            return None
        with self._lock:
            ahead = [j for j in self.jobs.values() if j.status == "queued"
                     and j.spec.kind is job.spec.kind and (j.created_at, j.id) < (job.created_at,
                                                                               job.id)]
        return len(ahead)

    def estimated_finish(self, job: Job) -> float | None:
        """Unix time: now + the job's remaining steps at the profiled step time (a lower bound
        while it waits or shares GPUs); the completion time once it ended."""
        if job.final:
            return job.completed_at
        s = job.spec.gen
        step = self.latency.step_time(s.model, MODELS[s.model].tokens(s.height, s.width,
                                                                       s.frames))
        left = sum(s.steps - d for d in job.steps_done.values())
        return time.time() + left * step + self.latency.decode_time(s.model, s.height, s.width,
                                                                    s.frames)

    def add_listener(self, fn) -> None:
        self._listeners.append(fn)

    # ----- engine updates (engine thread) -----
    def _on_update(self, r: Request, output) -> None:
        self.metrics.observe(r)
        with self._lock:
            job = self.jobs.get(_job_of(r.id))
            if job is None:
                return
            job.steps_done[r.id] = r.steps_done
            if r.status in (Status.RUNNING, Status.PREEMPTED) and job.status == "queued":
                job.status = "in_progress"
            if r.status is Status.FINISHED:
                self._writer.submit(self._write, job, r.id, output)
            elif r.status is Status.CANCELLED:
                self._fail(job, "cancelled", "cancelled by the client")
            elif r.status in (Status.FAILED, Status.REJECTED):
                self._fail(job, "generation_failed", r.reason or "failed")
            self._changed(job)

    def _write(self, job: Job, rid: str, output: Encoded) -> None:
        """Put a finished request's file (encoded by its worker) on disk; complete the job once
        all of its files are there."""
        d = self.results / job.id
        video = job.spec.kind is Kind.VIDEO
        path = d / ("video.mp4" if video else f"{job.request_ids.index(rid)}.png")
        try:
            if output.suffix != path.suffix:
                raise ValueError(f"a {job.spec.kind.value} came as {output.media_type}")
            d.mkdir(parents=True, exist_ok=True)
            path.write_bytes(output.data)
        except Exception as e:  # noqa: BLE001 - a job fails with the reason, the server goes on
            with self._lock:
                self._fail(job, "output_error", f"writing the output: {e}")
                self._changed(job)
            return
        with self._lock:
            job.ended.add(rid)
            job.files.append(path.name)
            if not video and not job.final:
                job.images[path.name] = output.data
            if len(job.ended) == len(job.request_ids) and not job.final:
                job.files.sort()
                job.status, job.completed_at = "completed", time.time()
                job.expires_at = job.completed_at + self.cfg.result_ttl_s
                (d / "job.json").write_text(json.dumps(_job_record(job)))
            self._changed(job)

    def _fail(self, job: Job, code: str, message: str) -> None:
        if job.final:
            return
        # Error first: readers that do not take the lock must never see "failed" without it.
        job.error = {"code": code, "message": message}
        job.images = {}  # no response will take them
        job.completed_at = time.time()
        job.expires_at = job.completed_at + self.cfg.result_ttl_s
        job.status = "failed"
        for rid in job.request_ids:  # the rest of an image batch is not worth finishing
            if rid not in job.ended:
                self.engine.cancel(rid)

    def _changed(self, job: Job) -> None:
        job.version += 1
        for fn in list(self._listeners):
            fn(job)

    # ----- results -----
    def result_path(self, job: Job, name: str) -> Path:
        return self.results / job.id / name

    def take_images(self, job: Job) -> dict[str, bytes]:
        """A completed image job's PNGs by file name, as the writer kept them for the
        synchronous response; they leave memory now (the files stay on disk)."""
        with self._lock:
            kept, job.images = job.images, {}
        return kept

    def _load_results(self) -> None:
        now = time.time()
        for meta in self.results.glob("*/job.json"):
            try:
                rec = json.loads(meta.read_text())
                if rec["expires_at"] <= now:
                    shutil.rmtree(meta.parent, ignore_errors=True)
                    continue
                job = _job_from_record(rec)
            except (ValueError, KeyError, TypeError) as e:
                log.warning("ignoring %s: %s", meta, e)
                continue
            self.jobs[job.id] = job

    def _expire_loop(self) -> None:
        while not self._stop.wait(min(60.0, self.cfg.result_ttl_s / 4)):
            self.expire()

    def expire(self) -> int:
        now = time.time()
        with self._lock:
            gone = [j for j in self.jobs.values()
                    if j.final and j.expires_at is not None and j.expires_at <= now]
            for j in gone:
                del self.jobs[j.id]
        for j in gone:
            shutil.rmtree(self.results / j.id, ignore_errors=True)
        return len(gone)


def _job_of(request_id: str) -> str:
    """Request ids are "<job id>-<i>" (job ids hold no '-')."""
    return request_id.rpartition("-")[0]


def _job_record(job: Job) -> dict:
    s = job.spec
    return {"id": job.id, "owner": job.owner, "created_at": job.created_at,
            "completed_at": job.completed_at, "expires_at": job.expires_at,
            "files": job.files, "request_ids": job.request_ids,
            "spec": {"kind": s.kind.value, **asdict(s.gen), "n": s.n, "slo_ms": s.slo_ms,
                     "seconds": s.seconds}}


def _job_from_record(rec: dict) -> Job:
    d = rec["spec"]
    gen = GenSpec(**{k: d[k] for k in _GEN_FIELDS if k in d})
    spec = JobSpec(Kind(d["kind"]), gen, n=d["n"], slo_ms=d["slo_ms"], seconds=d["seconds"])
    job = Job(id=rec["id"], spec=spec, owner=rec["owner"],
              created_at=rec["created_at"], request_ids=rec["request_ids"], deadline=0.0,
              status="completed", completed_at=rec["completed_at"], files=rec["files"],
              expires_at=rec["expires_at"])
    job.steps_done = {rid: gen.steps for rid in job.request_ids}
    return job


_GEN_FIELDS = tuple(f.name for f in fields(GenSpec))
