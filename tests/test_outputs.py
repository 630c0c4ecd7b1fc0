"""Outputs encoded where they are made: workers send PNG / MP4 files, never frames, to the driver.

The encoder thread on its own (no pool), then the engine over two CPU workers with
`output=OutputFormat(...)`: the bytes that reach the driver are the files' (an MP4's size, not
frames x H x W x 3), a PNG decodes to exactly the request's output alone, the GPU is free for the
next job while an output is encoded, and a worker killed while encoding (or an encode that fails)
loses nothing it should not: the request runs again from its checkpoint (or fails alone).
"""

from __future__ import annotations

import queue
import time
import types
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("av")

from genserve.engine import Engine  # noqa: E402
from genserve.latency import LatencyModel  # noqa: E402
from genserve.models import GenRequest, load_preset  # noqa: E402
from genserve.models.output import MP4, PNG, Encoded  # noqa: E402
from genserve.parallel.protocol import Output, OutputFormat  # noqa: E402
from genserve.parallel.workers import WorkerPool  # noqa: E402
from genserve.policies import Plan, Policy  # noqa: E402
from genserve.policies.base import Assignment  # noqa: E402
from genserve.profiler import profile_workers, write_profile  # noqa: E402
from genserve.request import Kind, Request, Status  # noqa: E402
from genserve.spec import GenSpec  # noqa: E402

PRESETS = ("tiny-t2i", "tiny-t2v")
SLOW_S = 1.5
FAULTS = {  # keyed by request ids only one test uses; on worker 0, which the tests pin them to
    "enc-kill": {"kind": "exit", "step": "encode", "seconds": 0.5, "rank": 0},
    "enc-err": {"kind": "error", "step": "encode", "rank": 0},
    "enc-slow": {"kind": "slow", "step": "encode", "seconds": SLOW_S, "rank": 0},
}  # (the kill waits 0.5 s: its run's result is back by then, so the request is held, not in a job)
FMT = OutputFormat(fps=8)


# ----- the encoder thread alone -----
# Workers fork from the tests' fork server (tests/_spawn.py); test_engine_acceptance and the
# serve processes of test_server_drain keep the production spawn path covered.
pytestmark = pytest.mark.usefixtures("forked_worker_pools")


def test_the_encoder_thread_sends_files_and_errors_as_outputs():
    from genserve.parallel.worker_main import Encoder

    box: queue.SimpleQueue = queue.SimpleQueue()
    worker = types.SimpleNamespace(rank=0, spec=types.SimpleNamespace(faults={}), outbox=box)
    enc = Encoder(worker)
    enc.start()
    img = (np.arange(40 * 24 * 3) % 251).astype(np.uint8).reshape(40, 24, 3)
    vid = np.zeros((5, 16, 16, 3), np.uint8)
    enc.todo.put(("i", img, FMT))
    enc.todo.put(("bad", img.astype(np.float32), FMT))
    enc.todo.put(("v", vid, FMT))
    got = [box.get(timeout=30) for _ in range(3)]
    assert [o.rid for o in got] == ["i", "bad", "v"]  # in the order decoded
    i, bad, v = got
    assert isinstance(i, Output) and i.media_type == PNG and i.error is None
    assert np.array_equal(Encoded(i.data, i.media_type).decode(), img)  # PNG: exact
    assert bad.data == b"" and bad.error.startswith("encode: ValueError"), bad
    assert v.media_type == MP4 and v.data[4:8] == b"ftyp"
    assert Encoded(v.data, v.media_type).decode().shape == vid.shape


# ----- through the engine -----
@pytest.fixture(scope="module")
def pool(forked_worker_pools):
    with WorkerPool(PRESETS, 2, faults=FAULTS, collective_timeout_s=20) as p:
        yield p


