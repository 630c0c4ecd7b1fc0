"""The HTTP API (`genserve serve`) against live servers: tiny presets on CPU worker processes.

One server per module (uvicorn in a thread, two workers) carries most tests; two smaller apps (one
worker each, through FastAPI's TestClient) cover API keys and admission/TTL.  Starting an app
spawns its workers and profiles them (~5 s each), hence the module-scoped fixtures.  The schema is
also checked property-based, straight on `parse`/`to_spec` (many examples, no server) and over
HTTP (fewer, cheap examples).  Hypothesis runs derandomized, without its example database.

Tests whose docstring says "Regression (4e6bc0b)" reproduced bugs of that commit (500s on odd
input, a lost final SSE event, a size the model cannot take, DELETE and list conformance), fixed
in 96b1877.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
av = pytest.importorskip("av")
Image = pytest.importorskip("PIL.Image")

from fastapi.testclient import TestClient

from genserve.catalog import MODELS
from genserve.request import Kind
from genserve.server.app import create_app
from genserve.server.config import ServeConfig
from genserve.server.schemas import ImageBody, VideoBody, parse, to_spec
from genserve.server.service import ApiError
from genserve.spec import GenSpec

from _serve import Uvicorn, assert_error

# The openai client marks the Sora (videos) API deprecated.
# Workers fork from the tests' fork server (tests/_spawn.py); test_engine_acceptance and the
# serve processes of test_server_drain keep the production spawn path covered.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.usefixtures("forked_worker_pools")]

PRESETS = ("tiny-t2i", "tiny-t2v")
FINAL = ("completed", "failed")
HYP = {"derandomize": True, "database": None, "deadline": None,
       "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much]}


# ----------------------------------------------------------------------------- live server
@pytest.fixture(scope="module")
def server(forked_worker_pools, tmp_path_factory):
    cfg = ServeConfig(workers=2, results_dir=str(tmp_path_factory.mktemp("res")))
    with Uvicorn(create_app(cfg), health=True) as s:
        yield s


def wait_final(get, job_id: str, timeout: float = 60.0, every: float = 0.05) -> list[dict]:
    """Poll `get(job_id)` (a dict) until final; every object seen, in order."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        obj = get(job_id)
        seen.append(obj)
        if obj["status"] in FINAL:
            return seen
        time.sleep(every)
    raise AssertionError(f"{job_id} not final after {timeout} s: {seen[-1] if seen else None}")


def getter(client, prefix: str = "/v1/videos/", **kw):
    def get(job_id: str) -> dict:
        r = client.get(prefix + job_id, **kw)
        assert r.status_code == 200, r.text
        return r.json()
    return get


def all_video_ids(client, **kw) -> list[str]:
    """Every video id GET /v1/videos lists, page by page."""
    ids, params = [], {"limit": 100}
    while True:
        page = client.get("/v1/videos", params=params, **kw).json()
        ids += [v["id"] for v in page["data"]]
        if not page["has_more"]:
            return ids
        params["after"] = page["last_id"]


def png_size(raw: bytes) -> tuple[int, int]:
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(raw)) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def mp4_frames(raw: bytes) -> list[tuple[int, int]]:
    """(width, height) of every decoded frame."""
    assert raw[4:8] == b"ftyp", raw[:16]
    with av.open(io.BytesIO(raw)) as box:
        return [(f.width, f.height) for f in box.decode(video=0)]


def metric_samples(text: str, name: str) -> list[tuple[dict, float]]:
    """([labels], value) of every sample of the metric `name` in a Prometheus text page."""
    out = []
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m:
            out.append((dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or "")),
                        float(m.group(2))))
    return out


def metric(text: str, name: str, **labels) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(v for ls, v in metric_samples(text, name)
               if all(ls.get(k) == want for k, want in labels.items()))


# ----------------------------------------------------------------------------- basics
def test_health_and_models(http, oai):
    h = http.get("/health")
    assert h.status_code == 200
    assert h.json() == {"status": "ok", "workers": 2, "models": list(PRESETS),
                        "workers_hung_total": 0}
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    assert {m["id"]: m["kind"] for m in body["data"]} == {"tiny-t2i": "image",
                                                          "tiny-t2v": "video"}
    assert {m.id for m in oai.models.list()} == set(PRESETS)
    caps = {m["id"]: m["capabilities"] for m in body["data"]}
    t2i, t2v = caps["tiny-t2i"], caps["tiny-t2v"]
    assert (t2i["default_size"], t2i["cfg"], t2i["negative_prompt"], t2i["image_input"]) == (
        "64x64", True, True, "none")
    assert t2i["sp_degrees"] == [1, 2] and t2i["cfg_split_gpus"] == [2]  # two workers here
    assert "frames" not in t2i and t2v["frames"] == {"default": 9, "max": 33, "rule": "4k+1"}
    assert t2v["fps"] == 16 and t2v["size_rule"]["multiple_of"] == 16


def test_capabilities_say_what_to_spec_accepts():
    """Every size `GET /v1/models` lists validates; FLUX takes no negative prompt, and a request
    with one is a 400 naming it."""
    from genserve.server.schemas import capabilities

    cfg = ServeConfig(presets=("tiny-t2i", "tiny-flux", "tiny-t2v"), workers=4)
    for m in cfg.presets:
        caps = capabilities(m, cfg)
        kind = MODELS[m].kind
        body_cls = ImageBody if kind is Kind.IMAGE else VideoBody
        for size in caps["sizes"]:
            to_spec(parse(body_cls, {"prompt": "p", "size": size}, 100), kind, cfg.presets, 4,
                    cfg.fps)
        assert caps["negative_prompt"] is MODELS[m].cfg
    assert capabilities("tiny-flux", cfg)["sp_degrees"] == [1, 2, 4]
    body = parse(ImageBody, {"prompt": "p", "model": "tiny-flux", "negative_prompt": "x"}, 100)
    with pytest.raises(ApiError) as e:
        to_spec(body, Kind.IMAGE, cfg.presets, 4, cfg.fps)
    assert e.value.param == "negative_prompt" and "guidance-distilled" in str(e.value)


