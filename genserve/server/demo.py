"""`genserve demo` (what `make demo` runs): the server with the tiny presets on CPU workers, a short
mixed image/video load over HTTP, SLO attainment per kind, and where sample outputs went.

Everything goes through the public API on loopback, as a client would: images are blocking
`POST /v1/images/generations` calls, videos are `POST /v1/videos` jobs polled to the end.
"""

from __future__ import annotations

import base64
import random
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slo_counts(metrics_text: str) -> dict[tuple[str, str], float]:
    out = {}
    for m in re.finditer(r'genserve_slo_total\{model="([^"]+)",outcome="(\w+)"\} ([0-9.e+]+)',
                         metrics_text):
        out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def run_demo(out_dir: str = "demo-output", workers: int = 2, images: int = 24, videos: int = 6,
             duration_s: float = 12.0, seed: int = 0) -> int:
    import httpx
    import uvicorn

    from .app import create_app
    from .config import ServeConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ServeConfig(workers=workers, results_dir=str(out / "results"), port=_free_port())
    app = create_app(cfg)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    t0 = time.time()
    thread.start()
    base = f"http://{cfg.host}:{cfg.port}"
    with httpx.Client(base_url=base, timeout=120) as c:
        while True:
            try:
                if c.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if not thread.is_alive() or time.time() - t0 > 300:
                print("the server did not start")
                return 1
            time.sleep(0.2)
        print(f"server up on {base} with {workers} CPU workers (tiny-t2i, tiny-t2v) in "
              f"{time.time() - t0:.1f} s; sending {images} image and {videos} video requests "
              f"over {duration_s:.0f} s")
        rng = random.Random(seed)
        plan = sorted([(rng.uniform(0, duration_s), "image", i) for i in range(images)]
                      + [(rng.uniform(0, duration_s), "video", i) for i in range(videos)])
        answers: dict[str, list] = {"image": [], "video": []}
        samples: dict[str, str] = {}

        def image(i: int):
            r = c.post("/v1/images/generations",
                       json={"prompt": f"a fox number {i}", "size": "64x64", "seed": i})
            if r.status_code == 200 and "image" not in samples:
                path = out / "sample-image.png"
                path.write_bytes(base64.b64decode(r.json()["data"][0]["b64_json"]))
                samples["image"] = str(path)
            return r.status_code

        def video(i: int):
            r = c.post("/v1/videos", json={"prompt": f"a running fox {i}", "seconds": "2",
                                           "size": "128x128", "seed": i, "steps": 30})
            if r.status_code != 200:
                return r.status_code
            vid = r.json()["id"]
            while (v := c.get(f"/v1/videos/{vid}").json())["status"] not in ("completed",
                                                                             "failed"):
                time.sleep(0.1)
            if v["status"] == "completed" and "video" not in samples:
                path = out / "sample-video.mp4"
                path.write_bytes(c.get(f"/v1/videos/{vid}/content").content)
                samples["video"] = str(path)
            return v["status"]

        start = time.time()
        with ThreadPoolExecutor(32) as ex:
            futs = []
            for at, kind, i in plan:
                time.sleep(max(0.0, start + at - time.time()))
                futs.append((kind, ex.submit(image if kind == "image" else video, i)))
            for kind, f in futs:
                answers[kind].append(f.result())
        text = c.get("/metrics").text
        slo = _slo_counts(text)
        pre = re.search(r"^genserve_preemptions_total ([0-9.e+]+)", text, re.M)
    server.should_exit = True
    thread.join(timeout=30)
    print(f"all answered in {time.time() - start:.1f} s; videos paused for images "
          f"{int(float(pre.group(1))) if pre else 0} times")
    for kind, model in (("image", "tiny-t2i"), ("video", "tiny-t2v")):
        met, missed = slo.get((model, "met"), 0), slo.get((model, "missed"), 0)
        done = met + missed
        share = f"{met / done:.2f}" if done else "-"
        print(f"  {kind:5s}: {len(answers[kind])} sent, {int(done)} finished, SLO attainment "
              f"{share} ({int(met)} met, {int(missed)} missed); answers "
              f"{dict(sorted(_count(answers[kind]).items()))}")
    for kind, path in sorted(samples.items()):
        print(f"  sample {kind}: {path}")
    print(f"  all results: {out / 'results'}")
    return 0


def _count(xs) -> dict:
    out: dict = {}
    for x in xs:
        out[str(x)] = out.get(str(x), 0) + 1
    return out
