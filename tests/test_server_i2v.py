"""Image-to-video over HTTP: `input_reference` on `POST /v1/videos`.

A live server serves tiny-i2v next to the default presets (two CPU workers): the official `openai`
client uploads the image as a multipart file, JSON bodies carry it as a base64 data: URL (or
OpenAI's `{"image_url": ...}`), and every bad input image is a 400 naming `input_reference`.
An emulated server (no torch in its workers) takes the real wan2.1-i2v-14b with an image.
"""

from __future__ import annotations

import base64
import io
import re
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
av = pytest.importorskip("av")
Image = pytest.importorskip("PIL.Image")

from genserve.server.app import create_app  # noqa: E402
from genserve.server.config import ServeConfig  # noqa: E402

from _serve import Uvicorn, assert_error  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # the videos API
              pytest.mark.usefixtures("forked_worker_pools")]

FINAL = ("completed", "failed")


def image_bytes(color=(200, 40, 40), size=(40, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def data_url(raw: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(raw).decode()}"


@pytest.fixture(scope="module")
def server(forked_worker_pools, tmp_path_factory):
    cfg = ServeConfig(presets=("tiny-t2i", "tiny-t2v", "tiny-i2v"), workers=2,
                      results_dir=str(tmp_path_factory.mktemp("res")))
    with Uvicorn(create_app(cfg), health=True) as s:
        yield s


def finished(http, video_id: str, timeout: float = 60.0) -> bytes:
    """The MP4 of a video once completed."""
    deadline = time.monotonic() + timeout
    while True:
        v = http.get(f"/v1/videos/{video_id}").json()
        if v["status"] in FINAL:
            break
        assert time.monotonic() < deadline, v
        time.sleep(0.05)
    assert v["status"] == "completed", v["error"]
    return http.get(f"/v1/videos/{video_id}/content").content


def frames(mp4: bytes) -> list:
    with av.open(io.BytesIO(mp4)) as box:
        return [f.to_ndarray(format="rgb24") for f in box.decode(video=0)]


def test_models_say_which_take_an_image(http):
    caps = {m["id"]: m["capabilities"] for m in http.get("/v1/models").json()["data"]}
    assert caps["tiny-i2v"]["image_input"] == "required"
    assert caps["tiny-t2v"]["image_input"] == caps["tiny-t2i"]["image_input"] == "none"


def test_openai_client_uploads_the_image_and_json_data_url_gives_the_same_video(oai, http,
                                                                               tmp_path):
    """The openai client sends `input_reference` as a multipart file part; the same image as a
    data: URL in JSON (and as {"image_url": ...}) reaches the model as the same pixels: the
    same video.  Another image gives another video."""
    path = tmp_path / "first.jpg"
    path.write_bytes(image_bytes(fmt="JPEG"))
    with open(path, "rb") as fh:
        v = oai.videos.create(model="tiny-i2v", prompt="a red ball rolls", size="32x32",
                              input_reference=fh, extra_body={"steps": 2, "seed": 7})
    assert v.status in ("queued", "in_progress") and v.model == "tiny-i2v"
    uploaded = finished(http, v.id)
    got = frames(uploaded)
    assert len(got) == 9 and got[0].shape == (32, 32, 3)  # tiny-i2v's default: 9 frames

    body = {"model": "tiny-i2v", "prompt": "a red ball rolls", "size": "32x32", "steps": 2,
            "seed": 7}
    as_json = http.post("/v1/videos", json={**body, "input_reference": data_url(
        path.read_bytes(), "image/jpeg")})
    as_object = http.post("/v1/videos", json={**body, "input_reference": {
        "image_url": data_url(path.read_bytes())}})
    other = http.post("/v1/videos", json={**body, "input_reference": data_url(
        image_bytes((20, 20, 220)))})
    for r in (as_json, as_object, other):
        assert r.status_code == 200, r.text
    assert finished(http, as_json.json()["id"]) == uploaded
    assert finished(http, as_object.json()["id"]) == uploaded
    assert finished(http, other.json()["id"]) != uploaded


def _form(**files) -> dict:
    return {"model": (None, "tiny-i2v"), "prompt": (None, "x"), "steps": (None, "2"), **files}


BAD_JSON = [
    ({"model": "tiny-i2v"}, "is required"),
    ({"model": "tiny-t2v", "input_reference": data_url(image_bytes())}, "takes no input image"),
    ({"model": "tiny-i2v", "input_reference": "https://example.com/cat.png"}, "not fetched"),
    ({"model": "tiny-i2v", "input_reference": {"image_url": "http://10.0.0.1/x.png"}},
     "not fetched"),
    ({"model": "tiny-i2v", "input_reference": {"file_id": "file_abc"}}, "file ids"),
    ({"model": "tiny-i2v", "input_reference": {"url": "x"}}, "image_url"),
    ({"model": "tiny-i2v", "input_reference": 5}, "data: URL"),
    ({"model": "tiny-i2v", "input_reference": "data:image/png;base64,!!!"}, "base64"),
    ({"model": "tiny-i2v", "input_reference": data_url(b"plain text", "text/plain")},
     "send an image"),
    ({"model": "tiny-i2v", "input_reference": data_url(b"plain text")}, "not an image"),
    ({"model": "tiny-i2v", "input_reference": data_url(image_bytes(fmt="GIF"), "image/gif")},
     "GIF images are not accepted"),
]


@pytest.mark.parametrize("fields,why", BAD_JSON)
def test_bad_input_reference_in_json_is_400_naming_it(http, fields, why):
    r = http.post("/v1/videos", json={"prompt": "x", "steps": 2, **fields})
    err = assert_error(r, 400, param="input_reference")
    assert why in err["message"], err


BAD_FILES = [
    (("a.png", b"hello, not an image", "image/png"), "not an image"),
    (("a.gif", image_bytes(fmt="GIF"), "image/gif"), "GIF images are not accepted"),
    (("a.png", image_bytes()[:50], "image/png"), "decoded|unreadable"),
    (("a.png", image_bytes(size=(9000, 1)), "image/png"), "too large"),
    (("a.png", b"", "image/png"), "empty"),
]


@pytest.mark.parametrize("file,why", BAD_FILES)
def test_bad_uploaded_file_is_400_naming_input_reference(http, file, why):
    r = http.post("/v1/videos", files=_form(input_reference=file))
    err = assert_error(r, 400, param="input_reference")
    assert re.search(why, err["message"]), err


def test_an_image_for_a_text_to_video_model_is_400(http):
    files = {**_form(input_reference=("a.png", image_bytes(), "image/png")),
             "model": (None, "tiny-t2v")}
    err = assert_error(http.post("/v1/videos", files=files), 400, param="input_reference")
    assert "takes no input image" in err["message"]


def test_an_image_for_ti2v_is_400_while_its_image_mode_is_not_served():
    """Wan2.2 TI2V-5B runs as text-to-video here: an image would be silently ignored."""
    from genserve.request import Kind
    from genserve.server.schemas import VideoBody, parse, to_spec
    from genserve.server.service import ApiError

    body = parse(VideoBody, {"prompt": "p", "model": "wan2.2-ti2v-5b"}, 100)
    with pytest.raises(ApiError) as e:
        to_spec(body, Kind.VIDEO, ("wan2.2-ti2v-5b",), 4, 24, image_bytes())
    assert e.value.param == "input_reference" and "takes no input image" in e.value.message


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    cfg = ServeConfig(presets=("wan2.1-i2v-14b",), workers=4, emulate="h200", time_scale=50.0,
                      results_dir=str(tmp_path_factory.mktemp("emu")))
    with Uvicorn(create_app(cfg), health=True) as s:
        yield s


def test_emulated_server_takes_wan_i2v_with_an_image(emulated, tmp_path):
    path = tmp_path / "first.png"
    path.write_bytes(image_bytes(size=(1000, 600)))
    with openai.OpenAI(base_url=emulated.url + "/v1", api_key="x", max_retries=0,
                       timeout=60) as oai, open(path, "rb") as fh:
        v = oai.videos.create(model="wan2.1-i2v-14b", prompt="a fox runs", size="832x480",
                              seconds="1", input_reference=fh)
    with httpx.Client(base_url=emulated.url, timeout=60) as c:
        got = frames(finished(c, v.id, timeout=120))
        assert len(got) == 17 and got[0].shape == (480, 832, 3)
        r = c.post("/v1/videos", json={"model": "wan2.1-i2v-14b", "prompt": "x"})
        assert_error(r, 400, param="input_reference")
