"""Bytes through the driver per finished video (issue 12 part 4): encoded on the worker vs raw.

A finished output used to cross from worker to driver as its decoded frames (a `RunResult` holding
the (F, H, W, 3) uint8 array); now the worker's encoder thread sends the MP4 (`Output`).  This
puts a synthetic video of the given size through that very path (`worker_main.Encoder`, with an
outbox that measures each message as the channel frames it: 8-byte header + pickle) and the old
one (the `RunResult` with the array), and prints the bytes of each and their ratio.  The frames
are synthetic, so the MP4 size depends on what is in them: `scene` is smooth and moving (a
panning texture, a drifting gradient, moving discs: closer to a generated video), `noise` is
uniform random pixels (incompressible: the worst case for the encoder).

    python bench/data_path_outputs.py [--size 1280x720] [--frames 81] [--fps 16]
                                      [--content scene,noise]

Defaults: Wan2.1's 720p video, 81 frames at 16 fps (5 s), H.264 crf 18 (`models/output.py`).

Measured with the defaults on a 2-core CPU VM: raw frames 223,948,800 bytes (223,949,085 on the
channel); `scene` MP4 414,418 bytes (414,562 on the channel): 540x less, encoded in 6.1 s;
`noise` MP4 49,425,127 bytes: 4.5x less, 28.5 s.  Those seconds are what an encode on the
worker's main thread would have held the GPUs; the encoder thread runs them beside the next job.
"""

from __future__ import annotations

import argparse
import pickle
import queue
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genserve.parallel.protocol import OutputFormat, RunResult  # noqa: E402


def scene(frames: int, h: int, w: int) -> np.ndarray:
    """Smooth, moving content: a texture panning right, a gradient drifting, three discs."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((frames, h, w, 3), np.uint8)
    for t in range(frames):
        tex = 0.5 + 0.25 * np.sin((x + 6 * t) / 23.0) * np.cos(y / 31.0)
        grad = (x + y + 4 * t) / (w + h + 4 * frames)
        img = np.stack([0.6 * tex + 0.4 * grad, 0.5 * tex + 0.5 * (1 - grad),
                        0.3 + 0.4 * tex], axis=-1)
        for k, (cx, cy, r) in enumerate(((0.2, 0.3, 0.08), (0.6, 0.6, 0.12), (0.8, 0.2, 0.05))):
            px, py = (cx + 0.004 * t * (k + 1)) * w, (cy + 0.002 * t) * h
            disc = (x - px) ** 2 + (y - py) ** 2 < (r * h) ** 2
            img[disc] = (0.9, 0.2 + 0.3 * k, 0.1)
        out[t] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return out


def noise(frames: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def encoded_path(video: np.ndarray, fps: int) -> tuple[int, int, float]:
    """(bytes on the channel, MP4 bytes, encode seconds) of `video` through the worker's encoder
    thread, as the driver would receive it."""
    from genserve.parallel.worker_main import Encoder

    sent: queue.SimpleQueue = queue.SimpleQueue()
    outbox = types.SimpleNamespace(put=lambda m: sent.put(
        (8 + len(pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL)), m)))
    worker = types.SimpleNamespace(rank=0, spec=types.SimpleNamespace(faults={}), outbox=outbox)
    enc = Encoder(worker, "video")
    enc.start()
    t0 = time.perf_counter()
    enc.todo.put(("bench-video", video, OutputFormat(fps=fps)))
    framed, msg = sent.get()
    took = time.perf_counter() - t0
    if msg.error:
        raise RuntimeError(msg.error)
    return framed, len(msg.data), took


def raw_path(video: np.ndarray) -> int:
    """Bytes on the channel of the old way: the run's result holding the decoded frames."""
    return 8 + len(pickle.dumps(RunResult(outputs={"bench-video": video}),
                                protocol=pickle.HIGHEST_PROTOCOL))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1280x720", help="WxH")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--fps", type=int, default=16)
    ap.add_argument("--content", default="scene,noise", help="scene, noise or both")
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.lower().split("x"))
    print(f"{a.frames} frames of {w}x{h} at {a.fps} fps; H.264 crf 18, yuv420p")
    print(f"{'content':8} {'raw frames':>14} {'raw on channel':>15} {'MP4':>12} "
          f"{'Output on channel':>18} {'raw / encoded':>14} {'encode s':>9}")
    for name in a.content.split(","):
        video = {"scene": scene, "noise": noise}[name](a.frames, h, w)
        raw = raw_path(video)
        framed, mp4, took = encoded_path(video, a.fps)
        print(f"{name:8} {video.nbytes:>14,} {raw:>15,} {mp4:>12,} {framed:>18,} "
              f"{raw / framed:>13.1f}x {took:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
