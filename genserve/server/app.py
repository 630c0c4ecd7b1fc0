"""The HTTP API (FastAPI): OpenAI-compatible images and videos, job progress and cancel, metrics.

Handlers never block the event loop: reads of the service are short and lock-protected; what
changes jobs or touches files (submit, cancel, delete and its file removal, opening a result) runs
in a thread; waiting for a job is an asyncio event the engine thread sets (through
`call_soon_threadsafe`).  Every answer other than success is OpenAI's body, `{"error": {"message",
"type", "param", "code"}}`, unexpected exceptions included (a JSON 500, no stack trace).  Every GET
route also answers HEAD; a 405 names every method of its path in `Allow`.  Bodies: JSON or
multipart only (415 otherwise), size-limited (413), see `transfer.py`; API keys and owners:
`auth.py`; what `/openapi.json` says about each route (bodies, statuses): `openapi.py`.

Images with `response_format: "url"` are answered with links, `/v1/files/{request id}` on the
request's own base URL: readable with the owner's key only (404 for another key) until the job's
`expires_at` (404 after, whether or not the janitor removed the files yet).

Races, each answered by a JSON status, never a 500: content vs delete or expiry (the file is
opened before the answer, so it is either streamed whole or a 404), cancel vs finish (the state
the job is in; a video deleted before it ended is gone at once, however it then ends), list vs
expiry (a page's cursor that expired or was deleted in between still places the next page).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..catalog import MODELS
from ..request import Kind
from .auth import Keys
from .config import ServeConfig
from .openapi import BINARY, IDEMPOTENCY, JOB, VIDEO, errors, install, ok, request_body
from .dashboard import dashboard_router
from .schemas import (ImageBody, VideoBody, capabilities, parse, reference_bytes, take_reference,
                      to_spec)
from .service import ApiError, Job, Service, short
from .transfer import OpenFileResponse, open_regular, read_body, result_media_type


GET = ["GET", "HEAD"]
# A failed job's error code -> the status of the blocking answer that was waiting for it; the
# rest are 500s.  The two 503s say "try again": the server went away under the request.
FAILED_STATUS = {"cancelled": 409, "server_shutdown": 503, "server_restarted": 503}
def _error(status: int, message: str, code: str, param: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}}, status_code=status, headers=headers)


def _not_found(what: str, job_id: str) -> ApiError:
    return ApiError(404, f"no {what} {short(job_id)}", "not_found", "id")


class _Waiters:
    """Job id -> asyncio.Event set (in the loop) when the engine thread reports a change."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None):
        self.loop, self.events = loop, {}

    def __call__(self, job: Job) -> None:  # any thread
        if self.loop is None:  # no loop has waited yet: nobody to wake
            return
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
        self.loop = self.loop or asyncio.get_running_loop()
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


def file_id(job: Job, name: str) -> str:
    """The id of a result file in `/v1/files/{id}`: its request's id, `<job id>-<i>`."""
    return f"{job.id}-{0 if name == 'video.mp4' else name.partition('.')[0]}"


def result_name(job: Job, i: int) -> str | None:
    """The file of the job's i-th result (None: it has none)."""
    if not 0 <= i < len(job.request_ids):
        return None
    return "video.mp4" if job.spec.kind is Kind.VIDEO else f"{i}.png"


def job_object(svc: Service, job: Job) -> dict:
    out = video_object(svc, job)
    out["object"] = "job"
    out["kind"] = job.spec.kind.value
    out["n"] = len(job.request_ids)
    return out


class _Cursors:
    """Where each video a list page showed sorts (bounded: the newest kept), so that `after=` a
    video deleted or expired since that page still places the next one."""

    def __init__(self, size: int = 10_000):
        self.size, self.keys = size, OrderedDict()

    def shown(self, owner: str | None, jobs: list[Job]) -> None:
        for j in jobs:
            self.keys[j.id] = (owner, (j.created_at, j.id))
            self.keys.move_to_end(j.id)
        while len(self.keys) > self.size:
            self.keys.popitem(last=False)

    def key(self, owner: str | None, job_id: str) -> tuple | None:
        rec = self.keys.get(job_id)
        return rec[1] if rec is not None and rec[0] == owner else None