def test_negative_prompt_steers_the_image(oai):
    """Same seed, with and without a negative prompt: the unconditional branch changes, so the
    image does; the same negative prompt again gives the same bytes."""
    def one(**extra) -> bytes:
        res = oai.images.generate(model="tiny-t2i", prompt="a cat", size="32x32",
                                  response_format="b64_json",
                                  extra_body={"steps": 2, "seed": 5, **extra})
        return base64.b64decode(res.data[0].b64_json)

    plain, neg = one(), one(negative_prompt="blurry, dark")
    assert plain != neg
    assert one(negative_prompt="blurry, dark") == neg


# ----------------------------------------------------------------------------- openai: images
def test_openai_images_generate_png_of_requested_size(oai):
    res = oai.images.generate(model="tiny-t2i", prompt="a red square", size="64x32",
                              response_format="b64_json", extra_body={"steps": 2, "seed": 1})
    assert len(res.data) == 1
    assert png_size(base64.b64decode(res.data[0].b64_json)) == (64, 32)  # WIDTHxHEIGHT

    res = oai.images.generate(model="tiny-t2i", prompt="two of them", n=2, size="48x48",
                              response_format="b64_json", extra_body={"steps": 2, "seed": 3})
    raws = [base64.b64decode(d.b64_json) for d in res.data]
    assert len(raws) == 2 and all(png_size(r) == (48, 48) for r in raws)
    assert raws[0] != raws[1]  # seed, seed + 1


def test_openai_images_same_seed_same_bytes(oai):
    def one(seed: int) -> bytes:
        res = oai.images.generate(model="tiny-t2i", prompt="a cat", size="32x32",
                                  response_format="b64_json",
                                  extra_body={"steps": 3, "seed": seed})
        return base64.b64decode(res.data[0].b64_json)

    a, b, c = one(11), one(11), one(12)
    assert a == b
    assert a != c


