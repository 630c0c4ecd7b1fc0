"""`genserve serve` as a process: SIGTERM drains it.  New requests get 503 (draining), work that
runs goes on and can be read while it runs and for a while after it ended (--drain-linger), and the
process exits with code 0; past the drain timeout it exits anyway.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
av = pytest.importorskip("av")

from fastapi.testclient import TestClient

from genserve.server.app import create_app
from genserve.server.config import ServeConfig

FINAL = ("completed", "failed")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(self, tmp_path: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.results = tmp_path / "results"
        self.log = tmp_path / "serve.log"
        cmd = [sys.executable, "-m", "genserve.cli", "serve", "--port", str(self.port),
               "--workers", "2", "--results-dir", str(self.results), *args]
        with open(self.log, "wb") as log:  # a file, not a pipe: nobody has to drain it
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, f"serve exited early:\n{self.output()}"
            assert time.monotonic() < deadline, f"serve did not start:\n{self.output()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def serve(tmp_path):
    procs = []

    def start(*args: str) -> ServeProcess:
        procs.append(ServeProcess(tmp_path, *args))
        return procs[-1]

    yield start
    for p in procs:
        p.close()


def start_video(http: httpx.Client, steps: int) -> dict:
    """A long video (128x128, 33 frames: ~17 ms a step on 2 CPU cores), once it runs."""
    r = http.post("/v1/videos", json={"prompt": "drain me", "steps": steps, "size": "128x128",
                                      "frames": 33, "seed": 1})
    assert r.status_code == 200, r.text
    vid = r.json()["id"]
    deadline = time.monotonic() + 30
    while True:
        v = http.get(f"/v1/videos/{vid}").json()
        if v["steps_done"] > 0:
            return v
        assert time.monotonic() < deadline, v
        time.sleep(0.02)


def mp4_frames(raw: bytes) -> list[tuple[int, int]]:
    assert raw[4:8] == b"ftyp", raw[:16]
    with av.open(io.BytesIO(raw)) as box:
        return [(f.width, f.height) for f in box.decode(video=0)]


def test_sigterm_drains_running_work_then_exits(serve):
    s = serve("--drain-timeout", "60")
    http = s.http
    v = start_video(http, steps=300)
    vid = v["id"]
    s.proc.send_signal(signal.SIGTERM)
    t_term = time.monotonic()

    # new work is refused, the probe says so; the running video can still be read
    for path, body in (("/v1/videos", {"prompt": "late", "steps": 2}),
                       ("/v1/images/generations", {"prompt": "late", "steps": 1})):
        r = http.post(path, json=body)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "draining"
        assert r.json()["error"]["type"] == "server_error"
        assert int(r.headers["retry-after"]) > 0
    health = http.get("/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "draining"

    # a client that watches sees it progress and complete, then downloads it
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = http.get(f"/v1/videos/{vid}")
        assert got.status_code == 200, got.text
        seen.append(got.json())
        if seen[-1]["status"] in FINAL:
            break
        time.sleep(0.02)
    progress = [x["progress"] for x in seen]
    assert progress == sorted(progress) and len(set(progress)) >= 3, progress
    assert seen[-1]["status"] == "completed" and seen[-1]["progress"] == 100, seen[-1]
    content = http.get(f"/v1/videos/{vid}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    assert mp4_frames(content.content) == [(128, 128)] * 33

    # then it exits, cleanly, on its own
    rc = s.proc.wait(60)
    assert rc == 0, s.output()
    out = s.output()
    assert "SIGTERM: draining" in out and "drained" in out and "Traceback" not in out, out
    print(f"exit {time.monotonic() - t_term:.1f} s after SIGTERM")

    # the video was completed and stays on disk for the next server
    mp4 = (s.results / vid / "video.mp4").read_bytes()
    assert mp4 == content.content
    again = TestClient(create_app(ServeConfig(results_dir=str(s.results))))  # no workers needed
    v = again.get(f"/v1/videos/{vid}").json()
    assert (v["status"], v["progress"], v["size"]) == ("completed", 100, "128x128")
    assert again.get(f"/v1/videos/{vid}/content").content == mp4


def test_drain_timeout_exits_with_work_left(serve):
    """Regression (4e6bc0b): with a request still running past the drain timeout (or on SIGINT)
    the process never exited: Service.stop joined the engine thread for 10 s, then closed the
    pool under it; the engine took the closed workers for lost and respawned them, died on
    'Event loop is closed' in the listener, and the interpreter hung at exit joining a
    multiprocessing queue feeder thread."""
    s = serve("--drain-timeout", "1")
    r = s.http.post("/v1/videos", json={"prompt": "endless", "steps": 1000, "size": "256x256",
                                         "frames": 33})  # minutes of work
    assert r.status_code == 200, r.text
    time.sleep(1.0)
    s.proc.send_signal(signal.SIGTERM)
    try:
        rc = s.proc.wait(30)  # drain timeout 1 s + shutdown (~6 s here); it used to hang
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running 30 s after SIGTERM:\n{s.output()[-2000:]}")
    assert rc == 0, s.output()
    assert "drain timeout: exiting with work left" in s.output()
    assert "Traceback" not in s.output(), s.output()


def test_result_stays_fetchable_for_a_polling_client_during_drain(serve):
    """Regression (4e6bc0b): the drain exited as soon as every job was final (polled every
    50 ms), so a client polling like openai's videos.poll (every 1 s) found the server gone
    before it could retrieve or download the video the drain had waited for."""
    s = serve("--drain-timeout", "60")
    vid = start_video(s.http, steps=120)["id"]
    s.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while s.http.get(f"/v1/videos/{vid}").json()["status"] not in FINAL:  # watch closely...
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(1.0)  # ...then come back like a polling client would, 1 s later
    try:
        with httpx.Client(base_url=s.url, timeout=10) as c:
            v = c.get(f"/v1/videos/{vid}").json()
            r = c.get(f"/v1/videos/{vid}/content")
    except httpx.TransportError as e:
        raise AssertionError(f"the server is gone 1 s after the drained video ended: {e!r}")
    assert v["status"] == "completed" and r.status_code == 200
    s.proc.wait(60)