def create_app(cfg: ServeConfig | None = None, service: Service | None = None) -> FastAPI:
    """The app; the service (worker processes, engine thread) starts in its lifespan."""
    svc = service or Service(cfg or ServeConfig())
    keys = Keys(svc.cfg.api_keys, svc.cfg.results_dir)
    waiters, cursors = _Waiters(None), _Cursors()
    svc.add_listener(waiters)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        waiters.loop = asyncio.get_running_loop()
        if not svc.started:
            await asyncio.to_thread(svc.start)
        yield
        await asyncio.to_thread(svc.stop)

    app = FastAPI(title="genserve", lifespan=lifespan)
    install(app)
    app.state.service = svc
    app.state.waiters = waiters
    app.include_router(dashboard_router(svc, keys))  # /dashboard, /v1/cluster

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error(e.status, e.message, e.code, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        # The parameter's own name: loc starts with where it came from (query, path, body).
        where = ("body", "query", "path", "header")
        field = ".".join(str(x) for x in err["loc"] if x not in where) or "body"
        return _error(400, f"{field}: {err['msg']}", "invalid_request_error", field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        headers = getattr(e, "headers", None)
        if e.status_code == 405:  # every method of the path (starlette names one route's)
            headers = {**(headers or {}), "Allow": allowed(request)}
        return _error(e.status_code, str(e.detail), "not_found" if e.status_code == 404
                      else "http_error", headers=headers)

    def allowed(request: Request) -> str:
        """The methods the routes of this request's path take, whichever module added them."""
        path, methods = request.url.path, set()
        for route in app.router.routes:
            regex, ms = getattr(route, "path_regex", None), getattr(route, "methods", None)
            if regex is not None and ms and regex.match(path):
                methods |= set(ms)
        order = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
        return ", ".join(sorted(methods, key=lambda m: (order.index(m) if m in order else 9, m)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        # A bug: the server logs it (starlette re-raises it after this answer); the client gets
        # the API's error body, no trace.
        return _error(500, "internal server error", "internal_error")

    def owner(request: Request) -> str | None:
        return keys.owner(request.headers.get("authorization", ""))

    async def admit(request: Request, schema, kind: Kind) -> tuple[Job, str | None, object]:
        """Authenticate, validate and submit a generation request (the key before the body: a
        client without one gets its 401 before it uploads anything)."""
        who = owner(request)
        data, strict = await read_body(request, svc.cfg.max_body_bytes,
                                       svc.cfg.max_upload_bytes)
        ref = take_reference(data) if kind is Kind.VIDEO else None
        body = parse(schema, data, svc.cfg.max_prompt_chars, strict)
        if ref is None:
            spec, factor = to_spec(body, kind, svc.cfg.presets, svc.cfg.max_images, svc.cfg.fps)
        else:  # decoding and resizing the image: in a thread, off the event loop
            spec, factor = await run_in_threadpool(
                to_spec, body, kind, svc.cfg.presets, svc.cfg.max_images, svc.cfg.fps,
                reference_bytes(ref))
        key = request.headers.get("idempotency-key")
        if key is not None and not (0 < len(key) <= 255 and key.isprintable()):
            raise ApiError(400, "Idempotency-Key: 1 to 255 printable characters",
                           "invalid_request_error", "Idempotency-Key")
        # In a thread: the job is written to the store (and synced) before the answer.
        return await run_in_threadpool(svc.submit, spec, who, factor, key), who, body

    auth = (401,) if svc.cfg.api_keys else ()
    admission = (*auth, 400, 409, 413, 415, 429, 503) + ((422,) if svc.cfg.infeasible ==
                                                         "reject" else ())

    def generation(kind: Kind, ok: dict, *more: int) -> dict:
        extra = request_body(kind, svc.cfg)
        extra["parameters"] = [IDEMPOTENCY]
        return {"responses": {200: ok, **errors(*admission, *more)}, "openapi_extra": extra}

    image_item = {"type": "object", "properties": {
        "b64_json": {"type": "string", "description": "the PNG (response_format b64_json)"},
        "url": {"type": "string", "description": "GET it for the PNG (response_format url)"},
        "revised_prompt": {"type": "null"}}}
    images_ok = {"description": "the images (the request waits for them)", "content": {
        "application/json": {"schema": {
            "type": "object", "required": ["created", "data", "id", "expires_at"],
            "properties": {"created": {"type": "integer"}, "id": {"type": "string"},
                           "expires_at": {"type": "integer",
                                          "description": "unix time the results go"},
                           "data": {"type": "array", "items": image_item}}}}}}

    # 409: cancelled while the request waited; 500: the generation failed; 503: shutdown.
    @app.post("/v1/images/generations", **generation(Kind.IMAGE, images_ok, 500))
    async def images(request: Request):
        job, who, body = await admit(request, ImageBody, Kind.IMAGE)
        try:
            while not job.final:
                if await request.is_disconnected():
                    await run_in_threadpool(svc.cancel, job.id, who)  # nobody will read it
                    return Response(status_code=499)
                await waiters.wait(job, job.version, 1.0)
        except asyncio.CancelledError:
            # The server stops and its grace period for open requests is over (uvicorn cancels
            # them, then answers a plain-text 500 for those that did not answer): say so in the
            # API's terms.  The job itself is the service's to fail or keep at its stop.
            asyncio.current_task().uncancel()
            return _error(503, "the server stopped before this request finished; retry",
                          "server_shutdown", headers={"Retry-After": "30"})
        if job.status != "completed":
            err = job.error or {}
            code = err.get("code", "generation_failed")
            status = FAILED_STATUS.get(code, 500)
            return _error(status, err.get("message", "failed"), code,
                          headers={"Retry-After": "30"} if status == 503 else None)
        kept = svc.take_images(job)  # from memory: never read back what was just written
        data = []
        if body.response_format == "url":  # links to /v1/files, readable until the job expires
            data = [{"url": str(request.url_for("get_file", file_id=file_id(job, name))),
                     "revised_prompt": None} for name in job.files]
        for name in job.files if not data else ():
            raw = kept.get(name) or await asyncio.to_thread(svc.result_path(job, name).read_bytes)
            data.append({"b64_json": base64.b64encode(raw).decode(), "revised_prompt": None})
        return {"created": int(job.created_at), "data": data, "id": job.id,
                "expires_at": int(job.expires_at) if job.expires_at else None}

    @app.post("/v1/videos", **generation(Kind.VIDEO, ok("the video job, queued", VIDEO)))
    async def create_video(request: Request):
        return video_object(svc, (await admit(request, VideoBody, Kind.VIDEO))[0])

    video_list = {"type": "object", "properties": {
        "object": {"type": "string"}, "data": {"type": "array", "items": VIDEO},
        "first_id": {"type": ["string", "null"]}, "last_id": {"type": ["string", "null"]},
        "has_more": {"type": "boolean"}}}

    @app.api_route("/v1/videos", methods=GET, responses={
        200: ok("a page of the caller's videos", video_list), **errors(*auth, 400, 404)})
    async def list_videos(request: Request,
                          limit: Annotated[int, Query(ge=1, le=100)] = 20,
                          after: Annotated[str | None, Query(
                              description="the last id of the previous page (404: no such "
                                          "video)")] = None,
                          order: Literal["asc", "desc"] = "desc"):
        who = owner(request)
        jobs = svc.list(who, Kind.VIDEO)  # oldest first
        if after is not None:
            at = next(((j.created_at, j.id) for j in jobs if j.id == after), None)
            at = at or cursors.key(who, after)  # gone since the page that showed it
            if at is None:
                raise ApiError(404, f"after={short(after)}: no such video in this list",
                               "not_found", "after")
            jobs = [j for j in jobs if ((j.created_at, j.id) > at if order == "asc"
                                        else (j.created_at, j.id) < at)]
        if order == "desc":
            jobs.reverse()
        page = jobs[:limit]
        cursors.shown(who, page)
        data = [video_object(svc, j) for j in page]
        return {"object": "list", "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(jobs) > limit}

    def lookup(job_id: str, who: str | None, what: str = "job") -> Job:
        try:
            return svc.get(job_id, who)
        except ApiError as e:
            if e.status == 404:  # named as what was asked for (a video, a job)
                raise _not_found(what, job_id) from None
            raise

    def video_job(request: Request, video_id: str) -> tuple[Job, str | None]:
        who = owner(request)
        job = lookup(video_id, who, "video")
        if job.spec.kind is not Kind.VIDEO:
            raise _not_found("video", video_id)
        return job, who

    found = errors(*auth, 404)

    @app.api_route("/v1/videos/{video_id}", methods=GET,
                   responses={200: ok("the video job", VIDEO), **found})
    async def get_video(request: Request, video_id: str):
        return video_object(svc, video_job(request, video_id)[0])

    @app.api_route("/v1/videos/{video_id}/content", methods=GET, response_class=Response,
                   responses={200: ok("the MP4", BINARY, "video/mp4"),
                              206: ok("the byte range asked for (Range)", BINARY, "video/mp4"),
                              **errors(*auth, 400, 404, 409, 416)})
    async def video_content(request: Request, video_id: str,
                            variant: Literal["video"] = "video"):
        job, _ = video_job(request, video_id)
        if job.status != "completed":
            raise ApiError(409, f"video {short(video_id)} is {job.status}, not completed",
                           "video_not_ready")
        try:
            fh, st = await run_in_threadpool(open_regular, svc.result_path(job, "video.mp4"))
        except FileNotFoundError:  # deleted or expired since it was looked up
            raise _not_found("video", video_id) from None
        return OpenFileResponse(fh, st, "video/mp4")

    @app.api_route("/v1/files/{file_id}", methods=GET, name="get_file",
                   response_class=Response,
                   responses={200: {"description": "a result file (response_format url), "
                                                   "until its job's expires_at",
                                    "content": {"image/png": {"schema": BINARY},
                                                "video/mp4": {"schema": BINARY}}},
                              206: ok("the byte range asked for (Range)", BINARY, "image/png"),
                              **errors(*auth, 404, 416)})
    async def get_file(request: Request, file_id: str):
        """A result by its id (`<job id>-<i>`, as the answer's url names it): the owner's key
        only; 404 for anyone else, for a job not completed, and once the job expired."""
        job_id, _, index = file_id.rpartition("-")
        who = owner(request)  # 401 first
        try:
            job = svc.get(job_id, who) if job_id and index.isdigit() else None
        except ApiError:
            job = None
        name = result_name(job, int(index)) if job is not None and len(index) < 6 else None
        if name is None or job.status != "completed" or name not in job.files:
            raise _not_found("file", file_id)
        try:
            fh, st = await run_in_threadpool(open_regular, svc.result_path(job, name))
        except FileNotFoundError:  # deleted or expired since it was looked up
            raise _not_found("file", file_id) from None
        return OpenFileResponse(fh, st, result_media_type(name))

    deleted = {"type": "object", "properties": {"id": {"type": "string"},
                                                "object": {"type": "string"},
                                                "deleted": {"type": "boolean"}}}

    @app.delete("/v1/videos/{video_id}",
                responses={200: ok("deleted (one still running is cancelled, and gone from now on)",
                                   deleted), **found})
    async def delete_video(request: Request, video_id: str):
        job, who = video_job(request, video_id)
        # An ended video is forgotten, its files removed (in a thread: never on the event loop);
        # one not ended is cancelled and gone from now on (404), removed once it stops
        # (`Service.delete`).  DELETE /v1/jobs/{id} cancels and keeps it readable.
        await run_in_threadpool(svc.delete, job.id, who)
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    @app.api_route("/v1/jobs/{job_id}", methods=GET,
                   responses={200: ok("the job (an image request or a video)", JOB), **found})
    async def get_job(request: Request, job_id: str):
        return job_object(svc, lookup(job_id, owner(request)))

    @app.delete("/v1/jobs/{job_id}",
                responses={200: ok("the job once the cancel is asked for", JOB), **found})
    async def cancel_job(request: Request, job_id: str):
        who = owner(request)
        job = lookup(job_id, who)
        # The job as it is once the cancel is asked for: still running (it ends failed/cancelled
        # at its next step), or final, when it ended first (cancel vs finish).
        return job_object(svc, await run_in_threadpool(svc.cancel, job.id, who))

    @app.api_route("/v1/jobs/{job_id}/events", methods=GET, response_class=StreamingResponse,
                   responses={200: ok("server-sent events: `data: <job object>` at every "
                                      "change, until it ends", {"type": "string"},
                                      "text/event-stream"), **found})
    async def job_events(request: Request, job_id: str):
        job = lookup(job_id, owner(request))
        headers = {"Cache-Control": "no-cache"}
        if request.method == "HEAD":  # the headers of the stream, without waiting on the job
            return Response(media_type="text/event-stream", headers=headers)

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
                await waiters.wait(job, version, 15.0)
                if job.version == version:
                    yield ": keep-alive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    @app.api_route("/v1/models", methods=GET,
                   responses={200: ok("the served models and what each takes"),
                              **errors(*auth)})
    async def models(request: Request):
        owner(request)
        now = int(time.time())
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": now, "owned_by": "genserve",
             "kind": MODELS[m].kind.value, "capabilities": capabilities(m, svc.cfg)}
            for m in svc.cfg.presets]}

    @app.api_route("/health", methods=GET,
                   responses={200: ok("serving (status ok, or degraded: fewer workers)"),
                              **errors(503)})
    async def health():
        if svc.draining:
            return _error(503, "draining", "draining")
        if not svc.healthy():
            return _error(503, f"engine not running: {svc.engine_error or 'stopped'}",
                          "engine_unavailable")
        why = svc.degraded()  # still 200: it serves, with fewer workers for a while
        return {"status": "degraded" if why else "ok", "workers": svc.cfg.workers,
                "models": list(svc.cfg.presets), "workers_hung_total": svc.workers_hung(),
                **(why or {})}

    @app.api_route("/metrics", methods=GET, response_class=Response, responses={
        200: ok("Prometheus text exposition", {"type": "string"}, "text/plain")})
    async def metrics():
        return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