def test_image_default_size_and_job_object(http):
    r = http.post("/v1/images/generations", json={"prompt": "defaults", "steps": 1, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["data"]) == 2
    assert all(png_size(base64.b64decode(d["b64_json"])) == (64, 64) for d in body["data"])
    job = http.get(f"/v1/jobs/{body['id']}").json()
    assert (job["object"], job["kind"], job["n"], job["status"], job["progress"]) == (
        "job", "image", 2, "completed", 100)
    assert job["steps_done"] == job["steps_total"] == 2
    # an image job is not a video
    assert_error(http.get(f"/v1/videos/{body['id']}"), 404, code="not_found")


# ----------------------------------------------------------------------------- openai: videos
def test_openai_video_lifecycle(oai, http):
    v = oai.videos.create(model="tiny-t2v", prompt="a wave", size="32x32", seconds="1",
                          extra_body={"steps": 3, "seed": 5})
    assert v.object == "video" and v.id.startswith("video_")
    assert v.status in ("queued", "in_progress")
    assert (v.model, v.size, v.seconds) == ("tiny-t2v", "32x32", "1")

    deadline = time.monotonic() + 60
    while v.status not in FINAL:
        assert time.monotonic() < deadline, v
        time.sleep(0.05)
        v = oai.videos.retrieve(v.id)
    assert v.status == "completed", v.error
    assert v.progress == 100 and v.completed_at and v.expires_at > v.completed_at
    assert v.error is None

    raw = oai.videos.download_content(v.id).content
    frames = mp4_frames(raw)
    assert len(frames) == 17  # 1 s at 16 fps, 4k+1
    assert set(frames) == {(32, 32)}
    # the steps of extra_body reached the server through the multipart form
    assert http.get(f"/v1/jobs/{v.id}").json()["steps_total"] == 3

    assert v.id in [x.id for x in oai.videos.list().data]
    d = oai.videos.delete(v.id)
    assert d.deleted is True and d.id == v.id


def test_openai_errors_are_typed(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.videos.retrieve("video_nope")
    assert e.value.code == "not_found"
    with pytest.raises(openai.BadRequestError) as e:
        oai.videos.create(model="tiny-t2v", prompt="x", size="33x32")
    assert e.value.param == "size"
    with pytest.raises(openai.BadRequestError) as e:
        oai.images.generate(model="tiny-t2i", prompt="x", size="64x64", n=9)
    assert e.value.param == "n"


# ----------------------------------------------------------------------------- progress
def test_video_progress_is_monotonic(http):
    r = http.post("/v1/videos", json={"prompt": "slow", "steps": 400, "size": "64x64",
                                      "frames": 9})
    assert r.status_code == 200, r.text
    v = r.json()
    assert v["status"] in ("queued", "in_progress")
    assert (v["steps_total"], v["seconds"], v["size"]) == (400, "0.5", "64x64")
    seen = [v] + wait_final(getter(http), v["id"], every=0.02)
    for o in seen:
        assert 0 <= o["progress"] <= 100
        assert 0 <= o["steps_done"] <= o["steps_total"] == 400
        # queue_position: an int while queued, None once it runs
        if o["status"] == "queued":
            assert isinstance(o["queue_position"], int) and o["queue_position"] >= 0
        else:
            assert o["queue_position"] is None
        if not o["status"] in FINAL:
            assert o["estimated_finish_at"] >= o["created_at"]
    progress = [o["progress"] for o in seen]
    steps = [o["steps_done"] for o in seen]
    assert progress == sorted(progress) and steps == sorted(steps)
    assert len({p for p in progress if 0 < p < 100}) >= 3, progress  # seen moving
    assert seen[-1]["status"] == "completed" and seen[-1]["progress"] == 100
    assert seen[-1]["steps_done"] == 400


def test_queue_position_while_workers_are_busy(http):
    """Four big videos on two workers: the later ones wait with queue positions 0, 1, ..."""
    ids = []
    for i in range(4):
        r = http.post("/v1/videos", json={"prompt": f"q{i}", "steps": 150, "size": "128x128",
                                          "frames": 33})
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    positions = {}
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not positions:
            # one GET per video is no snapshot: take the middle of three passes when the first
            # and the last saw the same statuses (a status only moves forward, so none changed
            # while the middle one read them; two passes are not enough: a video that started
            # after its own read in the second pass was still counted ahead by the later ones)
            first, objs, last = ([http.get(f"/v1/videos/{i}").json() for i in ids]
                                 for _ in range(3))
            queued = [o for o in objs if o["status"] == "queued"]
            if ([o["status"] for o in first] == [o["status"] for o in last]
                    and queued and len(queued) < len(objs)):
                positions = {o["id"]: o["queue_position"] for o in queued}
            time.sleep(0.02)
        assert positions, "never saw a video waiting while another ran"
        order = [i for i in ids if i in positions]  # creation order
        assert [positions[i] for i in order] == list(range(len(order)))
    finally:
        for i in ids:
            http.delete(f"/v1/jobs/{i}")
        for i in ids:
            wait_final(getter(http), i)


def test_video_content_before_completion_is_409(http):
    r = http.post("/v1/videos", json={"prompt": "not yet", "steps": 1000, "size": "64x64",
                                      "frames": 9})
    vid = r.json()["id"]
    try:
        assert_error(http.get(f"/v1/videos/{vid}/content"), 409, code="video_not_ready")
    finally:
        http.delete(f"/v1/jobs/{vid}")
    assert wait_final(getter(http), vid)[-1]["status"] == "failed"
    assert_error(http.get(f"/v1/videos/{vid}/content"), 409, code="video_not_ready")


# ----------------------------------------------------------------------------- cancel
def test_cancel_a_running_video_others_complete(http):
    long = http.post("/v1/videos", json={"prompt": "long", "steps": 1000, "size": "128x128",
                                         "frames": 33}).json()
    get = getter(http)
    deadline = time.monotonic() + 30
    while get(long["id"])["steps_done"] < 3:  # running for real
        assert time.monotonic() < deadline
        time.sleep(0.02)

    other = http.post("/v1/videos", json={"prompt": "short", "steps": 30}).json()
    image: dict = {}

    def images():
        with httpx.Client(base_url=str(http.base_url), timeout=120) as c:
            image["r"] = c.post("/v1/images/generations", json={"prompt": "img", "steps": 4})

    t = threading.Thread(target=images)
    t.start()

    d = http.delete(f"/v1/jobs/{long['id']}")  # cancel; the video stays readable
    assert d.status_code == 200 and d.json()["id"] == long["id"] and d.json()["object"] == "job"
    end = wait_final(get, long["id"], timeout=30)[-1]
    assert end["status"] == "failed"
    assert end["error"]["code"] == "cancelled"
    assert end["progress"] < 100 and end["steps_done"] < 1000
    first = get(long["id"])
    time.sleep(0.5)
    second = get(long["id"])
    assert (first["steps_done"], first["progress"], first["status"]) == (
        second["steps_done"], second["progress"], "failed")

    assert wait_final(get, other["id"])[-1]["status"] == "completed"
    t.join(120)
    assert image["r"].status_code == 200 and len(image["r"].json()["data"]) == 1
    # a second cancel of a finished job changes nothing
    again = http.delete(f"/v1/jobs/{long['id']}")
    assert again.status_code == 200 and again.json()["status"] == "failed"


def test_cancel_a_queued_video(http):
    ids = [http.post("/v1/videos", json={"prompt": f"c{i}", "steps": 500, "size": "128x128",
                                         "frames": 33}).json()["id"] for i in range(4)]
    for i in reversed(ids):  # the last ones are likely still waiting
        assert http.delete(f"/v1/jobs/{i}").json()["object"] == "job"
    for i in ids:
        end = wait_final(getter(http), i, timeout=30)[-1]
        assert end["status"] == "failed" and end["error"]["code"] == "cancelled"


def test_cancel_an_image_job_answers_its_waiting_request_409(http, server):
    before = set(server.svc.jobs)
    answer: dict = {}

    def images():
        with httpx.Client(base_url=server.url, timeout=120) as c:
            answer["r"] = c.post(IMG, json={"prompt": "slow", "steps": 1000, "n": 2})

    t = threading.Thread(target=images)
    t.start()
    deadline = time.monotonic() + 30
    while not (new := [j for j in set(server.svc.jobs) - before if j.startswith("img_")]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    job = http.delete(f"/v1/jobs/{new[0]}").json()
    assert (job["object"], job["kind"], job["n"]) == ("job", "image", 2)
    t.join(60)
    assert_error(answer["r"], 409, code="cancelled")
    end = http.get(f"/v1/jobs/{new[0]}").json()
    assert end["status"] == "failed" and end["error"]["code"] == "cancelled"


# ----------------------------------------------------------------------------- SSE
def sse_events(client: httpx.Client, job_id: str, on_event=None) -> list[dict]:
    """Every `data:` event of /v1/jobs/{id}/events until the server closes the stream."""
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events",
                       timeout=httpx.Timeout(30, read=30)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
                if on_event is not None:
                    on_event(events[-1])
            else:
                assert line == "" or line.startswith(":"), line
    return events


def test_sse_streams_progress_until_completed(http):
    vid = http.post("/v1/videos", json={"prompt": "sse", "steps": 200, "size": "64x64",
                                        "frames": 9}).json()["id"]
    events = sse_events(http, vid)
    assert events, "no events"
    assert all(e["id"] == vid and e["object"] == "job" and e["kind"] == "video" for e in events)
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress)
    assert [e["status"] for e in events].count("completed") == 1
    assert events[-1]["status"] == "completed" and events[-1]["progress"] == 100
    assert len(events) >= 3
    # a finished job: one event, then the stream ends
    again = sse_events(http, vid)
    assert len(again) == 1 and again[0]["status"] == "completed"


def test_sse_ends_with_failed_when_cancelled(http):
    vid = http.post("/v1/videos", json={"prompt": "sse cancel", "steps": 1000, "size": "64x64",
                                        "frames": 9}).json()["id"]
    sent = []

    def cancel_once_running(e):
        if e["steps_done"] > 0 and not sent:
            sent.append(http.delete(f"/v1/jobs/{vid}"))

    with httpx.Client(base_url=str(http.base_url)) as c:
        events = sse_events(c, vid, cancel_once_running)
    assert sent and sent[0].status_code == 200, [(e["status"], e["steps_done"]) for e in events]
    assert events[-1]["status"] == "failed", [(e["status"], e["steps_done"]) for e in events]
    assert events[-1]["error"]["code"] == "cancelled"


def test_sse_final_event_is_never_lost(tmp_path, monkeypatch):
    """Regression (4e6bc0b): the generator read job.version, yielded, then returned on job.final,
    so a job that turned final while an event was on its way (status is set before _changed
    bumps the version) ended the stream without its final event.  Deterministic replay: the
    writer thread completes the job while the generator builds an in-progress event."""
    import genserve.server.app as app_mod
    from genserve.server.service import Job, JobSpec

    app = create_app(ServeConfig(results_dir=str(tmp_path)))  # not started: no engine needed
    svc = app.state.service
    job = Job(id="video_race", spec=JobSpec(Kind.VIDEO, GenSpec("tiny-t2v", 32, 32, 9, 8, 5.0, 0, prompt="p")),
              owner=None, created_at=time.time(), request_ids=["video_race-0"], deadline=0.0,
              status="in_progress")
    svc.jobs[job.id] = job

    def snapshot_then_complete(svc_, job_):
        out = {"id": job_.id, "status": job_.status}
        if job_.status == "in_progress":  # what Service._write does, from its own thread
            job_.status, job_.completed_at = "completed", time.time()
            job_.version += 1
        return out

    monkeypatch.setattr(app_mod, "job_object", snapshot_then_complete)
    app.state.waiters = app_mod._Waiters(None)  # what the lifespan sets; never fired here
    client = TestClient(app)  # no lifespan
    with client.stream("GET", f"/v1/jobs/{job.id}/events") as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["status"] for e in events][-1] == "completed", events


def test_sse_unknown_job_is_404(http):
    assert_error(http.get("/v1/jobs/nope/events"), 404, code="not_found")


# ----------------------------------------------------------------------------- validation
IMG, VID = "/v1/images/generations", "/v1/videos"
BAD_FIELDS = [
    (IMG, {"size": "65x64"}, "size"),
    (IMG, {"size": "abc"}, "size"),
    (IMG, {"size": "8x8"}, "size"),
    (IMG, {"size": "1024x1024"}, "size"),
    (IMG, {"size": 64}, "size"),
    (IMG, {"n": 0}, "n"),
    (IMG, {"n": 100}, "n"),
    (IMG, {"n": "two"}, "n"),
    (IMG, {"steps": 0}, "steps"),
    (IMG, {"steps": 5000}, "steps"),
    (IMG, {"steps": 2.5}, "steps"),
    (IMG, {"model": "nope"}, "model"),
    (IMG, {"model": "tiny-t2v"}, "model"),  # a video model on the image endpoint
    (IMG, {"model": 3}, "model"),
    (IMG, {"prompt": ""}, "prompt"),
    (IMG, {"prompt": None}, "prompt"),
    (IMG, {"prompt": ["a"]}, "prompt"),
    (IMG, {"prompt": "p" * 2001}, "prompt"),
    (IMG, {"response_format": "png"}, "response_format"),
    (IMG, {"guidance": "nan"}, "guidance"),
    (IMG, {"guidance": -1}, "guidance"),
    (IMG, {"guidance": 51}, "guidance"),
    (IMG, {"seed": -1}, "seed"),
    (IMG, {"seed": 2**31}, "seed"),
    (IMG, {"slo_ms": 0}, "slo_ms"),
    (IMG, {"slo_ms": "inf"}, "slo_ms"),
    (IMG, {"priority": "urgent"}, "priority"),
    (VID, {"seconds": "-1"}, "seconds"),
    (VID, {"seconds": "0"}, "seconds"),
    (VID, {"seconds": "abc"}, "seconds"),
    (VID, {"seconds": "nan"}, "seconds"),
    (VID, {"seconds": "10"}, "seconds"),  # 161 frames > 33
    (VID, {"seconds": [1]}, "seconds"),  # regression: was 'seconds.str'
    (IMG, {"size": "²x64"}, "size"),  # regression: str.isdigit() + int(): 500
    (IMG, {"size": "64x64x64"}, "size"),
    (VID, {"frames": 10}, "frames"),
    (VID, {"frames": 37}, "frames"),
    (VID, {"frames": 0}, "frames"),
    (VID, {"frames": 9, "seconds": "1"}, "seconds"),
    (VID, {"size": "33x32"}, "size"),
    (VID, {"size": "32x600"}, "size"),
    (VID, {"model": "tiny-t2i"}, "model"),
    (VID, {"steps": 1001}, "steps"),
    (VID, {"prompt": ""}, "prompt"),
    (IMG, {"negative_prompt": 3}, "negative_prompt"),
    (IMG, {"negative_prompt": "blurry", "guidance": 1.0}, "negative_prompt"),  # no CFG: no effect
    (VID, {"negative_prompt": "x" * 2001}, "negative_prompt"),
]


@pytest.mark.parametrize("path,fields,param", BAD_FIELDS,
                         ids=[f"{p.rsplit('/', 1)[1]}-{json.dumps(f)[:40]}"
                              for p, f, _ in BAD_FIELDS])
def test_bad_field_is_400_naming_it(http, path, fields, param):
    body = {"prompt": "ok", "steps": 1, **fields}
    assert_error(http.post(path, json=body), 400, param=param)


@pytest.mark.parametrize("path", [IMG, VID])
def test_missing_prompt_is_400(http, path):
    assert_error(http.post(path, json={"steps": 1}), 400, param="prompt")


@pytest.mark.parametrize("path", [IMG, VID])
@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"', b"null", b"", b"\xff\xfe",
                                 b'{"prompt": "a",}',
                                 b"[" * 100_000],  # regression: RecursionError, 500
                         ids=["malformed", "list", "string", "null", "empty", "not-utf8",
                              "trailing-comma", "deeply-nested"])
