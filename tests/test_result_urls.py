"""`response_format: "url"`: an image's answer links to `GET /v1/files/{id}` on this server,
readable with the owner's key until the job's `expires_at` (the result TTL), 404 for another key
and after the TTL.  Acceptance test with the official openai client on a live server (tiny
presets, two keys, a TTL of a few seconds)."""

from __future__ import annotations

import io
import time

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
Image = pytest.importorskip("PIL.Image")

from genserve.server.app import create_app
from genserve.server.config import ServeConfig

from _serve import Uvicorn, assert_error

pytestmark = pytest.mark.usefixtures("forked_worker_pools")
TTL = 4.0


@pytest.fixture(scope="module")
def server(forked_worker_pools, tmp_path_factory):
    cfg = ServeConfig(workers=2, results_dir=str(tmp_path_factory.mktemp("res")),
                      api_keys=("k1", "k2"), result_ttl_s=TTL)
    with Uvicorn(create_app(cfg), health=True) as s:
        yield s


def client(server, key: str):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_url_results_owner_only_until_the_ttl(server):
    with client(server, "k1") as oai:
        raw = oai.images.with_raw_response.generate(
            model="tiny-t2i", prompt="a red fox", n=2, size="32x48", response_format="url",
            extra_body={"steps": 2, "seed": 5})
    got = raw.parse()
    body = raw.http_response.json()
    assert len(got.data) == 2 and all(d.b64_json is None for d in got.data)
    expires = body["expires_at"]
    assert body["created"] <= expires <= time.time() + TTL + 1
    urls = [d.url for d in got.data]
    assert len(set(urls)) == 2
    for url in urls:  # absolute, on this server
        assert url.startswith(server.url + "/v1/files/"), url

    with httpx.Client(timeout=30) as h:
        for url in urls:
            r = h.get(url, headers=bearer("k1"))
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            assert Image.open(io.BytesIO(r.content)).size == (32, 48)
            assert h.head(url, headers=bearer("k1")).status_code == 200
            assert_error(h.get(url, headers=bearer("k2")), 404, code="not_found")
            assert_error(h.get(url), 401)
        # the job says when they go, as the answer did
        job = h.get(f"{server.url}/v1/jobs/{body['id']}", headers=bearer("k1")).json()
        assert job["expires_at"] == expires and job["status"] == "completed"
        # a file the job does not have
        assert_error(h.get(f"{server.url}/v1/files/{body['id']}-2", headers=bearer("k1")), 404)
        assert_error(h.get(f"{server.url}/v1/files/nope", headers=bearer("k1")), 404)

        time.sleep(max(0.0, expires - time.time()) + 1.1)
        for url in urls:
            assert_error(h.get(url, headers=bearer("k1")), 404, code="not_found")
        assert_error(h.get(f"{server.url}/v1/jobs/{body['id']}", headers=bearer("k1")), 404)


def test_b64_json_stays_the_default_and_says_when_it_expires(server):
    with client(server, "k2") as oai:
        raw = oai.images.with_raw_response.generate(model="tiny-t2i", prompt="a cat",
                                                    size="16x16", extra_body={"steps": 1})
    body = raw.http_response.json()
    assert body["data"][0]["b64_json"] and "url" not in body["data"][0]
    assert body["expires_at"] >= body["created"]


def test_every_video_and_job_object_carries_expires_at(server):
    """Null while it runs, the unix time it goes once it ended; on every object the API
    returns (create, get, list, job, cancel)."""
    with httpx.Client(base_url=server.url, headers=bearer("k1"), timeout=30) as h:
        v = h.post("/v1/videos", json={"prompt": "w", "steps": 1, "size": "16x16",
                                       "frames": 1}).json()
        objects = [v]
        deadline = time.monotonic() + 60
        while (got := h.get(f"/v1/videos/{v['id']}").json())["status"] not in ("completed",
                                                                                  "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        objects += [got, h.get(f"/v1/jobs/{v['id']}").json(),
                    h.delete(f"/v1/jobs/{v['id']}").json(),
                    *h.get("/v1/videos").json()["data"]]
        for obj in objects:
            assert "expires_at" in obj, obj
        assert got["expires_at"] is not None and got["expires_at"] >= got["completed_at"]
