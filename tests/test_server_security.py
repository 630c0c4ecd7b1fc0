"""The HTTP layer under hostile or unlucky clients (issue 13, parts 5 and 6): races answered with
JSON statuses (never a 500), file removal off the event loop, JSON errors for the unexpected and
for a server that stops under a blocking request, body size limits (413) and content types
(415), strict types (400 naming the field), API keys never stored (owners are keyed hashes,
keys compared in constant time), short ids in 404s, HEAD wherever GET.

Most tests need no engine: `create_app` over a service that is never started, with finished
videos put in its results directory by hand (`finished_video`), through FastAPI's TestClient or
uvicorn in a thread (`Uvicorn`, for concurrent calls and raw sockets).  Those that need jobs to
run (owners on disk, cancel vs finish) share one live server with API keys and one worker.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient

from genserve.request import Kind
from genserve.server.app import create_app
from genserve.server.config import ServeConfig
from genserve.server.service import Job, JobSpec
from genserve.spec import GenSpec

IMG, VID = "/v1/images/generations", "/v1/videos"
LIMIT_JSON, LIMIT_FORM = 4096, 16384  # small body limits for the engine-less apps


def assert_error(r, status: int, param: str | None = "<any>", code: str | None = None) -> dict:
    """An OpenAI-style JSON error body with this status (and param / code when given)."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param != "<any>":
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def finished_video(svc, data: bytes = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 64,
                   owner: str | None = None, created_at: float | None = None,
                   ttl: float = 3600.0) -> Job:
    """A completed video job with its file in the service's results directory (no engine)."""
    vid = "video_" + uuid.uuid4().hex
    now = time.time()
    job = Job(id=vid, spec=JobSpec(Kind.VIDEO, GenSpec("tiny-t2v", 32, 32, 9, 2, 5.0, 0,
                                                       prompt="p")),
              owner=owner, created_at=created_at or now, request_ids=[f"{vid}-0"],
              deadline=0.0, status="completed", completed_at=now, files=["video.mp4"],
              expires_at=now + ttl)
    job.steps_done = {f"{vid}-0": 2}
    (svc.results / vid).mkdir()
    (svc.results / vid / "video.mp4").write_bytes(data)
    svc.jobs[vid] = job
    return job