def test_body_not_a_json_object_is_400(http, path, raw):
    r = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, param=None, code="invalid_request_error")


def form(**fields) -> dict:
    """Text fields as multipart parts (httpx sends `data=` alone urlencoded: a 415 now)."""
    return {k: (None, v) for k, v in fields.items()}


def test_form_body_is_validated_like_json(http):
    assert_error(http.post(VID, files=form(prompt="f", seconds="-1")), 400, param="seconds")
    assert_error(http.post(VID, files=form(prompt="f", steps="many")), 400, param="steps")
    r = http.post(VID, content=b"garbage",
                  headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert_error(r, 400, code="invalid_request_error")
    r = http.post(VID, files=form(prompt="form ok", steps="2", seconds="0.25"))
    assert r.status_code == 200, r.text
    assert (r.json()["steps_total"], r.json()["seconds"]) == (2, "0.25")
    assert wait_final(getter(http), r.json()["id"])[-1]["status"] == "completed"


def test_unknown_ids_are_404_with_openai_body(http):
    for r in (http.get("/v1/videos/video_nope"), http.get("/v1/videos/video_nope/content"),
              http.delete("/v1/videos/video_nope"), http.get("/v1/jobs/nope"),
              http.delete("/v1/jobs/nope")):
        assert_error(r, 404, param="id", code="not_found")
    assert_error(http.get("/v1/nothing-here"), 404, code="not_found")


def test_unknown_content_variant_is_400(http, finished_video):
    r = http.get(f"/v1/videos/{finished_video['id']}/content", params={"variant": "thumbnail"})
    assert_error(r, 400, param="variant")


def test_infeasible_slo_runs_best_effort_by_default(http):
    r = http.post(VID, json={"prompt": "hurry", "steps": 2, "slo_ms": 1})
    assert r.status_code == 200, r.text
    assert r.json()["best_effort"] is True
    assert wait_final(getter(http), r.json()["id"])[-1]["status"] == "completed"


# ----------------------------------------------------------------------------- regressions
@pytest.fixture
def fresh(server):
    """A client of its own: after an unhandled exception (a 500) uvicorn may drop the keep-alive
    connection, which must not leak into the next test's requests."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_null_n_is_not_a_500(fresh):
    """Regression (4e6bc0b): n=null passed ImageBody (int | None) and to_spec compared
    None > max_images: TypeError, 500."""
    r = fresh.post(IMG, json={"prompt": "a", "steps": 1, "n": None})
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["param"] == "n"


def test_huge_integer_seconds_is_400(fresh):
    """Regression (4e6bc0b): float() of a 400-digit JSON integer raised OverflowError: 500."""
    r = fresh.post(VID, content=b'{"prompt": "a", "steps": 1, "seconds": 1' + b"0" * 400 + b"}",
                   headers={"content-type": "application/json"})
    assert_error(r, 400, param="seconds")


def test_every_image_size_that_validates_generates(fresh):
    """Regression (4e6bc0b): the catalog let tiny-t2i take sides up to 512, but the tiny SD3
    transformer's pos_embed_max_size (96 patches) caps it at 384 px, so 512x512 passed
    validation and failed in the worker: 500 generation_failed."""
    r = fresh.post(IMG, json={"prompt": "big", "steps": 1, "size": "512x512"})
    assert r.status_code in (200, 400), r.text  # generated, or refused naming the size
    if r.status_code == 400:
        assert r.json()["error"]["param"] == "size"


def test_deleted_video_is_gone(fresh):
    """Regression (4e6bc0b): DELETE /v1/videos/{id} only cancelled; a completed video stayed
    listed, retrievable and downloadable although the answer said deleted: true."""
    vid = fresh.post(VID, json={"prompt": "delete me", "steps": 1}).json()["id"]
    assert wait_final(getter(fresh), vid)[-1]["status"] == "completed"
    assert fresh.delete(f"/v1/videos/{vid}").json()["deleted"] is True
    assert_error(fresh.get(f"/v1/videos/{vid}"), 404)


def test_deleting_a_running_video_makes_it_gone_at_once(fresh, server):
    """DELETE /v1/videos/{id} of a video still running answered `deleted: true` but left it
    readable (failed, cancelled) until its TTL, which a client (and schemathesis' use-after-free
    check) takes for a delete that did not happen.  It is cancelled and gone at once now: 404,
    off the list, expired as it stops and removed by the janitor, files and record."""
    vid = fresh.post(VID, json={"prompt": "delete me running", "steps": 1000, "size": "64x64",
                                "frames": 9}).json()["id"]
    deadline = time.monotonic() + 30
    while fresh.get(f"/v1/videos/{vid}").json()["steps_done"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    d = fresh.delete(f"/v1/videos/{vid}")
    assert d.status_code == 200 and d.json() == {"id": vid, "object": "video.deleted",
                                                 "deleted": True}
    for path in (f"/v1/videos/{vid}", f"/v1/jobs/{vid}", f"/v1/videos/{vid}/content"):
        assert_error(fresh.get(path), 404)
    assert_error(fresh.delete(f"/v1/videos/{vid}"), 404)
    assert vid not in [v["id"] for v in fresh.get("/v1/videos").json()["data"]]
    svc = server.svc
    while not svc.jobs[vid].final:  # it stops at its next step
        assert time.monotonic() < deadline
        time.sleep(0.02)
    svc.expire()
    assert vid not in svc.jobs and not (svc.results / vid).exists()


def test_video_list_pages(fresh):
    """Regression (4e6bc0b): GET /v1/videos?limit=N gave the N newest oldest-first with
    has_more: false even when more existed, and ignored `after`: no way to page."""
    made = [fresh.post(VID, json={"prompt": f"page {i}", "steps": 1}).json()["id"]
            for i in range(3)]
    page = fresh.get("/v1/videos", params={"limit": 2}).json()
    assert [v["id"] for v in page["data"]] == made[::-1][:2]  # newest first
    assert page["has_more"] is True and page["last_id"] == made[1]
    rest = fresh.get("/v1/videos", params={"limit": 2, "after": page["last_id"]}).json()
    assert rest["data"][0]["id"] == made[0]
    for i in made:
        wait_final(getter(fresh), i)


# ----------------------------------------------------------------------------- property-based
_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
            | st.text(max_size=8))
_json = st.recursive(_scalars, lambda ch: st.lists(ch, max_size=3)
                     | st.dictionaries(st.text(max_size=4), ch, max_size=3), max_leaves=6)
_sizes = (st.sampled_from(["64x64", "32x32", "16x16", "48x64", "auto", "65x64", "0x0", "x",
                           "64x", "64X64", "abc", "", "1024x1024", "²x64", "٦٤x٦٤", " 64x64"])
          | st.builds("{}x{}".format, st.integers(0, 600), st.integers(0, 600))
          | st.text(max_size=10) | _json)
_FIELDS = {
    "model": st.sampled_from(["tiny-t2i", "tiny-t2v", "tiny-flux", "sd3-medium", "nope", ""])
    | _json,
    "prompt": st.sampled_from(["a cat", "", " ", "p" * 2000, "p" * 2001]) | st.text(max_size=20)
    | _json,
    "size": _sizes,
    "n": st.integers(-2, 8) | _json,
    "steps": st.integers(-2, 1100) | st.sampled_from(["4", "4.0", 4.0, 4.5, True]) | _json,
    "seed": st.integers(-5, 2**32) | _json,
    "guidance": st.floats() | st.sampled_from(["nan", "inf", "1.5", 7]) | _json,
    "slo_ms": st.floats() | st.integers(-1, 10**12) | _json,
    "priority": st.sampled_from(["high", "normal", "low", "urgent"]) | _json,
    "response_format": st.sampled_from(["b64_json", "url", "png"]) | _json,
    "seconds": st.sampled_from(["1", "2", "0.5", "4", "-1", "0", "nan", "inf", "1e400", "abc",
                                "0.0001", "3600", "3601", " 1 ", 10**400, -(10**400)])
    | st.integers() | st.floats() | _json,
    "frames": st.integers(-1, 100) | st.sampled_from([9, 17, 33, "9", 9.0]) | _json,
}
_KINDS = {Kind.IMAGE: ImageBody, Kind.VIDEO: VideoBody}


def _valid_fields(kind: Kind) -> dict:
    """Values every field accepts (for the tiny presets), so that a body made of them and a few
    arbitrary ones reaches the checks behind the first field too."""
    side = st.integers(4, 128).map(lambda k: 4 * k)  # multiples of 4 in [16, 512]
    common = {
        "model": st.sampled_from(["tiny-t2i" if kind is Kind.IMAGE else "tiny-t2v"]),
        "size": st.builds("{}x{}".format, side, side) | st.just("auto"),
        "steps": st.integers(1, 1000),
        "seed": st.integers(0, 2**31 - 1),
        "guidance": st.floats(0, 50),
        "slo_ms": st.floats(1e-3, 86_400_000),
        "priority": st.sampled_from(["high", "normal", "low"]),
    }
    if kind is Kind.IMAGE:
        return {**common, "n": st.integers(1, 4), "response_format": st.just("b64_json")}
    return {**common, "frames": st.sampled_from([1, 5, 9, 13, 17, 21, 25, 29, 33])}


@st.composite
def _bodies(draw, kind: Kind):
    """Mostly a valid body with up to three fields replaced by anything and some noise keys;
    now and then any JSON value at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(_json)
    body = draw(st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=20)},
                                      optional=_valid_fields(kind)))
    for key in draw(st.lists(st.sampled_from(sorted(_FIELDS)), max_size=3, unique=True)):
        body[key] = draw(_FIELDS[key])
    return {**draw(st.dictionaries(st.text(max_size=6), _json, max_size=2)), **body}