@pytest.fixture(scope="module")
def latency(pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs-prof")
    write_profile(out, "local", *profile_workers(list(PRESETS), batches=(1, 2), reps=1,
                                                 pool=pool))
    return LatencyModel(out)


class Fifo(Policy):
    """One request per assignment, oldest first, on GPU `gpu` (None: the lowest free), `chunk`
    steps at a time (None: all it has left)."""

    name = "fifo-pinned"

    def __init__(self, gpu: int | None = 0, chunk: int | None = None):
        super().__init__()
        self.gpu, self.chunk = gpu, chunk

    def schedule(self, s):
        plan = Plan()
        free = sorted(s.free_gpus)
        for r in sorted(s.queue, key=lambda r: (r.arrival, r.id)):
            g = self.gpu if self.gpu is not None else (free[0] if free else None)
            if g not in free:
                break
            free.remove(g)
            n = min(self.chunk or r.remaining_steps, r.remaining_steps)
            plan.assignments.append(Assignment((g,), (r.id,), n))
        return plan


def image(rid: str, arrival: float = 0.0) -> Request:
    return Request(rid, Kind.IMAGE,
                   GenSpec("tiny-t2i", 64, 64, steps=4, seed=zlib.crc32(rid.encode()) % 1000,
                           prompt=f"image {rid}"), arrival=arrival)


def video(rid: str, steps: int = 8, like: str | None = None) -> Request:
    """`like`: the same prompt and seed as the video of that id (the same output)."""
    key = like or rid
    return Request(rid, Kind.VIDEO,
                   GenSpec("tiny-t2v", 32, 32, frames=9, steps=steps,
                           seed=zlib.crc32(key.encode()) % 1000, prompt=f"video {key}"))


def alone(r: Request) -> np.ndarray:
    torch.set_num_threads(1)
    return load_preset(r.model).generate(GenRequest(r.id, r.spec))


def ended_once(r: Request, status: Status) -> bool:
    got = [s for _, s in r.history]
    return got[-1] is status and sum(s.is_final for s in got) == 1


def test_only_the_files_cross_the_driver(pool, latency):
    """A finished video's bytes through the driver are its MP4's size; run raw, the same video
    brings frames x H x W x 3.  An image comes as a PNG that decodes to exactly its output."""
    vid, img = video("out-vid"), image("out-img")
    res = Engine(Fifo(gpu=None), pool, latency, output=FMT).run([vid, img])
    assert ended_once(vid, Status.FINISHED) and ended_once(img, Status.FINISHED)
    mp4, png = res.outputs[vid.id], res.outputs[img.id]
    assert (mp4.media_type, png.media_type) == (MP4, PNG)
    assert res.output_bytes == len(mp4.data) + len(png.data)
    assert np.array_equal(png.decode(), alone(img))

    raw_vid = video("out-vid-raw", like=vid.id)
    raw = Engine(Fifo(gpu=None), pool, latency).run([raw_vid])
    frames = raw.outputs[raw_vid.id]
    assert frames.shape == (9, 32, 32, 3) and raw.output_bytes == frames.nbytes == 9 * 32 * 32 * 3
    solo = Engine(Fifo(gpu=None), pool, latency, output=FMT).run([video("out-vid2",
                                                                        like=vid.id)])
    assert solo.output_bytes == len(solo.outputs["out-vid2"].data) != frames.nbytes
    back = mp4.decode()  # lossy (crf 18, chroma halved: ~4 levels on this noisy 32x32 video)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 8


def test_the_gpu_runs_the_next_job_while_an_output_is_encoded(pool, latency):
    """The video's encode takes 1.5 s longer (a test hook); the image queued behind it on the
    same GPU starts as soon as the video's run is done, and finishes first."""
    vid, img = video("enc-slow"), image("slow-img", arrival=0.01)
    res = Engine(Fifo(gpu=0), pool, latency, output=FMT).run([vid, img])
    assert ended_once(vid, Status.FINISHED) and ended_once(img, Status.FINISHED)
    (v_start, v_end, _), = res.timeline[vid.id]
    (i_start, _, gpus), = res.timeline[img.id]
    assert gpus == (0,) and i_start >= v_end
    assert vid.finish_time - v_end >= SLOW_S - 0.1  # held off the GPU while encoded
    assert i_start < vid.finish_time - 1.0 and img.finish_time < vid.finish_time


def test_an_encode_that_fails_fails_that_request_alone(pool, latency):
    bad, ok = video("enc-err"), image("err-img")
    res = Engine(Fifo(gpu=0), pool, latency, output=FMT).run([bad, ok])
    assert ended_once(bad, Status.FAILED) and ended_once(ok, Status.FINISHED)
    assert bad.reason.startswith("encode: _Fault: injected error while encoding"), bad.reason
    assert bad.id not in res.outputs and res.output_bytes == len(res.outputs[ok.id].data)


def test_a_worker_killed_while_encoding_reruns_the_request_from_its_checkpoint(pool, latency):
    """12 steps in quanta of 4 on GPU 0, checkpoints at steps 4 and 8; worker 0 dies while it
    encodes the output.  The video goes back to step 8 (or 4, if the worker died before its saver
    thread reported 8), runs the steps from there again on the new worker 0, and finishes once,
    with its output."""
    vid = video("enc-kill", steps=12)
    reported: list[int] = []
    res = Engine(Fifo(gpu=0, chunk=4), pool, latency, checkpoint_every=4, output=FMT,
                 on_checkpoint=lambda rid, steps, saved: reported.append(steps)).run([vid])
    assert ended_once(vid, Status.FINISHED), vid.history
    assert res.restarts == 1 and res.recovered == 1
    assert Status.PREEMPTED in [s for _, s in vid.history]  # rolled back, then run again
    # Steps 0-4, 4-8, 8-12, then 8-12 again (from 4: 4-8 and 8-12 again).
    again = len(res.timeline[vid.id]) - 3
    assert again in (1, 2) and 12 - 4 * again in reported, (res.timeline[vid.id], reported)
    out = res.outputs[vid.id]
    assert out.media_type == MP4 and res.output_bytes == len(out.data)
    assert out.decode().shape == (9, 32, 32, 3)

    deadline = time.monotonic() + 60  # the pool is whole again for whoever comes next
    while not pool.ready():
        assert time.monotonic() < deadline, "the replacement worker did not start"
        time.sleep(0.1)
    assert pool.alive() == [0, 1]


# ----- the server's side: files to disk, images answered from memory -----
def test_the_service_writes_the_workers_files_and_answers_images_from_memory(tmp_path):
    """No engine: `_write` as the writer thread calls it with what the engine hands over.  The
    files land on disk and in the job store (a new service reads them back), the synchronous answer
    takes the PNGs from memory (even with the files gone), once; a file of the wrong kind fails
    the job."""
    from genserve.models.output import encode
    from genserve.server.config import ServeConfig
    from genserve.server.jobs import Job, JobSpec, row_of
    from genserve.server.service import Service

    svc = Service(ServeConfig(results_dir=str(tmp_path)))
    svc.engine = types.SimpleNamespace(cancel=lambda rid: None)  # what `_fail` calls
    spec = JobSpec(Kind.IMAGE, GenSpec("tiny-t2i", 16, 16, 1, 4, 5.0, 0, prompt="p"), n=2)
    job = Job(id="img_mem", spec=spec, owner=None, created_at=time.time(),
              request_ids=["img_mem-0", "img_mem-1"], deadline=0.0)
    svc.jobs[job.id] = job
    svc.store.add(row_of(job))
    pngs = [encode(np.full((16, 16, 3), v, np.uint8)) for v in (10, 200)]
    svc._write(job, "img_mem-1", pngs[1])
    assert job.status == "queued" and job.files == ["1.png"]
    svc._write(job, "img_mem-0", pngs[0])
    assert job.status == "completed" and job.files == ["0.png", "1.png"]
    folder = tmp_path / job.id
    assert [(folder / f).read_bytes() for f in job.files] == [p.data for p in pngs]
    for f in job.files:
        (folder / f).unlink()  # the answer does not read them back
    assert svc.take_images(job) == {"0.png": pngs[0].data, "1.png": pngs[1].data}
    assert svc.take_images(job) == {}  # they left memory with the answer

    svc._writer.shutdown(wait=True)  # what the writer recorded is in the store
    again = Service(ServeConfig(results_dir=str(tmp_path)))  # a restart: the store is enough
    assert again.jobs[job.id].status == "completed" and again.jobs[job.id].files == job.files

    vid = Job(id="video_wrong",
              spec=JobSpec(Kind.VIDEO, GenSpec("tiny-t2v", 16, 16, 5, 4, 5.0, 0, prompt="p")),
              owner=None, created_at=time.time(), request_ids=["video_wrong-0"], deadline=0.0)
    svc._write(vid, "video_wrong-0", pngs[0])
    assert vid.status == "failed" and vid.error["code"] == "output_error", vid.error
    assert not (tmp_path / vid.id / "video.mp4").exists()
