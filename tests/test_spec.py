"""One generation spec: the HTTP job, the scheduler's request, the worker message and the trace all
carry the same `GenSpec`, and none of them copies its fields."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from genserve.engine.backend import WorkerBackend
from genserve.parallel.protocol import New
from genserve.request import Kind, Request
from genserve.server.schemas import ImageBody, VideoBody, to_spec
from genserve.server.jobs import Job, job_of_row, row_of
from genserve.server.store import JobStore
from genserve.spec import GenSpec

ROOT = Path(__file__).resolve().parents[1]


def test_the_spec_is_frozen_and_the_request_reads_it_without_copying():
    spec = GenSpec("sd3-medium", 512, 768, steps=10, guidance=7.0, seed=3, prompt="a fox")
    r = Request("a", Kind.IMAGE, spec)
    assert r.spec is spec
    assert (r.model, r.height, r.width, r.frames, r.steps, r.guidance, r.seed, r.prompt) == (
        "sd3-medium", 512, 768, 1, 10, 7.0, 3, "a fox")
    assert r.shape == spec.batch_key
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.steps = 20
    with pytest.raises(AttributeError):
        r.steps = 20  # a request's spec is read-only through the request too
    # No field of the spec is repeated on the request.
    assert not {f.name for f in dataclasses.fields(GenSpec)} & {
        f.name for f in dataclasses.fields(Request)}


def test_the_batch_key_counts_classifier_free_guidance():
    on = GenSpec("sd3-medium", 512, 512, guidance=5.0)
    off = dataclasses.replace(on, guidance=1.0)
    assert on.batch_key != off.batch_key
    assert on.batch_key == dataclasses.replace(on, seed=9, prompt="other").batch_key
    # FLUX has no CFG pass: its guidance is an embedding, any value batches together.
    flux = GenSpec("flux-dev", 512, 512, guidance=3.5)
    assert flux.batch_key == dataclasses.replace(flux, guidance=1.0).batch_key


def test_the_spec_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import genserve.spec, genserve.request, genserve.parallel.protocol\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_the_http_body_becomes_one_spec_that_the_job_store_keeps(tmp_path):
    served = ("tiny-t2i", "tiny-t2v")
    img, _ = to_spec(ImageBody(prompt="a fox", model="tiny-t2i", n=3, seed=11, size="64x64"),
                     Kind.IMAGE, served, 4, 16)
    assert img.gen == GenSpec("tiny-t2i", 64, 64, 1, 8, 5.0, 11, prompt="a fox") and img.n == 3
    vid, _ = to_spec(VideoBody(prompt="a river", model="tiny-t2v", seconds="1", seed=2),
                     Kind.VIDEO, served, 4, 16)
    assert vid.gen.frames == 17 and vid.seconds == "1"
    store = JobStore(tmp_path)
    for i, spec in enumerate((img, dataclasses.replace(
            vid, gen=dataclasses.replace(vid.gen, negative_prompt="blur")))):
        job = Job(id=f"j{i}", spec=spec, owner=None, created_at=1.0 + i, request_ids=[f"j{i}-0"],
                  deadline=0.0)
        store.add(row_of(job))
    assert [job_of_row(row).spec for row in store.load()] == [img, dataclasses.replace(
        vid, gen=dataclasses.replace(vid.gen, negative_prompt="blur"))]


def test_a_new_request_reaches_its_worker_as_its_own_spec():
    spec = GenSpec("tiny-t2v", 32, 32, 9, steps=4, seed=5, prompt="a heron",
                   negative_prompt="blurry")
    r = Request("v", Kind.VIDEO, spec)
    backend = WorkerBackend.__new__(WorkerBackend)  # `_source` reads only its host checkpoints
    backend.host = {}
    member = backend._source(r, (0,), 0.0)
    assert member == New("v", spec) and member.spec is spec


def test_a_trace_keeps_its_format_and_carries_a_negative_prompt_only_when_there_is_one():
    plain = Request("a", Kind.IMAGE, GenSpec("sd3-medium", 512, 512, prompt="p"), deadline=9.0)
    d = plain.to_trace()
    assert set(d) == {"id", "model", "kind", "height", "width", "frames", "steps", "guidance",
                      "seed", "prompt", "arrival", "deadline", "standalone"}
    neg = Request("b", Kind.IMAGE, GenSpec("sd3-medium", 512, 512, negative_prompt="dark"))
    assert Request.from_trace(json.loads(json.dumps(neg.to_trace()))).spec == neg.spec
    assert Request.from_trace(d).spec == plain.spec