@settings(max_examples=2000, **HYP)
@given(data=st.data())
def test_schema_raises_only_api_errors(data):
    """parse + to_spec either give a spec the model can run, or an ApiError (400) naming the
    field; nothing else escapes."""
    kind = data.draw(st.sampled_from(list(_KINDS)), label="kind")
    body = data.draw(_bodies(kind), label="body")
    try:
        spec, factor = to_spec(parse(_KINDS[kind], body, 2000), kind, PRESETS, 4, 16)
    except ApiError as e:
        event(f"400 {e.param}")
        assert e.status == 400, (e.status, e.message)
        assert e.message and e.code
        if isinstance(body, dict) and e.param is not None:
            assert e.param in _FIELDS or e.param == "body", e.param
        return
    event("valid")
    gen = spec.gen
    m = MODELS[gen.model]
    assert gen.model in PRESETS and m.kind is kind is spec.kind
    m.validate_shape(gen.height, gen.width, gen.frames, gen.steps)
    assert 1 <= spec.n <= 4 and 1 <= len(gen.prompt) <= 2000
    assert 0 <= gen.seed <= 2**31 - 1 and math.isfinite(gen.guidance)
    assert factor in (0.5, 1.0, 4.0)
    if kind is Kind.VIDEO:
        assert spec.seconds == (f"{(gen.frames - 1) / 16:g}" if gen.frames > 1 else "0")


