"""The serving layer under the HTTP API: jobs, admission, results on disk, metrics.

A `Job` is what a client asked for: an image request of n images (n engine requests) or one video.
The engine runs in its own thread (`Engine.serve`); it reports every change of a request through
`on_update`, which updates the job and wakes whoever waits on it in the asyncio loop.  Outputs come
encoded (PNG / MP4 made by the workers, `Engine(output=...)`): nothing here encodes.  A writer
thread puts the bytes on disk (never the engine's loop); a job is completed only once its files
are there.  An image job's PNGs also stay in memory until its synchronous response takes them, so
that answer never reads back what was just written.

Every accepted job is in the job store (`store.py`) before its client hears back; the writer
thread records what happens to it and the engine's periodic checkpoints.  A restarted server
(after a crash, or a stop with work left) reloads every job: finished ones stay readable until
their TTL, unfinished ones resume from their newest checkpoint (or the start); one that cannot
(its model is no longer served) ends failed with `server_restarted`.
"""

from __future__ import annotations

import logging
import math
import shutil
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from ..catalog import MODELS
from ..engine import Engine
from ..feedback import Corrected
from ..latency import LatencyModel
from ..models.output import Encoded
from ..parallel.protocol import OutputFormat
from ..policies import make_policy
from ..request import Kind, Request, Status
from ..spec import GenSpec
from ..workload import standalone_sp
from .config import ServeConfig
from .metrics import ServeMetrics
from .jobs import Job, JobSpec, expired, hidden, job_of_row, row_of, unseeded
from .store import JobStore

log = logging.getLogger("genserve.server")


class ApiError(Exception):
    """An answer other than success: HTTP status, OpenAI-style error body, optional headers."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}


ID_PREFIX = 32  # characters of a client's id an error message may repeat


def short(text: str, n: int = ID_PREFIX) -> str:
    """A client's string as an error message may show it: its first `n` characters, quoted."""
    return repr(text[:n] + ("..." if len(text) > n else ""))


