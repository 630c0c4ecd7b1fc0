"""Load on the HTTP API over loopback: a burst of 300 concurrent requests against queue limits far
below it.  Every request must get a final answer (a result, a 429 with Retry-After, or an error
with a reason), never a hang or a dropped connection; every admitted job must be retrievable and
end; and /metrics must account for all of them.  Bounded: well under 90 s on 2 CPU cores.
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from genserve.server.app import create_app
from genserve.server.config import ServeConfig

N_IMAGES, N_VIDEOS = 240, 60
MAX_WAITING_IMAGES, MAX_WAITING_VIDEOS = 50, 10
FINAL = ("completed", "failed")


# Workers fork from the tests' fork server (tests/_spawn.py); test_engine_acceptance and the
# serve processes of test_server_drain keep the production spawn path covered.
pytestmark = pytest.mark.usefixtures("forked_worker_pools")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(forked_worker_pools, tmp_path_factory):
    cfg = ServeConfig(workers=2, results_dir=str(tmp_path_factory.mktemp("load")),
                      max_waiting_images=MAX_WAITING_IMAGES,
                      max_waiting_videos=MAX_WAITING_VIDEOS)
    app = create_app(cfg)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                        backlog=1024))
    thread = threading.Thread(target=srv.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    srv.url, srv.svc = url, app.state.service
    yield srv
    srv.should_exit = True
    thread.join(60)


def metric(text: str, name: str, **labels) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m:
            ls = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            if all(ls.get(k) == v for k, v in labels.items()):
                total += float(m.group(2))
    return total


def wait_all_final(svc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(j.final for j in list(svc.jobs.values())):
        assert time.monotonic() < deadline, [(j.id, j.status) for j in svc.jobs.values()
                                             if not j.final][:10]
        time.sleep(0.1)


async def _call(client: httpx.AsyncClient, kind: str, i: int) -> dict:
    """One request; its answer, or the transport error that replaced it (a test failure)."""
    if kind == "image":
        path, body = "/v1/images/generations", {"prompt": f"img {i}", "steps": 1 + i % 2,
                                                 "size": "32x32", "seed": i,
                                                 "n": 2 if i % 10 == 0 else 1}
    else:
        path, body = "/v1/videos", {"prompt": f"vid {i}", "steps": 2 + i % 3, "size": "32x32",
                                    "frames": 5, "seed": i}
    t0 = time.monotonic()
    try:
        r = await client.post(path, json=body)
    except httpx.HTTPError as e:
        return {"kind": kind, "i": i, "error": repr(e), "s": time.monotonic() - t0}
    return {"kind": kind, "i": i, "status": r.status_code, "body": r.json(),
            "headers": dict(r.headers), "n": body.get("n", 1), "s": time.monotonic() - t0}


async def _burst(url: str) -> list[dict]:
    calls = [("image", i) for i in range(N_IMAGES)] + [("video", i) for i in range(N_VIDEOS)]
    calls.sort(key=lambda c: (c[1] * 7919) % 300)  # interleave the kinds, deterministically
    limits = httpx.Limits(max_connections=len(calls), max_keepalive_connections=len(calls))
    timeout = httpx.Timeout(120, connect=30)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        return await asyncio.wait_for(
            asyncio.gather(*(_call(client, k, i) for k, i in calls)), timeout=150)


def test_burst_of_mixed_requests_all_answered_and_counted(server):
    svc = server.svc
    before_jobs = set(svc.jobs)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        before = http.get("/metrics").text
    t0 = time.monotonic()
    results = asyncio.run(_burst(server.url))
    burst_s = time.monotonic() - t0

    assert len(results) == N_IMAGES + N_VIDEOS
    errors = [r for r in results if "error" in r]
    assert not errors, errors[:5]
    by_status: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        by_status.setdefault((r["kind"], r["status"]), []).append(r)
    assert set(by_status) <= {("image", 200), ("image", 429), ("video", 200), ("video", 429)}, {
        k: v[0]["body"] for k, v in by_status.items()}

    # the limits were hit, and not everything was refused
    for kind in ("image", "video"):
        assert by_status.get((kind, 200)), kind
        assert by_status.get((kind, 429)), kind
    for r in by_status.get(("image", 429), []) + by_status.get(("video", 429), []):
        err = r["body"]["error"]
        assert err["code"] == "queue_full" and err["type"] == "invalid_request_error"
        assert int(r["headers"]["retry-after"]) >= 1

    images = by_status[("image", 200)]
    for r in images:
        assert len(r["body"]["data"]) == r["n"]
        raw = base64.b64decode(r["body"]["data"][0]["b64_json"])
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    videos = by_status[("video", 200)]
    assert all(r["body"]["status"] in ("queued", "in_progress") for r in videos)

    # every admitted video ends; every admitted job is retrievable and final
    with httpx.Client(base_url=server.url, timeout=30) as http:
        deadline = time.monotonic() + 60
        pending = {r["body"]["id"] for r in videos}
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} videos never ended"
            for vid in list(pending):
                got = http.get(f"/v1/videos/{vid}")
                assert got.status_code == 200, got.text
                if got.json()["status"] in FINAL:
                    assert got.json()["status"] == "completed", got.json()
                    pending.discard(vid)
            time.sleep(0.1)
        ids = [r["body"]["id"] for r in images + videos]
        assert len(set(ids)) == len(ids)
        for job_id in ids:
            got = http.get(f"/v1/jobs/{job_id}")
            assert got.status_code == 200 and got.json()["status"] == "completed", got.text
        listed, after = set(), None
        while True:  # page through the list
            page = http.get("/v1/videos", params={"limit": 100, **({"after": after} if after
                                                                   else {})}).json()
            listed |= {v["id"] for v in page["data"]}
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert {r["body"]["id"] for r in videos} <= listed

        wait_all_final(svc, 30)
        text = http.get("/metrics").text

    def delta(name, **labels):
        return metric(text, name, **labels) - metric(before, name, **labels)

    # nothing admitted that we do not know about, nothing lost
    assert set(svc.jobs) - before_jobs == set(ids)
    for kind, answered in (("image", images), ("video", videos)):
        admitted = sum(r["n"] for r in answered)
        refused = len(by_status.get((kind, 429), []))
        assert delta("genserve_requests_submitted_total", kind=kind) == admitted
        assert delta("genserve_requests_ended_total", kind=kind) == admitted
        assert delta("genserve_requests_ended_total", kind=kind, outcome="finished") == admitted
        assert delta("genserve_rejections_total", kind=kind, reason="queue_full") == refused
    assert delta("genserve_rejections_total") == delta("genserve_rejections_total",
                                                       reason="queue_full")
    assert metric(text, "genserve_requests_submitted_total") == metric(
        text, "genserve_requests_ended_total")
    for state in ("waiting", "running", "preempted"):
        assert metric(text, "genserve_requests", state=state) == 0
    print(f"burst: {burst_s:.1f} s; " + ", ".join(f"{k} {s}: {len(v)}"
                                                  for (k, s), v in sorted(by_status.items())))


async def _impatient(url: str, n: int) -> list[str]:
    """n slow image requests whose clients give up after 0.5 s."""
    async def one(i):
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(0.5)) as c:
            try:
                r = await c.post("/v1/images/generations",
                                 json={"prompt": f"slow {i}", "steps": 1000, "size": "64x64"})
                return f"answered {r.status_code}"
            except httpx.TimeoutException:
                return "gave up"
    return await asyncio.gather(*(one(i) for i in range(n)))


def test_clients_that_give_up_get_their_jobs_cancelled(server):
    """An image request is synchronous: a client that disconnects cancels its job (nobody will
    read it), so the engine does not spend the next minute on abandoned work."""
    svc = server.svc
    before = set(svc.jobs)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        cancelled_before = metric(http.get("/metrics").text, "genserve_requests_ended_total",
                                  outcome="cancelled")
    outcomes = asyncio.run(_impatient(server.url, 8))
    assert outcomes == ["gave up"] * 8
    new = [svc.jobs[j] for j in set(svc.jobs) - before]
    assert len(new) == 8
    wait_all_final(svc, 30)  # the server polls for a disconnect every second
    assert all(j.status == "failed" and j.error["code"] == "cancelled" for j in new), [
        (j.status, j.error) for j in new]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        text = http.get("/metrics").text
    submitted = metric(text, "genserve_requests_submitted_total")
    assert submitted == metric(text, "genserve_requests_ended_total")
    assert submitted == sum(len(j.request_ids) for j in svc.jobs.values())
    assert metric(text, "genserve_requests_ended_total", kind="image",
                  outcome="cancelled") - cancelled_before == 8