# Over HTTP: every example that validates runs for real, so valid shapes stay small.  A body is
# valid fields (most of them optional), then up to two fields replaced by anything, plus noise keys.
def _valid(kind: Kind) -> dict:
    common = {
        "model": st.sampled_from(["tiny-t2i" if kind is Kind.IMAGE else "tiny-t2v", None]),
        "size": st.sampled_from(["16x16", "32x32", "48x32", "32x16", "auto", None]),
        "seed": st.integers(0, 2**31 - 1) | st.none(),
        "guidance": st.floats(0, 50) | st.integers(0, 50),
        "slo_ms": st.sampled_from([1, 2000, 60_000, None]),
        "priority": st.sampled_from(["high", "normal", "low", None]),
    }
    if kind is Kind.IMAGE:
        return {**common, "n": st.sampled_from([1, 2]),  # "2": a 400 (strict JSON types)
                "response_format": st.just("b64_json")}
    return {**common, "seconds": st.sampled_from(["0.25", "0.5", 0.25, 1, None]),
            "frames": st.sampled_from([1, 5, 9, None])}


_anything = {
    "model": st.sampled_from(["tiny-t2i", "tiny-t2v", "nope", ""]) | _scalars,
    "prompt": st.sampled_from(["", "p" * 2001]) | _scalars,
    "size": st.sampled_from(["65x64", "abc", "", "1024x1024", "0x0", "64x64x64"]) | _scalars,
    "n": st.sampled_from([0, 5, "1", 1.5, [1], True]) | _scalars,
    "steps": st.sampled_from([0, 1001, "1", 1.5, None, "x", [1], {"a": 1}, True]),
    "seed": st.integers(-1, 2**31) | _scalars,
    "guidance": st.floats() | _scalars,
    "slo_ms": st.sampled_from([0, -1, "fast", 1e12, float("inf")]) | _scalars,
    "priority": st.sampled_from(["urgent", 1, ""]) | _scalars,
    "response_format": st.sampled_from(["url", None, "png"]) | _scalars,
    "seconds": st.sampled_from(["-1", "abc", "9", "1e400", "", "0"]) | _scalars,
    "frames": st.sampled_from([10, 0, 34, "5", 2.5]) | _scalars,
}


@settings(max_examples=80, **HYP)
@given(data=st.data())
def test_http_requests_never_500(http, data):
    kind = data.draw(st.sampled_from(list(_KINDS)), label="kind")
    body = data.draw(st.fixed_dictionaries(
        {"prompt": st.text(min_size=1, max_size=12), "steps": st.sampled_from([1, 2])},
        optional=_valid(kind)), label="valid")
    body = {k: v for k, v in body.items() if v is not None or k in ("seed",)}
    for key in data.draw(st.lists(st.sampled_from(sorted(_anything)), max_size=2, unique=True),
                         label="replaced"):
        body[key] = data.draw(_anything[key], label=key)
    body = {**data.draw(st.dictionaries(st.text(max_size=6), _scalars, max_size=2)), **body}

    path = IMG if kind is Kind.IMAGE else VID
    r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    event(f"{kind.value} {r.status_code}")
    assert r.status_code in (200, 400, 422, 429), (r.status_code, r.text)
    if r.status_code != 200:
        assert_error(r, r.status_code)
    elif kind is Kind.IMAGE:
        assert len(r.json()["data"]) == int(body.get("n", 1))
    else:
        assert r.json()["status"] in ("queued", "in_progress")


