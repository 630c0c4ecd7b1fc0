"""Nothing accepted is lost: the job store, checkpoints on disk, resuming after a crash or a stop,
and Idempotency-Key.  The crash tests run `genserve serve` as a process (the production spawn
path) and SIGKILL it with its workers."""

from __future__ import annotations

import base64
import io
import re
import signal
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
av = pytest.importorskip("av")
torch = pytest.importorskip("torch")

from PIL import Image

from genserve.models import GenRequest, load_preset
from genserve.models.output import encode_mp4
from genserve.request import Kind
from genserve.server.jobs import Job, JobSpec, row_of
from genserve.server.store import JobStore
from genserve.spec import GenSpec

from _serve import ServeProcess

FINAL = ("completed", "failed")


def wait_final(http, path: str, timeout: float = 120, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = http.get(path, headers=headers)
        assert r.status_code == 200, r.text
        if r.json()["status"] in FINAL:
            return r.json()
        assert time.monotonic() < deadline, r.json()
        time.sleep(0.05)


def checkpoint_steps(results, rid_prefix: str) -> list[int]:
    return [int(p.name.split(".")[1]) for p in (results / "checkpoints").glob(f"{rid_prefix}*")
            if p.name.endswith(".state")]


def stored_jobs(results, prefix: str) -> list[str]:
    with sqlite3.connect(results / "jobs.db") as db:
        return [r[0] for r in db.execute("SELECT id FROM jobs WHERE id LIKE ?", (prefix + "%",))]


def mp4_frames(raw: bytes) -> np.ndarray:
    with av.open(io.BytesIO(raw)) as box:
        return np.stack([f.to_ndarray(format="rgb24") for f in box.decode(video=0)])


# ----- the store alone -----
def test_the_newest_whole_checkpoint_is_the_resume_point(tmp_path):
    store = JobStore(tmp_path)
    spec = JobSpec(Kind.VIDEO, GenSpec("tiny-t2v", 32, 32, 9, steps=12, prompt="p"))
    job = Job(id="video_a", spec=spec, owner=None, created_at=1.0, request_ids=["video_a-0"],
              deadline=2.0)
    store.add(row_of(job))
    store.save_checkpoint("video_a-0", 4, b"four")
    store.save_checkpoint("video_a-0", 8, b"eight")
    assert store.newest_checkpoint("video_a-0")[0] == 8
    assert sorted(p.name for p in store.checkpoints.iterdir()) == ["video_a-0.8.state"]
    # A crash after the rename and before the row's update: the file is whole, it wins.
    (store.checkpoints / "video_a-0.12.state").write_bytes(b"twelve")
    (store.checkpoints / "video_a-0.16.tmp").write_bytes(b"torn")  # never renamed: ignored
    (store.checkpoints / "video_a-01.20.state").write_bytes(b"another request")
    step, path = store.newest_checkpoint("video_a-0")
    assert (step, path.read_bytes()) == (12, b"twelve")
    (row,) = JobStore(tmp_path).load()  # what a restarted server reads
    assert row.requests == {"video_a-0": (8, None)} and row.status == "queued"


def _write_and_stall(path: str) -> None:
    """A checkpoint write that never finishes: it stalls in fsync (the parent kills it there)."""
    import os

    from genserve.parallel.saver import write_atomic

    os.fsync = lambda fd: time.sleep(600)
    write_atomic(Path(path), bytes(1 << 20))


def test_a_write_killed_half_way_leaves_a_temporary_that_the_next_start_removes(tmp_path):
    """A process SIGKILLed inside a checkpoint write leaves its temporary; the store's next
    start removes it (its writer is dead) but not one whose writer still runs, and the whole
    checkpoint stays the resume point."""
    import multiprocessing as mp
    import os

    store = JobStore(tmp_path)
    store.save_checkpoint("video_k-0", 4, b"four")
    ctx = mp.get_context("fork")
    child = ctx.Process(target=_write_and_stall,
                        args=(str(store.checkpoints / "video_k-0.8.state"),))
    child.start()
    deadline = time.monotonic() + 30
    while not [p for p in store.checkpoints.glob("*.tmp") if p.stat().st_size == 1 << 20]:
        assert time.monotonic() < deadline and child.is_alive(), "the write never started"
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    live = store.checkpoints / f"video_k-0.12.state.{os.getpid()}.1.tmp"  # a writer that runs
    live.write_bytes(b"under way")
    store.close()
    assert len(list(store.checkpoints.glob("*.tmp"))) == 2
    store = JobStore(tmp_path)  # the restart
    assert sorted(p.name for p in store.checkpoints.iterdir()) == sorted(
        ["video_k-0.4.state", live.name])
    step, path = store.newest_checkpoint("video_k-0")
    assert (step, path.read_bytes()) == (4, b"four")


def test_a_damaged_checkpoint_makes_its_request_start_over_not_fail(tmp_path):
    """A checkpoint whose bytes do not load as the request's state at its step (damaged, or
    another request's) is passed over: that request resumes from the start."""
    import types

    from genserve.latency import LatencyModel
    from genserve.models.base import StepState
    from genserve.server.config import ServeConfig
    from genserve.server.service import Service

    cfg = ServeConfig(presets=("wan2.1-1.3b",), results_dir=str(tmp_path))
    store = JobStore(tmp_path)
    gen = GenSpec("wan2.1-1.3b", 480, 832, 81, steps=50, prompt="p")

    def state(rid: str, step: int) -> bytes:
        return StepState(rid, gen.model, 480, 832, 81, 50, 5.0, step, torch.zeros(2), {}, None,
                         {}, torch.zeros(4, dtype=torch.uint8)).to_bytes()

    files = {"video_ok": state("video_ok-0", 8), "video_torn": state("video_torn-0", 8)[:100],
             "video_foreign": state("video_ok-0", 8)}
    for i, (job_id, data) in enumerate(files.items()):
        store.add(row_of(Job(id=job_id, spec=JobSpec(Kind.VIDEO, gen), owner=None,
                             created_at=1.0 + i, request_ids=[f"{job_id}-0"], deadline=2.0)))
        (store.checkpoints / f"{job_id}-0.8.state").write_bytes(data)
    store.close()
    svc = Service(cfg)
    got = {}
    svc.latency = LatencyModel()
    svc.engine = types.SimpleNamespace(now=lambda: 0.0, cancel=lambda rid: None,
                                       submit=lambda r, s=None: got.setdefault(r.id, (r, s)))
    svc._resume_jobs()
    assert {rid: (r.steps_done, s is not None) for rid, (r, s) in got.items()} == {
        "video_ok-0": (8, True), "video_torn-0": (0, False), "video_foreign-0": (0, False)}
    # The engine gets the file, which its workers read (the bytes never pass the driver).
    assert Path(got["video_ok-0"][1]).read_bytes() == files["video_ok"]


# ----- a crash: SIGKILL of the server and its workers -----
@pytest.fixture
def serve(tmp_path):
    """Start `genserve serve` processes on one results dir; every one is killed at the end."""
    procs: list[ServeProcess] = []

    def start(*args: str, **kw) -> ServeProcess:
        procs.append(ServeProcess(tmp_path, *args, **kw))
        return procs[-1]

    yield start
    for p in procs:
        p.close()


def test_a_crash_loses_no_accepted_job_and_resumed_outputs_equal_running_alone(serve):
    t_start = time.monotonic()
    s = serve("--checkpoint-steps", "4", "--log-level", "info")
    print(f"started at {time.monotonic() - t_start:.1f} s")
    http = s.http
    vid_body = {"prompt": "a heron", "steps": 60, "size": "128x128", "frames": 33, "seed": 11}
    vid = http.post("/v1/videos", json=vid_body).json()["id"]
    queued = http.post("/v1/videos", json={**vid_body, "steps": 8, "seed": 12,
                                           "size": "32x32", "frames": 9}).json()["id"]
    deadline = time.monotonic() + 60
    while not [k for k in checkpoint_steps(s.results, vid) if k >= 8]:  # it ran a while
        assert time.monotonic() < deadline, s.output()[-3000:]
        time.sleep(0.02)
    # an image request (blocking), with a key to retry it by; ~2 s of work per image
    img_body = {"prompt": "a fox", "steps": 300, "size": "64x64", "n": 2, "seed": 21}
    key = {"Idempotency-Key": "fox-1"}
    first: dict = {}
    t = threading.Thread(target=lambda: first.setdefault("r", _post_ignoring_errors(
        s, "/v1/images/generations", img_body, key)))
    t.start()
    while not stored_jobs(s.results, "img_"):  # accepted
        assert time.monotonic() < deadline and "r" not in first, s.output()[-3000:]
        time.sleep(0.02)
    time.sleep(0.3)
    print(f"crash at {time.monotonic() - t_start:.1f} s")
    s.crash()
    t.join(30)
    assert first["r"] is None  # its connection died with the server

    s2 = serve("--checkpoint-steps", "4", "--log-level", "info", log_name="serve2.log")
    try:
        print(f"restarted at {time.monotonic() - t_start:.1f} s")
        # every accepted job is known (never 404), and completes
        v = wait_final(s2.http, f"/v1/videos/{vid}")
        assert v["status"] == "completed", v
        assert wait_final(s2.http, f"/v1/videos/{queued}")["status"] == "completed"
        print(f"videos done at {time.monotonic() - t_start:.1f} s")
        resumed = re.search(rf"resumed job {vid}: {vid}-0 at step (\d+)", s2.output())
        assert resumed and int(resumed.group(1)) >= 8, s2.output()[-3000:]
        # the client retries its image request with the same key: the same job, not a second
        again = s2.http.post("/v1/images/generations", json=img_body, headers=key, timeout=120)
        assert again.status_code == 200, again.text
        images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))))
                  for d in again.json()["data"]]
        mp4 = s2.http.get(f"/v1/videos/{vid}/content").content
        print(f"all done at {time.monotonic() - t_start:.1f} s")
    finally:
        s2.close()
    jobs = {p.name for p in s2.results.iterdir() if p.name.startswith("img_")}
    assert jobs == {again.json()["id"]}, jobs  # one image job: the retry made none

    # Outputs: within 1 (uint8) of each request run alone, start to finish, in one process.
    t2i, t2v = load_preset("tiny-t2i"), load_preset("tiny-t2v")
    for i, got in enumerate(images):
        ref = t2i.generate(GenRequest("ref", GenSpec("tiny-t2i", 64, 64, steps=300,
                                                     seed=21 + i, prompt="a fox")))
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    ref = t2v.generate(GenRequest("ref", GenSpec("tiny-t2v", 128, 128, 33, steps=60, seed=11,
                                                 prompt="a heron")))
    # MP4 is lossy: compare with the reference through the same encoder; another seed is far.
    other = t2v.generate(GenRequest("ref", GenSpec("tiny-t2v", 128, 128, 33, steps=60, seed=12,
                                                   prompt="a heron")))
    got, want = mp4_frames(mp4).astype(float), mp4_frames(encode_mp4(ref)).astype(float)
    near, far = (np.abs(got - x).mean() for x in (want, mp4_frames(encode_mp4(other))))
    assert near < 0.5 and far > 4 * near, (near, far)


def _post_ignoring_errors(s: ServeProcess, path: str, body: dict, headers: dict):
    import httpx

    try:
        return httpx.post(s.url + path, json=body, headers=headers, timeout=120)
    except httpx.TransportError:
        return None


# ----- a stop with work left, then a start that cannot resume it -----
def test_work_left_by_a_drain_timeout_is_kept_and_fails_with_a_reason_if_it_cannot_resume(
        serve):
    s = serve("--drain-timeout", "1")
    vid = s.http.post("/v1/videos", json={"prompt": "endless", "steps": 1000, "size": "128x128",
                                          "frames": 33}).json()["id"]
    time.sleep(0.5)
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(60) == 0, s.output()
    s2 = serve("--models", "tiny-t2i", log_name="serve2.log")
    try:
        v = s2.http.get(f"/v1/videos/{vid}")
        assert v.status_code == 200, v.text
        v = wait_final(s2.http, f"/v1/videos/{vid}", timeout=30)
        assert v["status"] == "failed" and v["error"]["code"] == "server_restarted", v
        assert "tiny-t2v" in v["error"]["message"]
    finally:
        s2.close()