def engineless(tmp_path: Path, **kw):
    """An app whose service never starts (no workers): everything up to submit works."""
    cfg = ServeConfig(results_dir=str(tmp_path / "results"), max_body_bytes=LIMIT_JSON,
                      max_upload_bytes=LIMIT_FORM, **kw)
    return create_app(cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Uvicorn:
    """An app under uvicorn in a thread, on a free loopback port; `ready` says when it answers
    (the port accepts and, for a started service, /health is 200)."""

    def __init__(self, app, health: bool = False, **config):
        self.app, self.svc, self.health = app, app.state.service, health
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="critical", **config))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.thread.is_alive(), "the server thread died while starting"
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if not self.health or r.status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.__exit__()
        raise AssertionError("the server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def no_engine(monkeypatch, svc) -> None:
    """Let an engine-less app's lifespan run: nothing to start or stop."""
    monkeypatch.setattr(svc, "start", lambda: None)
    monkeypatch.setattr(svc, "stop", lambda: None)


@pytest.fixture
def app(tmp_path):
    return engineless(tmp_path)


@pytest.fixture
def client(app):
    return TestClient(app, raise_server_exceptions=False)  # no lifespan: never started


@pytest.fixture
def live(app, monkeypatch):
    no_engine(monkeypatch, app.state.service)
    with Uvicorn(app) as s:
        yield s


# ----------------------------------------------------------------------------- body size
def raw_request(port: int, head: bytes, chunks, timeout: float = 10.0) -> tuple[bytes, int]:
    """Send `head`, then the byte strings of `chunks` until the server answers (or they run
    out); (what it answered, body bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        answer = b""
        try:
            for chunk in chunks:
                s.settimeout(0)
                try:
                    answer += s.recv(65536)
                    break  # the server spoke (or closed) before the body was all sent
                except BlockingIOError:
                    pass
                s.settimeout(timeout)
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.settimeout(timeout)
        while not _complete(answer):
            try:
                more = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not more:
                break
            answer += more
    return answer, sent


def _complete(raw: bytes) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    m = re.search(rb"(?i)content-length: *(\d+)", head)
    return bool(sep) and m is not None and len(body) >= int(m.group(1))


def parse_answer(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body[:int(headers["content-length"])])


def test_declared_length_over_the_limit_is_413_before_the_body_is_read(live):
    """Content-Length says 300 MB, a few bytes come: the 413 comes at once (the server does not
    wait for, let alone hold, the rest)."""
    head = (f"POST {VID} HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            f"content-length: 300000000\r\n\r\n").encode()
    answer, _ = raw_request(live.port, head, [b'{"prompt": "a"'], timeout=10)
    status, headers, body = parse_answer(answer)
    assert status == 413, answer[:300]
    assert body["error"]["param"] == "body" and body["error"]["code"] == "request_too_large"
    assert headers.get("connection") == "close"  # the rest of the body is never read


def test_chunked_body_is_counted_while_read(live):
    """No Content-Length (chunked): the server answers 413 once the body passes the limit, with
    the body still coming (the client never ends it)."""
    head = (f"POST {IMG} HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            f"transfer-encoding: chunked\r\n\r\n").encode()
    piece = b" " * 1024
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    answer, sent = raw_request(live.port, head, (chunk for _ in range(4096)))  # 4 MiB at most
    status, _, body = parse_answer(answer)
    assert status == 413 and body["error"]["param"] == "body", answer[:300]
    assert sent < 1 << 20, sent  # answered long before the client would have stopped


@pytest.mark.parametrize("path", [IMG, VID])
def test_json_body_over_the_limit_is_413(client, path):
    body = json.dumps({"prompt": "a", "pad": "x" * LIMIT_JSON}).encode()
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert_error(r, 413, param="body", code="request_too_large")
    # at the limit it is read (and then refused for another reason: the engine is not running)
    r = client.post(path, content=b'{"prompt": "a"}'.ljust(LIMIT_JSON),
                    headers={"content-type": "application/json"})
    assert r.status_code != 413, r.text


def test_form_bodies_have_the_upload_limit(client):
    fields = {"prompt": (None, "a"), "steps": (None, "2")}
    bigger_than_json = {**fields, "input_reference": ("ref.png", b"x" * (LIMIT_JSON * 2))}
    r = client.post(VID, files=bigger_than_json)
    assert r.status_code != 413, r.text  # over the JSON limit, within the upload limit
    too_big = {**fields, "input_reference": ("ref.png", b"x" * LIMIT_FORM)}
    assert_error(client.post(VID, files=too_big), 413, param="body", code="request_too_large")


# ----------------------------------------------------------------------------- content types
@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "",
                                   "application/json; charset=latin-1",
                                   "application/jsonx", "text/json"])
def test_other_content_types_are_415_naming_content_type(client, ctype):
    headers = {"content-type": ctype} if ctype else {}
    r = client.post(IMG, content=b'{"prompt": "a", "steps": 1}', headers=headers)
    assert_error(r, 415, param="content-type", code="unsupported_media_type")


@pytest.mark.parametrize("ctype", ["application/json", "application/json; charset=utf-8",
                                   'Application/JSON; charset="UTF-8"'])
def test_json_content_types_are_read(client, ctype):
    r = client.post(IMG, content=b'{"prompt": "a", "steps": "x"}',
                    headers={"content-type": ctype})
    assert_error(r, 400, param="steps")  # parsed and validated


# ----------------------------------------------------------------------------- strict types
STRICT = [(IMG, "n", True), (IMG, "n", "2"), (IMG, "n", 2.0), (IMG, "seed", "5"),
          (IMG, "seed", False), (IMG, "steps", True), (IMG, "steps", "2"),
          (IMG, "guidance", True), (IMG, "guidance", "1.5"), (IMG, "slo_ms", "100"),
          (IMG, "slo_ms", True), (VID, "frames", "9"), (VID, "frames", True),
          (VID, "seconds", True), (VID, "steps", "2")]


@pytest.mark.parametrize("path,field,value", STRICT,
                         ids=[f"{p.rsplit('/', 1)[1]}-{f}-{v!r}" for p, f, v in STRICT])
def test_booleans_and_numeric_strings_are_not_numbers(client, path, field, value):
    r = client.post(path, json={"prompt": "a", field: value})
    err = assert_error(r, 400, param=field)
    assert err["message"].startswith(f"{field}: "), err


def test_form_numbers_are_text_and_still_parsed(client):
    """A multipart form carries only text (the openai client's `extra_body` fields come so):
    its numbers are parsed, and a bad one still names its field."""
    r = client.post(VID, files={"prompt": (None, "a"), "steps": (None, "2"),
                                "seconds": (None, "1")})
    assert_error(r, 503, code="engine_unavailable")  # valid: it reached submit
    r = client.post(VID, files={"prompt": (None, "a"), "steps": (None, "true")})
    assert_error(r, 400, param="steps")


# ----------------------------------------------------------------------------- API keys
def test_secret_is_made_once_private_and_kept(tmp_path):
    from genserve.server.auth import SECRET_FILE, Keys

    res = tmp_path / "results"
    a = engineless(tmp_path, api_keys=("k1",))
    secret = res / SECRET_FILE
    assert secret.exists() and (secret.stat().st_mode & 0o777) == 0o600
    first = secret.read_bytes()
    b = engineless(tmp_path, api_keys=("k1",))  # a restart on the same results directory
    assert secret.read_bytes() == first
    owners = [Keys(("k1",), res).owner("Bearer k1") for _ in range(2)]
    assert owners[0] == owners[1] and len(owners[0]) == 64 and "k1" not in owners[0]
    assert a is not b
    os.chmod(secret, 0o644)  # a copy with a lax umask: tightened again
    Keys(("k1",), res)
    assert (secret.stat().st_mode & 0o777) == 0o600


def test_keys_are_compared_in_constant_time(tmp_path, monkeypatch):
    """Every configured key is compared, matching or not, and only through compare_digest on
    equal-length HMACs (no `in`, no early exit)."""
    from genserve.server import auth
    from genserve.server.service import ApiError

    keys = auth.Keys(("first", "second-key", "k" * 100), tmp_path)
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for header, ok in (("Bearer first", True), ("Bearer " + "k" * 100, True),
                       ("Bearer nope", False), ("Bearer firs", False)):
        calls.clear()
        if ok:
            assert keys.owner(header)
        else:
            with pytest.raises(ApiError):
                keys.owner(header)
        assert len(calls) == 3 and all(a == b == 64 for a, b in calls), calls


KEY, OTHER = "sk-plain-KEY-7d1e4b", "sk-other-KEY-99a0c2"


@pytest.fixture(scope="module")
def keyed(forked_worker_pools, tmp_path_factory):
    cfg = ServeConfig(workers=1, api_keys=(KEY, OTHER),
                      results_dir=str(tmp_path_factory.mktemp("keyed")))
    with Uvicorn(create_app(cfg), health=True) as s:
        yield s


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def wait_final(c: httpx.Client, path: str, key: str = KEY, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        obj = c.get(path, headers=auth(key)).json()
        if obj["status"] in ("completed", "failed"):
            return obj
        assert time.monotonic() < deadline, obj
        time.sleep(0.05)


def test_api_keys_never_reach_the_disk(keyed):
    """Jobs of a key run to completion; no file under results_dir holds the key, and the job
    records its owner as the keyed hash."""
    with httpx.Client(base_url=keyed.url, timeout=60) as c:
        v = c.post(VID, json={"prompt": "mine", "steps": 2, "frames": 5, "size": "32x32"},
                   headers=auth())
        assert v.status_code == 200, v.text
        img = c.post(IMG, json={"prompt": "also mine", "steps": 1, "size": "32x32"},
                     headers=auth())
        assert img.status_code == 200, img.text
        assert wait_final(c, f"{VID}/{v.json()['id']}")["status"] == "completed"
        assert_error(c.get(f"{VID}/{v.json()['id']}", headers=auth(OTHER)), 404)
    svc = keyed.svc
    files = [p for p in Path(svc.cfg.results_dir).rglob("*") if p.is_file()]
    assert any(p.name == "video.mp4" for p in files), files
    for p in files:
        raw = p.read_bytes()
        for form in (KEY.encode(), KEY.encode("utf-16-le")):
            assert form not in raw, p
    job = svc.jobs[v.json()["id"]]
    assert job.owner != KEY and len(job.owner) == 64