# ----------------------------------------------------------------------------- API keys
@pytest.fixture(scope="module")
def keyed(forked_worker_pools, tmp_path_factory):
    cfg = ServeConfig(workers=1, api_keys=("k1", "k2"),
                      results_dir=str(tmp_path_factory.mktemp("keyed")))
    with TestClient(create_app(cfg)) as c:
        yield c


def test_the_same_idempotency_key_returns_the_same_job(keyed):
    k1 = {"Authorization": "Bearer k1", "Idempotency-Key": "k-1"}
    body = {"prompt": "a hen", "steps": 2, "size": "32x32", "frames": 9}
    a = keyed.post("/v1/videos", json=body, headers=k1)
    b = keyed.post("/v1/videos", json=body, headers=k1)  # no seed: a random one each time
    assert a.status_code == b.status_code == 200 and a.json()["id"] == b.json()["id"]
    other = keyed.post("/v1/videos", json=body, headers={**k1, "Authorization": "Bearer k2"})
    assert other.status_code == 200 and other.json()["id"] != a.json()["id"]  # keys are per owner
    changed = keyed.post("/v1/videos", json={**body, "prompt": "a duck"}, headers=k1)
    assert changed.status_code == 409, changed.text
    assert changed.json()["error"]["code"] == "idempotency_key_reused"
    bad = keyed.post("/v1/videos", json=body, headers={**k1, "Idempotency-Key": "x" * 300})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Idempotency-Key"
    for r in (a, other):
        auth = {"Authorization": r.request.headers["authorization"]}
        assert wait_final(getter(keyed, headers=auth), r.json()["id"])[-1]["status"] == "completed"


