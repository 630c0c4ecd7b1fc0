"""`genserve serve --emulate`: the HTTP server over 8 emulated H200s, time-scaled, answering the
official `openai` client for every real model name with outputs of the requested size."""

from __future__ import annotations

import io
import json
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
av = pytest.importorskip("av")
Image = pytest.importorskip("PIL.Image")

from genserve.catalog import MODELS
from genserve.cli import EMULATED_MODELS, main
from genserve.server.app import create_app
from genserve.server.config import ServeConfig

from _serve import Uvicorn

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the openai videos API

SCALE = 50.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = ServeConfig(presets=EMULATED_MODELS, workers=8, emulate="h200", time_scale=SCALE,
                      results_dir=str(tmp_path_factory.mktemp("res")))
    with Uvicorn(create_app(cfg), health=True) as s:
        yield s


@pytest.fixture(scope="module")
def oai(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    yield c
    c.close()


def test_models_are_the_real_ones(oai, server):
    assert [m.id for m in oai.models.list()] == list(EMULATED_MODELS)
    health = httpx.get(server.url + "/health").json()
    assert health["workers"] == 8 and health["status"] == "ok"


@pytest.mark.parametrize("model,size", [("sd3-medium", "1024x1024"), ("sd3-medium", "512x768"),
                                        ("flux-dev", "1024x1024")])
def test_images_of_the_requested_size(oai, model, size):
    t0 = time.monotonic()
    res = oai.images.generate(model=model, prompt="a red fox in snow", size=size)
    wall = time.monotonic() - t0
    w, h = (int(x) for x in size.split("x"))
    im = Image.open(io.BytesIO(__import__("base64").b64decode(res.data[0].b64_json)))
    assert im.size == (w, h) and im.format == "PNG"
    # Time-scaled: the profile's standalone time (seconds on an H200) in a fiftieth of it.
    assert wall < 30


def test_the_policys_latency_correction_is_exported(oai, server):
    oai.images.generate(model="sd3-medium", prompt="x", size="1024x1024")
    text = httpx.get(server.url + "/metrics").text
    got = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
           for line in text.splitlines() if line.startswith("genserve_latency_correction{")}
    assert set(got) == {f'model="{m}"' for m in EMULATED_MODELS}
    # What the policy plans with now.  (Not near 1 here: at time scale 50 a wall millisecond of
    # the engine's own cost is 50 trace ms, and the steps' share absorbs where the calibrated cost
    # per quantum is off for this shape.)
    lat = server.svc.latency
    assert lat.observations >= 1 and got['model="sd3-medium"'] > 0
    assert got == {f'model="{m}"': lat.estimate(m) for m in EMULATED_MODELS}


@pytest.mark.parametrize("model", ["wan2.1-1.3b", "wan2.1-14b"])
def test_videos_of_the_requested_size_and_length(oai, model):
    v = oai.videos.create(model=model, prompt="a fox running", seconds="2", size="832x480")
    deadline = time.monotonic() + 120
    while v.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        v = oai.videos.retrieve(v.id)
    assert v.status == "completed", v
    data = oai.videos.download_content(v.id).read()
    with av.open(io.BytesIO(data)) as box:
        frames = [f for f in box.decode(video=0)]
    assert (frames[0].width, frames[0].height) == (832, 480)
    assert len(frames) == 2 * 16 + 1  # 2 s at 16 fps, 4k+1 frames (Wan's VAE)


def test_deadlines_and_estimates_run_on_the_scaled_clock(server):
    """A job's deadline (Unix time) is its SLO in wall seconds: the trace's SLO over the scale."""
    r = httpx.post(server.url + "/v1/videos", json={"model": "wan2.1-1.3b", "prompt": "x",
                                                    "seconds": "2", "size": "832x480"},
                   timeout=30)
    assert r.status_code == 200, r.text
    job = server.svc.jobs[r.json()["id"]]
    alone = server.svc._standalone(job.spec.kind, job.spec.gen)
    slo = server.svc.cfg.slo_scale * alone
    assert job.deadline - job.created_at == pytest.approx(slo / SCALE, rel=1e-6)
    assert slo / SCALE < 30  # what the client waits for, in wall seconds


@pytest.mark.parametrize("args,needle", [
    (["serve", "--gpus", "8"], "need --emulate"),
    (["serve", "--time-scale", "5"], "need --emulate"),
    (["serve", "--emulate", "--gpus", "8", "--nodes", "3"], "divide evenly"),
    (["serve", "--emulate", "--workers", "4"], "--gpus"),
    (["serve", "--emulate", "--time-scale", "0"], "--time-scale 0"),
    (["serve", "--emulate", "no-such-profile"], "no-such-profile"),
    (["replay", "t.jsonl", "--gpus", "8"], "need --emulate"),
])
def test_emulate_flag_errors_are_one_line(args, needle, capsys, tmp_path):
    if args[0] == "replay":
        t = tmp_path / "t.jsonl"
        t.write_text(json.dumps({"meta": {}}) + "\n" + json.dumps(
            {"id": "r0", "model": "sd3-medium", "kind": "image", "height": 512, "width": 512,
             "arrival": 0.0, "deadline": 10.0}) + "\n")
        args = [args[0], str(t), *args[2:]]
    if "no-such-profile" in args:
        args += ["--port", "1"]  # never reached: the profile fails first
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_emulated_model_names_are_the_catalogs_real_ones():
    """By default the evaluation protocol's four; every real model of the catalog can be
    emulated, with its measured or estimated step times."""
    from genserve.latency import LatencyModel

    assert set(EMULATED_MODELS) <= {m for m, spec in MODELS.items() if not spec.tiny}
    lat = LatencyModel("h200")
    assert {m for m, spec in MODELS.items() if not spec.tiny} <= set(lat.models)
