"""The live cluster page: `GET /dashboard` (static HTML, JS and CSS shipped in the package) and
the JSON it polls, `GET /v1/cluster`.

Where the data comes from: the engine's own updates.  The engine calls the service's `on_update`
from its thread for every change of a request (arrived, quantum started, quantum ended, paused,
ended); the service hands each one to `ClusterView.update` first (`Service.update_hooks`).  There,
still on the engine's thread, the request's quantum in flight is read from the executor core
(`core.in_flight`; safe: the core is only ever touched from that thread), so a quantum opens at
the first update of one of its members after it started and closes at the first update of one of
them after it ended (the core pops it before it notifies its members).  What is recorded goes,
under a lock of its own held for microseconds, into bounded structures: the quanta that ended
(a ring, the newest `max_quanta`), the quanta in flight, the requests not ended, and the ends of
the last `slo_window_s` seconds.  `/v1/cluster` copies them under that lock (in a worker thread,
never on the event loop) and builds its answer outside it; the engine's loop never waits for a
reader longer than such a copy.

Times in the answer are Unix seconds (wall clock); on emulated GPUs (`--time-scale`) engine
times are converted, so the page shows what a client sees.

Keys: `/v1/cluster` takes the same keys as the rest of the API (any configured key; 401
otherwise).  It shows request ids, models, sizes, GPUs and timings, never prompts or outputs, and
a request id opens nothing without its owner's key.  The page itself carries no data and is
public: it asks for a key when `/v1/cluster` answers 401 and sends it as a Bearer header.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..catalog import MODELS
from ..request import Request as EngineRequest, Status
from .service import ApiError

log = logging.getLogger("genserve.server")

GET = ["GET", "HEAD"]  # as every GET of the API, HEAD too

SLO_WINDOW_S = 300.0       # SLO attainment: requests that ended in the last 5 minutes
HISTORY_S = 600           # the longest timeline a client may ask for (seconds)
DEFAULT_SECONDS = 120
MAX_QUANTA = 20_000        # quanta kept (ended); the answer carries at most MAX_ANSWER_QUANTA
MAX_ANSWER_QUANTA = 5_000
MAX_REQUESTS_SHOWN = 200   # active requests listed (the counts cover all)


@dataclass
class _Quantum:
    gpus: tuple[int, ...]
    requests: tuple[str, ...]
    model: str
    kind: str
    steps: int
    cfg_split: bool
    start: float            # wall
    predicted_end: float    # wall
    end: float | None = None
    outcome: str = "running"  # ok / lost (its worker died) / failed / cancelled

    def as_dict(self) -> dict:
        return {"gpus": list(self.gpus), "requests": list(self.requests), "model": self.model,
                "kind": self.kind, "steps": self.steps, "cfg_split": self.cfg_split,
                "start": self.start, "end": self.end, "predicted_end": self.predicted_end,
                "outcome": self.outcome}


@dataclass
class _Live:
    id: str
    kind: str
    model: str
    size: str
    steps: int
    arrival: float          # wall
    deadline: float         # wall
    status: str = "waiting"
    steps_done: int = 0
    gpus: tuple[int, ...] = ()
    started: float | None = None  # wall, its first quantum
    quantum: tuple | None = field(default=None, repr=False)  # the key of its open quantum


def _size(r: EngineRequest) -> str:
    return f"{r.width}x{r.height}" + (f"x{r.frames}" if r.frames > 1 else "")


class ClusterView:
    """What the dashboard shows, recorded from the engine's updates (see the module's doc)."""

    def __init__(self, svc, max_quanta: int = MAX_QUANTA, slo_window_s: float = SLO_WINDOW_S,
                 history_s: float = HISTORY_S):
        self.svc = svc
        self.slo_window_s, self.history_s = slo_window_s, history_s
        self._lock = threading.Lock()
        self._done: deque[_Quantum] = deque(maxlen=max_quanta)   # ended, in end order
        self._open: dict[tuple, _Quantum] = {}                   # in flight
        self._live: dict[str, _Live] = {}                        # requests not ended
        # (wall, model, outcome) of the ends in the SLO window (and at most 200k of them)
        self._ended: deque[tuple[float, str, str]] = deque(maxlen=200_000)
        self._restarts: tuple[int, float | None] = (0, None)     # (seen, when it last grew)
        self._warned = False

    # ----- the engine's thread -----
    def update(self, r: EngineRequest) -> None:
        """Called by the service for every update the engine reports (its thread).  Never
        raises: a bug here must not stop the engine."""
        try:
            self._update(r)
        except Exception:  # noqa: BLE001
            if not self._warned:
                self._warned = True
                log.exception("dashboard: an engine update could not be recorded")

    def _update(self, r: EngineRequest) -> None:
        engine = self.svc.engine
        now, t_engine = time.time(), engine.now()
        scale = self.svc.cfg.time_scale

        def wall(t: float) -> float:
            return now - (t_engine - t) / scale

        q = engine.core.in_flight(r.id)  # the engine's thread: the core is ours to read
        key = (q.key, q.start) if q is not None else None
        status = r.status
        with self._lock:
            rec = self._live.get(r.id)
            if rec is None:
                rec = _Live(r.id, r.kind.value, r.model, _size(r), r.steps, wall(r.arrival),
                            wall(r.deadline))
                self._live[r.id] = rec
            if rec.quantum is not None and rec.quantum != key:  # its quantum ended
                done = self._open.pop(rec.quantum, None)
                if done is not None:
                    done.end = now
                    done.outcome = ("failed" if status is Status.FAILED else
                                    "cancelled" if status is Status.CANCELLED else
                                    "lost" if status is Status.PREEMPTED and not r.gpus else "ok")
                    self._done.append(done)
                rec.quantum = None
            if key is not None and rec.quantum != key:  # a quantum started
                if key not in self._open:
                    a = q.assignment
                    self._open[key] = _Quantum(tuple(q.gpus), tuple(q.requests), r.model,
                                               r.kind.value, a.steps, a.cfg_split, now,
                                               wall(q.end))
                rec.quantum = key
                if rec.started is None:
                    rec.started = now
            rec.steps_done, rec.gpus = r.steps_done, tuple(r.gpus)
            if status is Status.RUNNING:
                rec.status = ("running" if key is not None or r.steps_done < r.steps
                              else "finishing")
            else:
                rec.status = {Status.WAITING: "waiting", Status.PREEMPTED: "paused"}.get(
                    status, status.value)
            if status.is_final:
                del self._live[r.id]
                outcome = ("met" if r.met_deadline else "missed") if status is Status.FINISHED \
                    else "cancelled" if status is Status.CANCELLED else "failed"
                self._ended.append((now, r.model, outcome))
                self._prune(now)

    def _prune(self, now: float) -> None:
        """(Under the lock.)  Ends older than the SLO window go."""
        while self._ended and self._ended[0][0] < now - self.slo_window_s:
            self._ended.popleft()

    # ----- readers (any thread but the engine's) -----
    def snapshot(self, seconds: float = DEFAULT_SECONDS) -> dict:
        now = time.time()
        since = now - seconds
        with self._lock:  # copies only: the engine's thread waits for nothing longer
            self._prune(now)
            done = []  # ended quanta no longer change: references suffice
            for q in reversed(self._done):  # newest first; ended in end order
                if q.end < since or len(done) >= MAX_ANSWER_QUANTA:
                    break
                done.append(q)
            running = [q.as_dict() for q in self._open.values()]
            live = [(x.id, x.kind, x.model, x.size, x.steps, x.arrival, x.deadline, x.status,
                     x.steps_done, x.gpus, x.started) for x in self._live.values()]
            ended = list(self._ended)
        done = [q.as_dict() for q in reversed(done)]
        svc = self.svc
        engine = getattr(svc, "engine", None)
        presets = list(svc.cfg.presets)

        # GPUs and workers
        gpus, down, restarts, hung = [], (), 0, svc.workers_hung()
        if engine is not None:
            cluster = engine.cluster
            down = tuple(engine.down_workers)
            restarts = getattr(engine.res, "restarts", 0)
            busy = {g: q for q in running for g in q["gpus"]}
            for g in range(cluster.num_gpus):
                q = busy.get(g)
                gpus.append({"id": g, "node": cluster.node(g),
                             "state": "down" if g in down else "busy" if q else "idle",
                             "model": q["model"] if q else None,
                             "requests": q["requests"] if q else []})
        seen, when = self._restarts
        if restarts != seen:
            when = now if restarts > seen else when
            self._restarts = (restarts, when)

        # queues, active requests
        queues = {k: {"waiting": 0, "oldest_wait_s": None, "paused": 0, "running": 0}
                  for k in ("image", "video")}
        active = []
        for (rid, kind, model, size, steps, arrival, deadline, status, steps_done, on,
             started) in live:
            qd = queues.setdefault(kind, {"waiting": 0, "oldest_wait_s": None, "paused": 0,
                                          "running": 0})
            if status == "waiting":
                qd["waiting"] += 1
                wait = max(0.0, now - arrival)
                qd["oldest_wait_s"] = max(qd["oldest_wait_s"] or 0.0, wait)
                continue
            qd["paused" if status == "paused" else "running"] += 1
            active.append({"id": rid, "job": rid.rpartition("-")[0], "kind": kind,
                           "model": model, "size": size, "status": status, "gpus": list(on),
                           "degree": len(on), "steps_done": steps_done, "steps_total": steps,
                           "arrival": arrival, "started": started, "deadline": deadline})
        order = {"running": 0, "finishing": 1, "paused": 2}
        active.sort(key=lambda a: (order.get(a["status"], 3), a["arrival"], a["id"]))

        # SLO attainment per model over the window
        slo = {m: {"met": 0, "missed": 0, "failed": 0, "cancelled": 0} for m in presets}
        for _, model, outcome in ended:
            slo.setdefault(model, {"met": 0, "missed": 0, "failed": 0, "cancelled": 0})
            slo[model][outcome] += 1
        for c in slo.values():
            counted = c["met"] + c["missed"] + c["failed"]
            c["attainment"] = c["met"] / counted if counted else None

        return {
            "object": "cluster", "now": now, "seconds": seconds,
            "engine": {"healthy": svc.healthy() if svc.started else False,
                       "draining": svc.draining, "error": svc.engine_error,
                       "policy": svc.cfg.policy, "time_scale": svc.cfg.time_scale,
                       "emulated": svc.cfg.emulate is not None},
            "models": [{"id": m, "kind": MODELS[m].kind.value} for m in presets],
            "gpus": gpus,
            "workers": {"total": len(gpus), "down": list(down), "replaced_total": restarts,
                        "last_replaced_at": self._restarts[1], "hung_total": hung},
            "quanta": done + sorted(running, key=lambda q: q["start"]),
            "queues": queues,
            "requests": active[:MAX_REQUESTS_SHOWN], "requests_total": len(active),
            "slo": {"window_s": self.slo_window_s, "models": slo},
        }


# ----- HTTP -----
_ERROR = {"application/json": {"schema": {"type": "object", "properties": {"error": {
    "type": "object", "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                     "param": {"type": ["string", "null"]},
                                     "code": {"type": ["string", "null"]}}}}}}}
_CLUSTER_SCHEMA = {"type": "object", "required": [
    "object", "now", "seconds", "engine", "models", "gpus", "workers", "quanta", "queues",
    "requests", "requests_total", "slo"], "properties": {
    "object": {"type": "string", "enum": ["cluster"]},
    "now": {"type": "number", "description": "Unix seconds; every time below is too"},
    "seconds": {"type": "number", "description": "the timeline's span (quanta that ended "
                                                 "earlier are left out)"},
    "engine": {"type": "object"},
    "models": {"type": "array", "items": {"type": "object"}},
    "gpus": {"type": "array", "items": {"type": "object", "description":
             "id, node, state (idle / busy / down), model and requests of its quantum"}},
    "workers": {"type": "object", "description": "total, down (being replaced), replaced_total, "
                                                 "last_replaced_at, hung_total"},
    "quanta": {"type": "array", "items": {"type": "object", "description":
               "gpus, requests, model, kind, steps, cfg_split, start, end (null: running), "
               "predicted_end, outcome (running / ok / lost / failed / cancelled)"}},
    "queues": {"type": "object", "description": "per kind: waiting (not started), "
                                                "oldest_wait_s, paused, running"},
    "requests": {"type": "array", "items": {"type": "object"}, "description":
                 "started requests not ended (running, finishing, paused), at most 200"},
    "requests_total": {"type": "integer"},
    "slo": {"type": "object", "description": "window_s, and per model met / missed / failed / "
                                             "cancelled and attainment = met / (met + missed + "
                                             "failed) over requests that ended in the window"}}}

_ASSETS = {"dashboard.js": "text/javascript; charset=utf-8",
           "dashboard.css": "text/css; charset=utf-8"}
# The page loads only its own files and talks only to this server.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache"}


def _static(name: str) -> bytes:
    return (resources.files("genserve.server") / "static" / name).read_bytes()


def dashboard_router(svc, keys) -> APIRouter:
    """`/dashboard` (public: the page, no data) and `/v1/cluster` (behind the API keys).  Adds
    the view's hook to the service: call before the service starts."""
    view = ClusterView(svc)
    svc.update_hooks.append(view.update)
    page = _static("dashboard.html")
    assets = {name: _static(name) for name in _ASSETS}
    router = APIRouter()
    router.view = view  # for tests

    @router.api_route(
        "/v1/cluster", methods=GET, summary="Live cluster state (the dashboard's data)",
        operation_id="get_cluster",
        responses={200: {"description": "GPU timeline, queues, running requests, SLO "
                                        "attainment, worker health",
                         "content": {"application/json": {"schema": _CLUSTER_SCHEMA}}},
                   400: {"description": "seconds out of range", "content": _ERROR},
                   **({401: {"description": "missing or unknown API key", "content": _ERROR}}
                      if keys.enabled else {})})
    async def cluster(request: Request, seconds: Annotated[int, Query(
            ge=10, le=HISTORY_S, description="the timeline's span")] = DEFAULT_SECONDS):
        keys.owner(request.headers.get("authorization", ""))
        # Built and encoded in a worker thread: the event loop only sends the bytes.
        body = await run_in_threadpool(lambda: json.dumps(view.snapshot(seconds)).encode())
        return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})

    @router.api_route(
        "/dashboard", methods=GET, summary="The live cluster page (HTML; its data: /v1/cluster)",
        operation_id="get_dashboard",
        response_class=Response,
        responses={200: {"description": "the page", "content": {"text/html": {}}}})
    async def dashboard():
        return Response(page, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

    @router.api_route("/dashboard/{name}", methods=GET, include_in_schema=False)
    async def asset(name: str):
        if name not in assets:
            raise ApiError(404, "no such file", "not_found")
        return Response(assets[name], media_type=_ASSETS[name], headers=_PAGE_HEADERS)

    return router