def test_concurrent_retries_with_one_key_make_one_job(keyed):
    hdr = {"Authorization": "Bearer k1", "Idempotency-Key": "race"}
    body = {"prompt": "a crow", "steps": 2, "size": "32x32", "frames": 9, "seed": 1}
    ids: list = []
    threads = [threading.Thread(target=lambda: ids.append(
        keyed.post("/v1/videos", json=body, headers=hdr).json()["id"])) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(ids) == 6 and len(set(ids)) == 1, ids


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_api_keys_required(keyed):
    for headers in ({}, auth("nope"), {"Authorization": "k1"}, {"Authorization": "Basic k1"}):
        for r in (keyed.post(IMG, json={"prompt": "a", "steps": 1}, headers=headers),
                  keyed.post(VID, json={"prompt": "a", "steps": 1}, headers=headers),
                  keyed.get("/v1/videos", headers=headers),
                  keyed.get("/v1/models", headers=headers),
                  keyed.get("/v1/jobs/whatever", headers=headers)):
            assert_error(r, 401, code="invalid_api_key")
    assert keyed.get("/health").status_code == 200  # probes need no key
    assert keyed.get("/v1/models", headers=auth("k2")).status_code == 200


def test_api_keys_isolate_jobs(keyed):
    r = keyed.post(VID, json={"prompt": "mine", "steps": 2}, headers=auth("k1"))
    assert r.status_code == 200, r.text
    vid = r.json()["id"]
    end = wait_final(getter(keyed, headers=auth("k1")), vid)[-1]
    assert end["status"] == "completed"

    for r in (keyed.get(f"/v1/videos/{vid}", headers=auth("k2")),
              keyed.get(f"/v1/videos/{vid}/content", headers=auth("k2")),
              keyed.delete(f"/v1/videos/{vid}", headers=auth("k2")),
              keyed.get(f"/v1/jobs/{vid}", headers=auth("k2")),
              keyed.delete(f"/v1/jobs/{vid}", headers=auth("k2")),
              keyed.get(f"/v1/jobs/{vid}/events", headers=auth("k2"))):
        assert_error(r, 404, code="not_found")
    assert keyed.get(f"/v1/videos/{vid}", headers=auth("k1")).json()["status"] == "completed"
    assert mp4_frames(keyed.get(f"/v1/videos/{vid}/content", headers=auth("k1")).content)

    img = keyed.post(IMG, json={"prompt": "k2's", "steps": 1}, headers=auth("k2"))
    assert img.status_code == 200
    assert keyed.get(f"/v1/jobs/{img.json()['id']}", headers=auth("k2")).status_code == 200
    assert_error(keyed.get(f"/v1/jobs/{img.json()['id']}", headers=auth("k1")), 404)

    v2 = keyed.post(VID, json={"prompt": "theirs", "steps": 2}, headers=auth("k2")).json()["id"]
    mine = all_video_ids(keyed, headers=auth("k1"))
    theirs = all_video_ids(keyed, headers=auth("k2"))
    assert vid in mine and v2 not in mine
    assert v2 in theirs and vid not in theirs
    wait_final(getter(keyed, headers=auth("k2")), v2)


# ----------------------------------------------------------------------------- results on disk
@pytest.fixture(scope="module")
def finished_video(http):
    """A completed video of the main server, with its bytes."""
    vid = http.post(VID, json={"prompt": "keep me", "steps": 2, "seed": 9}).json()["id"]
    end = wait_final(getter(http), vid)[-1]
    assert end["status"] == "completed"
    return {**end, "content": http.get(f"/v1/videos/{vid}/content").content}


@pytest.fixture(scope="module")
def aux(server, finished_video, tmp_path_factory):
    """A second app, started on a copy of the main server's results_dir (a restart, as far as
    stored results go; a copy, so that the two live services never share files): one worker, at
    most one video waiting, infeasible SLOs rejected, a 3 s result TTL."""
    results = tmp_path_factory.mktemp("aux") / "results"
    shutil.copytree(server.svc.cfg.results_dir, results, ignore=shutil.ignore_patterns(".*"))
    cfg = ServeConfig(workers=1, results_dir=str(results), max_waiting_videos=1,
                      infeasible="reject", result_ttl_s=3.0)
    with TestClient(create_app(cfg)) as c:
        yield c


def test_results_survive_a_restart(aux, finished_video):
    vid = finished_video["id"]
    got = aux.get(f"/v1/videos/{vid}")
    assert got.status_code == 200, got.text
    v = got.json()
    assert (v["status"], v["progress"], v["size"], v["prompt"]) == (
        "completed", 100, "32x32", "keep me")
    assert v["expires_at"] == finished_video["expires_at"]  # the TTL it was stored with
    content = aux.get(f"/v1/videos/{vid}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    assert content.content == finished_video["content"]
    assert vid in all_video_ids(aux)


def test_admission_queue_full_is_429_with_retry_after(aux):
    before = metric(aux.get("/metrics").text, "genserve_rejections_total", reason="queue_full",
                    kind="video")
    accepted, refused = [], []
    for i in range(6):
        r = aux.post(VID, json={"prompt": f"fill {i}", "steps": 1000, "size": "128x128",
                                "frames": 33})
        if r.status_code == 200:
            accepted.append(r.json()["id"])
        else:
            err = assert_error(r, 429, code="queue_full")
            assert "limit 1" in err["message"]
            assert int(r.headers["retry-after"]) >= 1
            refused.append(r)
    image: dict = {}
    svc = aux.app.state.service
    imgs_before = {j for j in svc.jobs if j.startswith("img_")}
    # images have their own limit: one is admitted now (it may have to wait for the worker the
    # video holds, so it is answered in a thread)
    t = threading.Thread(target=lambda: image.setdefault(
        "r", aux.post(IMG, json={"prompt": "img", "steps": 1})))
    t.start()
    try:
        assert accepted and refused
        after = metric(aux.get("/metrics").text, "genserve_rejections_total",
                       reason="queue_full", kind="video")
        assert after - before == len(refused)
        deadline = time.monotonic() + 10
        while not ({j for j in svc.jobs if j.startswith("img_")} - imgs_before or "r" in image):
            assert time.monotonic() < deadline, "the image was never admitted"
            time.sleep(0.01)
    finally:
        for vid in accepted:
            assert aux.delete(f"/v1/jobs/{vid}").status_code == 200
        for vid in accepted:
            end = wait_final(getter(aux), vid)[-1]
            assert end["status"] == "failed" and end["error"]["code"] == "cancelled", end
        t.join(60)
    assert image["r"].status_code == 200, image["r"].text


def test_admission_infeasible_slo_is_422(aux):
    def count(kind):
        return metric(aux.get("/metrics").text, "genserve_rejections_total",
                      reason="slo_infeasible", kind=kind)

    before = {k: count(k) for k in ("video", "image")}
    for path in (VID, IMG):
        r = aux.post(path, json={"prompt": "now", "steps": 8, "slo_ms": 1})
        assert_error(r, 422, param="slo_ms", code="slo_infeasible")
    assert {k: count(k) - before[k] for k in before} == {"video": 1, "image": 1}
    # a generous SLO is admitted
    r = aux.post(IMG, json={"prompt": "later", "steps": 1, "slo_ms": 600_000})
    assert r.status_code == 200, r.text


def test_results_expire_after_their_ttl(aux):
    svc = aux.app.state.service
    r = aux.post(VID, json={"prompt": "short-lived", "steps": 2})
    assert r.status_code == 200, r.text
    vid = r.json()["id"]
    end = wait_final(getter(aux), vid, every=0.02)[-1]
    assert end["status"] == "completed"
    assert end["expires_at"] - end["completed_at"] == 3  # the 3 s TTL (int seconds)
    folder = Path(svc.cfg.results_dir) / vid
    assert (folder / "video.mp4").exists() and vid in {r.id for r in svc.store.load()}
    assert aux.get(f"/v1/videos/{vid}/content").status_code == 200

    job = svc.jobs.get(vid)
    if job is not None:
        time.sleep(max(0.0, job.expires_at - time.time()) + 0.05)
    svc.expire()  # the janitor may have been first; either way it is gone now
    assert_error(aux.get(f"/v1/videos/{vid}"), 404, code="not_found")
    assert_error(aux.get(f"/v1/videos/{vid}/content"), 404)
    assert vid not in all_video_ids(aux)
    assert not folder.exists() and vid not in {r.id for r in svc.store.load()}


# ----------------------------------------------------------------------------- metrics
def test_metrics_add_up(http, server):
    """Last in the module: every request the main server admitted has ended exactly once."""
    r = http.post(VID, json={"prompt": "count me", "steps": 2})
    assert http.post(IMG, json={"prompt": "me too", "steps": 1, "n": 2}).status_code == 200
    svc = server.svc
    deadline = time.monotonic() + 120
    while not all(j.final for j in list(svc.jobs.values())):
        assert time.monotonic() < deadline, [j.id for j in svc.jobs.values() if not j.final]
        time.sleep(0.1)
    assert r.json()["id"] in svc.jobs

    text = http.get("/metrics").text
    for name in ("genserve_requests", "genserve_requests_submitted_total",
                 "genserve_requests_ended_total", "genserve_preemptions_total",
                 "genserve_slo_total", "genserve_rejections_total",
                 "genserve_queue_time_seconds", "genserve_e2e_latency_seconds"):
        assert f"# TYPE {name} " in text, name
    for kind in ("image", "video"):
        # Jobs deleted after they ended are gone from svc.jobs but stay counted.
        n_req = sum(len(j.request_ids) for j in svc.jobs.values() if j.spec.kind.value == kind)
        submitted = metric(text, "genserve_requests_submitted_total", kind=kind)
        assert submitted >= n_req
        assert metric(text, "genserve_requests_ended_total", kind=kind) == submitted
    ended = metric_samples(text, "genserve_requests_ended_total")
    assert {ls["outcome"] for ls, _ in ended} <= {"finished", "failed", "cancelled"}
    assert {ls["state"]: v for ls, v in metric_samples(text, "genserve_requests")} == {
        "waiting": 0.0, "running": 0.0, "preempted": 0.0}
    finished = metric(text, "genserve_requests_ended_total", outcome="finished")
    assert metric(text, "genserve_slo_total") == finished
    assert metric(text, "genserve_e2e_latency_seconds_count") == finished
    # every completed job's requests finished; a failed job's ended otherwise
    done = sum(len(j.request_ids) for j in svc.jobs.values() if j.status == "completed")
    assert finished >= done
