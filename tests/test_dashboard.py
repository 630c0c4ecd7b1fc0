"""The live cluster page (`/dashboard`) and its data (`/v1/cluster`) on a live server: tiny presets
on two CPU workers, API keys set.

`test_cluster_json` checks the JSON (shape, keys enforced, content that follows a request that
ran) and the page's public files.  `test_dashboard_in_chromium` opens the page in headless
Chromium (Debian's `chromium`, driven by Playwright's Python client with `executable_path`:
Playwright's own browser download is never used), gives it the key, sends a short mixed load and
checks that the GPU rows, quantum bars, queue numbers and per-model attainment appear and change
as the load runs; screenshots go to `test-artifacts/`.  Without a chromium binary (or without
playwright) it is skipped, saying so; `.ci/run` installs chromium.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from genserve.server.app import create_app
from genserve.server.config import ServeConfig

from _serve import Uvicorn, assert_error

KEY = "dash-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def server(forked_worker_pools, tmp_path_factory):
    cfg = ServeConfig(workers=2, results_dir=str(tmp_path_factory.mktemp("res")),
                      api_keys=(KEY,))
    with Uvicorn(create_app(cfg), health=True) as s:
        yield s


def cluster(http, **params) -> dict:
    r = http.get("/v1/cluster", headers=AUTH, params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def test_cluster_json(server, http):
    # Keys: none, or an unknown one -> 401 (the API's error body); the page itself is public.
    assert_error(http.get("/v1/cluster"), 401, code="invalid_api_key")
    assert_error(http.get("/v1/cluster", headers={"Authorization": "Bearer nope"}), 401,
                 code="invalid_api_key")
    assert_error(http.get("/v1/cluster", headers=AUTH, params={"seconds": 5}), 400, "seconds")
    page = http.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert 'id="gpu-rows"' in page.text and "http" not in page.text.replace("http-equiv", "")
    for name, kind in (("dashboard.js", "javascript"), ("dashboard.css", "css")):
        r = http.get(f"/dashboard/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"], name
        assert "://" not in r.text, f"{name} refers to something outside the server"
    assert http.get("/dashboard/secret.txt").status_code == 404
    assert http.head("/v1/cluster", headers=AUTH).status_code == 200

    d = cluster(http)
    assert d["object"] == "cluster" and abs(d["now"] - time.time()) < 5
    assert [g["id"] for g in d["gpus"]] == [0, 1]
    assert all(g["state"] in ("idle", "busy", "down") for g in d["gpus"])
    assert [m["id"] for m in d["models"]] == ["tiny-t2i", "tiny-t2v"]
    assert set(d["queues"]) == {"image", "video"}
    assert set(d["queues"]["image"]) == {"waiting", "oldest_wait_s", "paused", "running"}
    assert d["workers"] == {"total": 2, "down": [], "replaced_total": 0,
                            "last_replaced_at": None, "hung_total": 0}
    assert d["engine"]["healthy"] and d["slo"]["window_s"] == 300
    assert set(d["slo"]["models"]) == {"tiny-t2i", "tiny-t2v"}

    before = {m: c["met"] + c["missed"] for m, c in d["slo"]["models"].items()}
    r = http.post("/v1/images/generations", headers=AUTH,
                  json={"model": "tiny-t2i", "prompt": "a cat", "n": 2})
    assert r.status_code == 200, r.text
    job = r.json()["id"]
    d = cluster(http, seconds=60)
    mine = [q for q in d["quanta"] if any(rid.startswith(job) for rid in q["requests"])]
    assert mine, d["quanta"]
    for q in mine:
        assert q["model"] == "tiny-t2i" and q["kind"] == "image" and q["outcome"] == "ok"
        assert q["end"] is not None and q["start"] <= q["end"] <= d["now"]
        assert set(q["gpus"]) <= {0, 1} and q["steps"] >= 1
    # Every step of both images is in some quantum (8 steps each; a batch counts for each).
    assert sum(q["steps"] for q in mine for rid in q["requests"] if rid.startswith(job)) == 16
    t2i = d["slo"]["models"]["tiny-t2i"]
    assert t2i["met"] + t2i["missed"] == before["tiny-t2i"] + 2
    assert 0.0 <= t2i["attainment"] <= 1.0
    assert not [a for a in d["requests"] if a["id"].startswith(job)]  # ended: not active

    schema = http.get("/openapi.json").json()["paths"]
    assert {"200", "401"} <= set(schema["/v1/cluster"]["get"]["responses"])
    assert "text/html" in schema["/dashboard"]["get"]["responses"]["200"]["content"]


def _chromium() -> str | None:
    path = os.environ.get("GENSERVE_CHROMIUM")
    if path:
        return path
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


# What the test reads off the page at each look (the page's own elements, as a user sees them).
_LOOK = """() => {
  const q = (s) => document.querySelector(s);
  const text = (id) => (document.getElementById(id) || {}).textContent;
  return {
    state: document.body.dataset.state, updates: Number(document.body.dataset.updates),
    rows: document.querySelectorAll('#gpu-rows .gpu-row').length,
    bars: document.querySelectorAll('#gpu-rows .quantum').length,
    running_bars: document.querySelectorAll('#gpu-rows .quantum.running').length,
    waiting: [text('q-image-waiting'), text('q-video-waiting')],
    running: [text('q-image-running'), text('q-video-running')],
    active: document.querySelectorAll('#requests tbody tr[data-request]').length,
    slo: Object.fromEntries([...document.querySelectorAll('#slo tbody tr')].map(
      (tr) => [tr.dataset.model, tr.dataset.attainment])),
  };
}"""


# Decided at collection, before the module's server starts for nothing.
@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium, "
                    "or set GENSERVE_CHROMIUM): the dashboard's browser test needs one; .ci/run "
                    "installs it")
@pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                    reason="playwright (the test extra) is not installed")
def test_dashboard_in_chromium(server, http):
    from playwright import sync_api

    exe = _chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    for old in ARTIFACTS.glob("dashboard*.png"):
        old.unlink()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            # Console errors too: a CSP violation (an inline style, say) is reported there.  The
            # one expected: the first poll's 401, before the key was given.
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" and
                    "status of 401" not in m.text else None)
            outside: list[str] = []
            page.on("request", lambda r: None if r.url.startswith(server.url)
                    else outside.append(r.url))
            page.goto(server.url + "/dashboard")
            # Keys are set: the page asks for one, then polls with it.
            page.wait_for_selector("#key-form:not([hidden])", timeout=10_000)
            assert page.evaluate("document.body.dataset.state") == "auth"
            page.fill("#key", KEY)
            page.click("#key-form button[type=submit]")
            _wait(page, "document.body.dataset.state === 'ok'")
            page.select_option("#span", "30")  # the load is short: the last 30 s
            _wait(page, "document.getElementById('timeline-caption').textContent"
                        ".includes('30 s')")
            first = page.evaluate(_LOOK)
            assert first["rows"] == 2, first

            load = threading.Thread(target=_load, args=(server.url,), daemon=True)
            load.start()
            looks, shot_mid = [], False
            deadline = time.monotonic() + 25
            while time.monotonic() < deadline:
                look = page.evaluate(_LOOK)
                looks.append(look)
                if not shot_mid and look["active"] and look["running_bars"]:
                    page.screenshot(path=str(ARTIFACTS / "dashboard-under-load.png"),
                                    full_page=True)
                    shot_mid = True
                if not load.is_alive() and look["updates"] >= looks[0]["updates"] + 2 \
                        and all(look["slo"].values()) and not look["active"]:
                    break
                time.sleep(0.25)
            load.join(30)
            assert not load.is_alive(), "the load did not finish"
            # One more poll after the load's end.
            _wait(page, f"Number(document.body.dataset.updates) > {looks[-1]['updates']}")
            last = page.evaluate(_LOOK)
            looks.append(last)

            # Hovering a bar shows its request ids.
            bar = page.locator("#gpu-rows .quantum").last
            rids = bar.get_attribute("data-requests")
            bar.hover(force=True)
            page.wait_for_selector("#tooltip:not([hidden])", timeout=5_000)
            assert rids.split()[0] in page.inner_text("#tooltip")
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            browser.close()

    assert not errors, errors
    assert not outside, f"the page fetched from outside the server: {outside}"
    assert last["state"] == "ok" and last["rows"] == 2
    # Bars appeared and changed as the load ran; the queue numbers moved off their idle values.
    assert last["bars"] > first["bars"], (first, last)
    assert len({look["bars"] for look in looks}) > 2, looks
    assert any(look["waiting"] != ["0", "0"] or look["running"] != ["0", "0"]
               for look in looks), looks
    assert len({tuple(look["waiting"] + look["running"]) for look in looks}) > 1, looks
    assert any(look["active"] for look in looks), looks
    # Attainment per model: a share for both models once their requests ended.
    for model in ("tiny-t2i", "tiny-t2v"):
        assert last["slo"][model] not in (None, ""), last
        assert 0.0 <= float(last["slo"][model]) <= 1.0
    assert first["slo"]["tiny-t2v"] == "" and last["slo"]["tiny-t2v"] != "", (first, last)
    assert shot_mid and (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def _wait(page, expression: str, timeout: float = 10.0) -> None:
    """Until `expression` is true in the page.  Polled with `evaluate` (which the page's CSP
    allows: Playwright's `wait_for_function` evals a string in the page, which it forbids)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"not true after {timeout} s: {expression}"
        time.sleep(0.05)


def _load(url: str) -> None:
    """A short mixed load over ~4 s: an image job of 2 every 0.4 s and a longer video (48x48, 17
    frames) every 1.2 s, more than two CPU workers keep up with at moments, so that requests
    wait, run and end while the page polls."""
    with httpx.Client(base_url=url, headers=AUTH, timeout=90) as c:
        videos, done = [], []

        def image(i: int) -> None:
            done.append(c.post("/v1/images/generations", json={
                "model": "tiny-t2i", "prompt": f"a dog {i}", "n": 2}).status_code)

        threads = []
        for i in range(10):
            threads.append(threading.Thread(target=image, args=(i,)))
            threads[-1].start()
            if i % 3 == 0:
                videos.append(c.post("/v1/videos", json={
                    "model": "tiny-t2v", "prompt": f"waves {i}", "size": "48x48",
                    "frames": 17}).json()["id"])
            time.sleep(0.4)
        for t in threads:
            t.join(90)
        deadline = time.monotonic() + 90
        while videos and time.monotonic() < deadline:
            videos = [v for v in videos
                      if c.get(f"/v1/videos/{v}").json()["status"] not in ("completed", "failed")]
            time.sleep(0.2)
        assert done == [200] * 10 and not videos, (done, videos)


# ----------------------------------------------------------------------------- no server
class _FakeCore:
    def __init__(self):
        self.inflight = {}

    def in_flight(self, rid):
        return next((q for q in self.inflight.values() if rid in q.requests), None)


class _FakeEngine:
    def __init__(self, gpus: int):
        from genserve.policies.base import Cluster

        self.t, self.core, self.cluster = 100.0, _FakeCore(), Cluster(gpus)
        self.down_workers, self.res = (), type("Res", (), {"restarts": 0})()

    def now(self):
        return self.t


class _FakeService:
    def __init__(self, gpus: int = 4):
        self.cfg = ServeConfig(workers=gpus)
        self.engine, self.started, self.draining, self.engine_error = _FakeEngine(gpus), True, \
            False, None

    def healthy(self):
        return True

    def workers_hung(self):
        return 0


def test_cluster_view_from_engine_updates():
    """Quanta open and close from the updates alone (as the engine reports them: members
    notified after their quantum started, and again after it ended); a worker lost mid-quantum
    marks it `lost` and its GPU `down`; ends leave the SLO window; a bug in the view never
    reaches the engine."""
    from genserve.executor.quanta import Quantum
    from genserve.policies.base import Assignment
    from genserve.request import Kind, Request
    from genserve.server.dashboard import ClusterView
    from genserve.spec import GenSpec

    svc = _FakeService(4)
    eng, view = svc.engine, ClusterView(svc, max_quanta=3, slo_window_s=300)
    img = [Request(f"img_a-{i}", Kind.IMAGE, GenSpec("tiny-t2i", 64, 64, steps=8), arrival=100,
                   deadline=110) for i in range(2)]
    vid = Request("video_b-0", Kind.VIDEO, GenSpec("tiny-t2v", 32, 32, 9, steps=8),
                  arrival=100, deadline=101)
    for r in (*img, vid):
        view.update(r)
    snap = view.snapshot(60)
    assert snap["queues"]["image"]["waiting"] == 2 and snap["queues"]["video"]["waiting"] == 1
    assert snap["quanta"] == [] and [g["state"] for g in snap["gpus"]] == ["idle"] * 4

    # A batch of both images on GPUs 0-1 (8 steps), the video on 2-3 (4 steps).
    qa = Quantum(0, Assignment((0, 1), ("img_a-0", "img_a-1"), 8), 100.0, 2.0, False)
    qb = Quantum(1, Assignment((2, 3), ("video_b-0",), 4), 100.0, 5.0, False)
    eng.core.inflight = {0: qa, 1: qb}
    for r in img:
        r.start(100.0, (0, 1))
        view.update(r)
    vid.start(100.0, (2, 3))
    view.update(vid)
    snap = view.snapshot(60)
    assert [(q["gpus"], q["requests"], q["end"], q["outcome"]) for q in snap["quanta"]] == [
        ([0, 1], ["img_a-0", "img_a-1"], None, "running"), ([2, 3], ["video_b-0"], None,
                                                             "running")]
    assert [g["state"] for g in snap["gpus"]] == ["busy"] * 4
    assert {a["id"]: (a["status"], a["degree"]) for a in snap["requests"]} == {
        "img_a-0": ("running", 2), "img_a-1": ("running", 2), "video_b-0": ("running", 2)}

    # The images' quantum ends: both finish (one closes it; the other finds it closed).
    del eng.core.inflight[0]
    eng.t = 102.0
    for r in img:
        r.advance(8)
        r.finish(102.0)
        view.update(r)
    # The video's worker dies: its quantum ends lost, the request rolls back, GPU 3 is down.
    del eng.core.inflight[1]
    eng.down_workers, eng.res.restarts = (3,), 1
    vid.rollback(103.0, 0)
    view.update(vid)
    snap = view.snapshot(60)
    assert [(q["requests"][0], q["outcome"]) for q in snap["quanta"]] == [
        ("img_a-0", "ok"), ("video_b-0", "lost")]
    assert all(q["end"] is not None for q in snap["quanta"])
    assert [g["state"] for g in snap["gpus"]] == ["idle", "idle", "idle", "down"]
    assert snap["workers"]["down"] == [3] and snap["workers"]["replaced_total"] == 1
    assert snap["workers"]["last_replaced_at"] is not None
    assert snap["queues"]["video"] == {"waiting": 0, "oldest_wait_s": None, "paused": 1,
                                       "running": 0}
    slo = snap["slo"]["models"]
    assert slo["tiny-t2i"]["met"] == 2 and slo["tiny-t2i"]["attainment"] == 1.0
    assert slo["tiny-t2v"]["attainment"] is None

    # The ring keeps the newest `max_quanta`; ends older than the window leave it.
    for k in range(5):
        q = Quantum(10 + k, Assignment((0,), ("video_b-0",), 1), 104.0 + k, 0.5, False)
        eng.core.inflight = {q.key: q}
        if vid.status.value == "preempted":
            vid.resume(104.0 + k, (0,))
        view.update(vid)
        eng.core.inflight = {}
        vid.advance(1)
        view.update(vid)
    assert len(view.snapshot(60)["quanta"]) == 3
    view._ended[0] = (time.time() - 301, "tiny-t2i", "met")
    assert view.snapshot(60)["slo"]["models"]["tiny-t2i"]["met"] == 1

    # A bug in the view (here: no engine) is logged once, never raised into the engine.
    svc.engine = None
    view.update(vid)
    view.update(vid)
    assert view._warned
