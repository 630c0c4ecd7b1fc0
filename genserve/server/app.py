"""The HTTP API (FastAPI): OpenAI-compatible images and videos, job progress and cancel, metrics.

Handlers never block the event loop: the service's calls are short and lock-protected, waiting for
a job is an asyncio event the engine thread sets (through `call_soon_threadsafe`), and file reads
go through a thread.  Errors use OpenAI's body, `{"error": {"message", "type", "param", "code"}}`.
Bodies: JSON or multipart only (415 otherwise), size-limited (413), see `transfer.py`; API keys
and owners: `auth.py` (a job's owner is a keyed hash of its key, never the key).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..catalog import MODELS
from ..request import Kind
from .auth import Keys
from .config import ServeConfig
from .schemas import ImageBody, VideoBody, parse, to_spec
from .service import ApiError, Job, Service
from .transfer import read_body


def _error(status: int, message: str, code: str, param: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}}, status_code=status, headers=headers)


class _Waiters:
    """Job id -> asyncio.Event set (in the loop) when the engine thread reports a change."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.events = loop, {}

    def __call__(self, job: Job) -> None:  # any thread
        try:
            self.loop.call_soon_threadsafe(self._fire, job.id)
        except RuntimeError:  # the loop is closed (shutting down): nobody waits any more
            pass

    def _fire(self, job_id: str) -> None:
        ev = self.events.pop(job_id, None)
        if ev is not None:
            ev.set()

    async def wait(self, job: Job, version: int, timeout: float) -> None:
        """Until the job's version moves past `version` (or `timeout` seconds)."""
        ev = self.events.setdefault(job.id, asyncio.Event())
        if job.version != version:
            return
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except asyncio.TimeoutError:
            pass


def video_object(svc: Service, job: Job) -> dict:
    s = job.spec.gen
    out = {"id": job.id, "object": "video", "model": s.model, "status": job.status,
           "progress": job.progress, "created_at": int(job.created_at),
           "completed_at": int(job.completed_at) if job.completed_at else None,
           "expires_at": int(job.expires_at) if job.expires_at else None,
           "size": f"{s.width}x{s.height}", "seconds": job.spec.seconds or "0", "prompt": s.prompt,
           "error": job.error, "remixed_from_video_id": None,
           # genserve extras
           "steps_done": sum(job.steps_done.values()), "steps_total": s.steps * len(job.request_ids),
           "queue_position": svc.queue_position(job),
           "estimated_finish_at": svc.estimated_finish(job), "best_effort": job.best_effort}
    return out


def job_object(svc: Service, job: Job) -> dict:
    out = video_object(svc, job)
    out["object"] = "job"
    out["kind"] = job.spec.kind.value
    out["n"] = len(job.request_ids)
    return out