class Service:
    def __init__(self, cfg: ServeConfig):
        cfg.validate()
        self.cfg = cfg
        self.metrics = ServeMetrics()
        self.jobs: dict[str, Job] = {}
        self._lock = threading.RLock()
        self._listeners: list = []  # callables(job) run on every change, from any thread
        # callables(request) run first on every engine update, on its thread (dashboard.py)
        self.update_hooks: list = []
        self.draining = False
        self.started = False
        self._hung_seen = (0, 0.0)  # (pool.hung as last seen, when it changed)
        self.engine_error: str | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="genserve-writer")
        self.results = Path(cfg.results_dir)
        self.results.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.results)
        self._resume: list[Job] = []  # unfinished at the last stop: resumed by `start`
        self._load_jobs()

    # ----- lifecycle -----
    def start(self) -> None:
        from ..parallel.workers import WorkerPool
        from ..profiler import profile_workers, write_profile

        cfg = self.cfg
        device = "cpu" if cfg.device == "cpu" else "cuda"
        if cfg.emulate:
            from ..emulate import Emulation

            self.pool = WorkerPool(cfg.presets, cfg.workers, worker_timeout_s=cfg.worker_timeout_s,
                                   emulate=Emulation(cfg.emulate, cfg.time_scale,
                                                     cfg.gpus_per_node))
        elif cfg.ray:
            from ..cluster import RayWorkerPool
            self.pool = RayWorkerPool(cfg.presets, cfg.workers or None, cfg.model_path, device,
                                      address=cfg.ray, cpus_per_worker=cfg.ray_cpus_per_worker,
                                      worker_timeout_s=cfg.worker_timeout_s)
        else:
            self.pool = WorkerPool(cfg.presets, cfg.workers, cfg.model_path, device,
                                   worker_timeout_s=cfg.worker_timeout_s)
        if cfg.emulate:  # the emulated GPUs' own timings, and the engine's cost around them
            from ..emulate.calibrate import dispatch_cost

            per = dispatch_cost(self.pool, LatencyModel(cfg.emulate), cfg.time_scale,
                                cfg.gpus_per_node, cfg.checkpoint_every)
            self.latency = LatencyModel(cfg.emulate, costs=per.estimates())
            log.info("emulated GPUs: the engine's cost per quantum measured: %s",
                     per.describe(cfg.time_scale))
        elif cfg.profile == "measure":
            prof_dir = self.results / ".profile"
            write_profile(prof_dir, "local", *profile_workers(list(cfg.presets), (1, 2, 4),
                                                              reps=3, pool=self.pool))
            self.latency = LatencyModel(prof_dir)
        else:
            self.latency = LatencyModel(cfg.profile)
        for p in cfg.presets:
            self.latency.profile_of(p)  # a clear error now, not inside the policy
        if cfg.latency_feedback:
            self.latency = Corrected(self.latency)
        if cfg.worker_timeout_s is None:
            self.pool.set_worker_timeout(self._default_worker_timeout())
        self.engine = Engine(make_policy(cfg.policy), self.pool, self.latency,
                             gpus_per_node=cfg.gpus_per_node, time_scale=cfg.time_scale,
                             checkpoint_every=cfg.checkpoint_every, on_update=self._on_update,
                             output=OutputFormat(fps=cfg.fps), on_checkpoint=self._on_checkpoint,
                             checkpoint_dir=str(self.store.checkpoints))
        self.metrics.watch_engine(self.engine, self.workers_hung, cfg.presets)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run_engine, name="genserve-engine",
                                        daemon=True)
        self._thread.start()
        self._janitor = threading.Thread(target=self._expire_loop, daemon=True)
        self._janitor.start()
        self.started = True
        self._resume_jobs()

    def _default_worker_timeout(self) -> float:
        """A few times the longest step the profile expects (the largest size of each served
        model, a batch of 4, alone), at least 60 s: a worker silent that long is hung."""
        longest = max(self.latency.step_time(p, MODELS[p].tokens(h, w, f), 4, 1)
                      for p in self.cfg.presets for (w, h, f) in MODELS[p].sizes)
        return max(60.0, 5.0 * self._wall(longest))

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
        """Shut down: whoever waits on a job not finished hears `server_shutdown` (the job stays
        in the store as it was, and the next start resumes it); then the engine thread, the
        workers, the writer and the store stop."""
        if self.started:
            self.started = False
            self._stop.set()
            self.release_waiters()
            self.engine.halt()
            self._thread.join(timeout=5)  # a turn of the loop; a stuck one is left behind
            self.pool.close()
        self._writer.shutdown(wait=True)
        self.store.close()

    def release_waiters(self) -> None:
        """Answer whoever waits on a job not finished: it reads failed, `server_shutdown`.  Only
        in memory: the store keeps the job as it was, for the next start to resume."""
        with self._lock:
            for job in self.jobs.values():
                if not job.final:
                    self._fail(job, "server_shutdown", "the server stopped before this job "
                               "finished; it resumes when the server starts again",
                               persist=False)
                    self._changed(job)

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

    def workers_hung(self) -> int:
        """Workers declared hung (killed and replaced) since the start."""
        return getattr(getattr(self, "pool", None), "hung", 0)

    def degraded(self) -> dict | None:
        """Why the server serves with less than it has (workers being replaced, or one declared
        hung in the last 5 minutes), or None."""
        hung, now = self.workers_hung(), time.monotonic()
        if hung != self._hung_seen[0]:
            self._hung_seen = (hung, now)
        down = len(self.engine.down_workers) if self.started else 0
        if down or (hung and now - self._hung_seen[1] < 300):
            return {"workers_down": down, "workers_hung_total": hung}
        return None

    # ----- jobs -----
    def submit(self, spec: JobSpec, owner: str | None, slo_factor: float = 1.0,
               idempotency_key: str | None = None) -> Job:
        """Admit a job; it is in the store when this returns.  A repeated `idempotency_key` of
        the same owner returns the job it made (409 if the request differs)."""
        gen = spec.gen
        if idempotency_key is not None:
            again = self._idempotent(spec, owner, idempotency_key)
            if again is not None:
                return again
        if self.draining:
            raise ApiError(503, "the server is draining: not taking new requests", "draining",
                           headers={"Retry-After": "30"})
        if not self.healthy():
            raise ApiError(503, f"the engine is not running ({self.engine_error or 'stopped'})",
                           "engine_unavailable")
        if gen.model not in self.cfg.presets:
            raise ApiError(400, f"model {gen.model!r} is not served here; served: "
                                f"{', '.join(self.cfg.presets)}", "model_not_found", "model")
        alone = self._standalone(spec.kind, gen)
        with self._lock:
            waiting = sum(1 for j in self.jobs.values()
                          if j.status == "queued" and j.spec.kind is spec.kind)
            limit = (self.cfg.max_waiting_images if spec.kind is Kind.IMAGE
                     else self.cfg.max_waiting_videos)
            if waiting >= limit:
                retry = max(1, math.ceil(self._wall(alone * waiting / self.cfg.workers)))
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
            now, created = self.engine.now(), time.time()
            job = Job(id=("video_" if spec.kind is Kind.VIDEO else "img_") + uuid.uuid4().hex,
                      spec=spec, owner=owner, created_at=created, request_ids=[],
                      deadline=created + self._wall(slo), best_effort=best_effort,
                      idempotency_key=idempotency_key)
            for i in range(spec.n):
                rid = f"{job.id}-{i}"
                job.request_ids.append(rid)
                job.steps_done[rid] = 0
            try:
                self.store.add(row_of(job))
            except sqlite3.IntegrityError:  # the same key, submitted meanwhile
                again = self._idempotent(spec, owner, idempotency_key)
                if again is None:
                    raise
                return again
            self.jobs[job.id] = job
            for i, rid in enumerate(job.request_ids):
                self.metrics.submitted(spec.kind.value)
                self.engine.submit(Request(rid, spec.kind, replace(gen, seed=gen.seed + i),
                                           arrival=now, deadline=now + slo, standalone=alone))
        return job

    def _wall(self, seconds: float) -> float:
        """Wall seconds of `seconds` on the engine's clock (they differ under a time scale:
        emulated GPUs)."""
        return seconds / self.cfg.time_scale

    def _standalone(self, kind: Kind, gen: GenSpec) -> float:
        """Seconds `gen` takes alone on its default SP degree (the SLO's unit)."""
        k = standalone_sp(gen.model, gen.height, gen.width, gen.frames, self.latency,
                          self.cfg.workers)
        return self.latency.standalone(Request("probe", kind, gen), k)

    def _idempotent(self, spec: JobSpec, owner: str | None, key: str) -> Job | None:
        job_id = self.store.find(owner, key)
        job = self.jobs.get(job_id) if job_id else None
        if job is None:
            return None
        # The seed is left out: a client that names none gets a random one per submission, and
        # its retry must still find the first.
        if unseeded(job.spec) != unseeded(spec):
            raise ApiError(409, "this Idempotency-Key was used for a different request",
                           "idempotency_key_reused", "Idempotency-Key")
        return job

    def get(self, job_id: str, owner: str | None) -> Job:
        job = self.jobs.get(job_id)
        if job is None or (self.cfg.api_keys and job.owner != owner) or hidden(job):
            raise ApiError(404, f"no job {short(job_id)}", "not_found", "id")
        return job

    def list(self, owner: str | None, kind: Kind | None = None) -> list[Job]:
        with self._lock:
            return sorted((j for j in self.jobs.values()
                           if (not self.cfg.api_keys or j.owner == owner) and not hidden(j)
                           and (kind is None or j.spec.kind is kind)),
                          key=lambda j: (j.created_at, j.id))

    def cancel(self, job_id: str, owner: str | None) -> Job:
        job = self.get(job_id, owner)
        with self._lock:
            if not job.final:
                job.cancelled = True
                self._later(self.store.cancel, job.id)
                for rid in job.request_ids:
                    self.engine.cancel(rid)
        return job

    def delete(self, job_id: str, owner: str | None) -> Job:
        """Forget a job (record and files): at once if it ended; else it is cancelled and hidden
        now, and expires as it ends (`_end`), for the janitor to remove."""
        job = self.get(job_id, owner)
        with self._lock:
            if not job.final:  # under the lock: it cannot end between the two
                self.cancel(job_id, owner)
                job.deleted = True
                return job
            self.jobs.pop(job.id, None)
        self.store.delete([job.id])
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
        return time.time() + self._wall(left * step + self.latency.decode_time(
            s.model, s.height, s.width, s.frames))

    def add_listener(self, fn) -> None:
        self._listeners.append(fn)

    # ----- engine updates (engine thread) -----
    def _on_update(self, r: Request, output) -> None:
        for hook in self.update_hooks:
            hook(r)
        self.metrics.observe(r)
        with self._lock:
            job = self.jobs.get(_job_of(r.id))
            if job is None:
                return
            job.steps_done[r.id] = r.steps_done
            if r.status in (Status.RUNNING, Status.PREEMPTED) and job.status == "queued":
                job.status = "in_progress"
                self._later(self.store.set_status, job.id, job.status)
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
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(output.data)
            tmp.replace(path)  # a file under its name is whole, even after a crash
            self.store.request_file(rid, path.name)
        except Exception as e:  # noqa: BLE001 - a job fails with the reason, the server goes on
            with self._lock:
                self._fail(job, "output_error", f"writing the output: {e}")
                self._changed(job)
            return
        self.store.drop_checkpoints(rid)
        with self._lock:
            if not video and not job.final:
                job.images[path.name] = output.data
            completed = self._file_done(job, rid, path.name)
        if completed:  # the store's write outside the lock: the engine's updates never wait
            self._persist(self.store.end, job.id, job.status, job.completed_at, job.expires_at,
                          job.files, None)
        with self._lock:
            self._changed(job)

    def _file_done(self, job: Job, rid: str, name: str) -> bool:
        """`rid`'s output is on disk; True: that was the job's last one, it completed."""
        job.ended.add(rid)
        job.files.append(name)
        if len(job.ended) < len(job.request_ids) or job.final:
            return False
        if job.cancelled:
            self._fail(job, "cancelled", "cancelled by the client")  # it finished meanwhile
            return False
        job.files.sort()
        self._end(job, "completed")
        return True

    def _end(self, job: Job, status: str) -> None:
        """`job` ends (completed or failed) now; readable until its TTL from now."""
        job.completed_at = time.time()
        job.expires_at = job.completed_at + (0.0 if job.deleted else self.cfg.result_ttl_s)
        job.status = status

    def _on_checkpoint(self, rid: str, steps: int, saved: str | bytes) -> None:
        """The engine's thread: a request's state at `steps`, in a file a worker wrote into the
        store's directory (or as bytes, from workers that share no files with this machine); the
        writer records it."""
        self._later(self._save_checkpoint, rid, steps, saved)

    def _save_checkpoint(self, rid: str, steps: int, saved: str | bytes) -> None:
        job = self.jobs.get(_job_of(rid))
        if job is None or job.final or rid in job.ended:  # it ended meanwhile: nothing to resume
            if isinstance(saved, str):
                Path(saved).unlink(missing_ok=True)
            return
        if isinstance(saved, str):
            self.store.adopt_checkpoint(rid, steps, Path(saved))
        else:
            self.store.save_checkpoint(rid, steps, saved)

    def _later(self, fn, *args) -> None:
        """`fn(*args)` on the writer thread, after what is queued there (outputs, checkpoints)."""
        try:
            self._writer.submit(self._persist, fn, *args)
        except RuntimeError:  # the writer stopped (shutdown): the store keeps the last state
            log.warning("job store: %s after shutdown, not recorded", fn.__name__)

    def _persist(self, fn, *args) -> None:
        """A store write from the writer thread: a failure (disk full) is logged, and the server
        goes on serving from memory; what it lost is what a crash now would lose."""
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            log.exception("job store: %s%r failed", fn.__name__, args[:2])

    def _fail(self, job: Job, code: str, message: str, persist: bool = True) -> None:
        """End `job` failed; `persist`: also in the store (not on a shutdown: the job resumes at
        the next start)."""
        if job.final:
            return
        # Error first: readers that do not take the lock must never see "failed" without it.
        job.error = {"code": code, "message": message}
        job.images = {}  # no response will take them
        self._end(job, "failed")
        if persist:
            self._later(self._store_failed, job)
        engine = getattr(self, "engine", None)  # none yet: a job failed while resuming
        for rid in job.request_ids:  # the rest of an image batch is not worth finishing
            if rid not in job.ended and engine is not None:
                engine.cancel(rid)

    def _store_failed(self, job: Job) -> None:
        self.store.end(job.id, "failed", job.completed_at, job.expires_at, job.files, job.error)
        for rid in job.request_ids:
            self.store.drop_checkpoints(rid)

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

    # ----- restart -----
    def _load_jobs(self) -> None:
        """The store's jobs: finished ones readable until their TTL; unfinished ones wait for
        `start` to resume them."""
        gone = []
        for row in self.store.load():
            try:
                job = job_of_row(row)
            except (ValueError, KeyError, TypeError) as e:
                log.warning("job store: ignoring job %s: %s", row.id, e)
                continue
            if expired(job):
                gone.append(job.id)
                continue
            if not job.final:
                self._resume.append(job)
            self.jobs[job.id] = job
        self._forget(gone)

    def _resume_jobs(self) -> None:
        """Put the jobs the last run left unfinished back into the engine, each request from
        its newest checkpoint (or its start)."""
        for job in self._resume:
            with self._lock:
                if not job.final:
                    self._resume_job(job)
                self._changed(job)
        self._resume = []

    def _resume_job(self, job: Job) -> None:
        gen = job.spec.gen
        if job.cancelled:
            self._fail(job, "cancelled", "cancelled by the client")
            return
        if gen.model not in self.cfg.presets:
            self._fail(job, "server_restarted", f"the server restarted without {gen.model!r}, "
                       f"which this job needs (served now: {', '.join(self.cfg.presets)})")
            return
        left = [rid for rid in job.request_ids if rid not in job.ended]
        if not left:  # every file was written before the stop, the completion was not
            self._end(job, "completed")
            self._later(self.store.end, job.id, job.status, job.completed_at, job.expires_at,
                        job.files, None)
            return
        now = self.engine.now()
        deadline = now + max(0.0, job.deadline - time.time()) * self.cfg.time_scale
        alone = self._standalone(job.spec.kind, gen)
        for rid in left:
            i = int(rid.rpartition("-")[2])
            r = Request(rid, job.spec.kind, replace(gen, seed=gen.seed + i), arrival=now,
                        deadline=deadline, standalone=alone)
            path, ck = None, self.store.newest_checkpoint(rid)
            if ck is not None and 0 < ck[0] < gen.steps and _usable(rid, *ck):
                r.steps_done, path = ck
            job.steps_done[rid] = r.steps_done
            self.metrics.submitted(job.spec.kind.value)
            self.engine.submit(r, path)
        log.info("resumed job %s: %s", job.id, ", ".join(
            f"{rid} at step {job.steps_done[rid]}" for rid in left))

    def _expire_loop(self) -> None:
        while not self._stop.wait(min(60.0, self.cfg.result_ttl_s / 4)):
            self.expire()

    def expire(self) -> int:
        with self._lock:
            gone = [j for j in self.jobs.values() if expired(j)]
            for j in gone:
                del self.jobs[j.id]
        self._forget([j.id for j in gone])
        return len(gone)

    def _forget(self, job_ids: list[str]) -> None:
        """Expired or deleted jobs: out of the store, then their files."""
        if job_ids:
            self.store.delete(job_ids)
        for job_id in job_ids:
            shutil.rmtree(self.results / job_id, ignore_errors=True)


def _usable(rid: str, step: int, path: Path) -> bool:
    """Whether the checkpoint loads as `rid`'s state at `step` (a damaged or foreign file: the
    request starts over rather than failing on its worker)."""
    from ..emulate.state import identity  # a real state (torch) or an emulated one

    try:
        held = identity(path.read_bytes())
        if held != (rid, step):
            raise ValueError(f"it holds {held[0]} at step {held[1]}")
        return True
    except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, start over
        log.warning("job store: checkpoint %s unusable (%s): %s starts over", path.name, e, rid)
        return False


def _job_of(request_id: str) -> str:
    """Request ids are "<job id>-<i>" (job ids hold no '-')."""
    return request_id.rpartition("-")[0]