def create_app(cfg: ServeConfig | None = None, service: Service | None = None) -> FastAPI:
    """The app; the service (worker processes, engine thread) starts in its lifespan."""
    svc = service or Service(cfg or ServeConfig())
    keys = Keys(svc.cfg.api_keys, svc.cfg.results_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.waiters = _Waiters(asyncio.get_running_loop())
        svc.add_listener(app.state.waiters)
        if not svc.started:
            await asyncio.to_thread(svc.start)
        yield
        await asyncio.to_thread(svc.stop)

    app = FastAPI(title="genserve", lifespan=lifespan)
    app.state.service = svc

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error(e.status, e.message, e.code, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(x) for x in err["loc"] if x != "body") or "body"
        return _error(400, f"{field}: {err['msg']}", "invalid_request_error", field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "not_found" if e.status_code == 404
                      else "http_error")

    def owner(request: Request) -> str | None:
        return keys.owner(request.headers.get("authorization", ""))

    async def admit(request: Request, schema, kind: Kind) -> tuple[Job, str | None]:
        """Authenticate, validate and submit a generation request (the key before the body: a
        client without one gets its 401 before it uploads anything)."""
        who = owner(request)
        data, strict = await read_body(request, svc.cfg.max_body_bytes,
                                       svc.cfg.max_upload_bytes)
        body = parse(schema, data, svc.cfg.max_prompt_chars, strict)
        spec, factor = to_spec(body, kind, svc.cfg.presets, svc.cfg.max_images, svc.cfg.fps)
        key = request.headers.get("idempotency-key")
        if key is not None and not (0 < len(key) <= 255 and key.isprintable()):
            raise ApiError(400, "Idempotency-Key: 1 to 255 printable characters",
                           "invalid_request_error", "Idempotency-Key")
        # In a thread: the job is written to the store (and synced) before the answer.
        return await asyncio.to_thread(svc.submit, spec, who, factor, key), who

    @app.post("/v1/images/generations")
    async def images(request: Request):
        job, who = await admit(request, ImageBody, Kind.IMAGE)
        while not job.final:
            if await request.is_disconnected():
                svc.cancel(job.id, who)  # nobody will read it
                return Response(status_code=499)
            await app.state.waiters.wait(job, job.version, 1.0)
        if job.status != "completed":
            code = (job.error or {}).get("code", "generation_failed")
            return _error(500 if code != "cancelled" else 409,
                          (job.error or {}).get("message", "failed"), code)
        kept = svc.take_images(job)  # from memory: never read back what was just written
        data = []
        for name in job.files:
            raw = kept.get(name) or await asyncio.to_thread(svc.result_path(job, name).read_bytes)
            data.append({"b64_json": base64.b64encode(raw).decode(), "revised_prompt": None})
        return {"created": int(job.created_at), "data": data, "id": job.id}

    @app.post("/v1/videos")
    async def create_video(request: Request):
        return video_object(svc, (await admit(request, VideoBody, Kind.VIDEO))[0])

    @app.get("/v1/videos")
    async def list_videos(request: Request, limit: int = 20, after: str | None = None,
                          order: str = "desc"):
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order={order!r}: 'asc' or 'desc'", "invalid_request_error",
                           "order")
        if not 1 <= limit <= 100:
            raise ApiError(400, f"limit={limit}: must be in [1, 100]", "invalid_request_error",
                           "limit")
        jobs = svc.list(owner(request), Kind.VIDEO)
        if order == "desc":
            jobs.reverse()
        if after is not None:
            ids = [j.id for j in jobs]
            if after not in ids:
                raise ApiError(400, f"after={after!r}: no such video in this list",
                               "invalid_request_error", "after")
            jobs = jobs[ids.index(after) + 1:]
        data = [video_object(svc, j) for j in jobs[:limit]]
        return {"object": "list", "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(jobs) > limit}

    def video_job(request: Request, video_id: str) -> tuple[Job, str | None]:
        who = owner(request)
        job = svc.get(video_id, who)
        if job.spec.kind is not Kind.VIDEO:
            raise ApiError(404, f"no video {video_id!r}", "not_found", "id")
        return job, who

    @app.get("/v1/videos/{video_id}")
    async def get_video(request: Request, video_id: str):
        return video_object(svc, video_job(request, video_id)[0])

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(request: Request, video_id: str, variant: str = "video"):
        job, _ = video_job(request, video_id)
        if variant != "video":
            raise ApiError(400, f"variant={variant!r}: only 'video' is available",
                           "invalid_request_error", "variant")
        if job.status != "completed":
            raise ApiError(409, f"video {video_id} is {job.status}, not completed",
                           "video_not_ready")
        return FileResponse(svc.result_path(job, "video.mp4"), media_type="video/mp4")

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(request: Request, video_id: str):
        job, who = video_job(request, video_id)
        svc.delete(job.id, who)  # a running video is cancelled (and stays visible, failed)
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    @app.get("/v1/jobs/{job_id}")
    async def get_job(request: Request, job_id: str):
        return job_object(svc, svc.get(job_id, owner(request)))

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(request: Request, job_id: str):
        return job_object(svc, svc.cancel(job_id, owner(request)))

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(request: Request, job_id: str):
        job = svc.get(job_id, owner(request))

        async def stream():
            last = None
            while True:
                version = job.version
                obj = job_object(svc, job)  # one snapshot decides both what is sent and the end
                if obj != last:
                    last = obj
                    yield f"data: {json.dumps(obj)}\n\n"
                if obj["status"] in ("completed", "failed") or await request.is_disconnected():
                    return
                await app.state.waiters.wait(job, version, 15.0)
                if job.version == version:
                    yield ": keep-alive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models")
    async def models(request: Request):
        owner(request)
        now = int(time.time())
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": now, "owned_by": "genserve",
             "kind": MODELS[m].kind.value} for m in svc.cfg.presets]}

    @app.get("/health")
    async def health():
        if svc.draining:
            return _error(503, "draining", "draining")
        if not svc.healthy():
            return _error(503, f"engine not running: {svc.engine_error or 'stopped'}",
                          "engine_unavailable")
        return {"status": "ok", "workers": svc.cfg.workers, "models": list(svc.cfg.presets)}

    @app.get("/metrics")
    async def metrics():
        return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
