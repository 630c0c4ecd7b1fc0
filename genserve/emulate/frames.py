"""Placeholder outputs: an image or video of the requested size that says what it stands for.

Every frame shows "EMULATED", the model, the prompt, the size, the steps taken and the state's
digest (equal for equal specs however the request was scheduled); its background colour comes
from the digest too.  A video's frames also carry a bar that grows frame by frame, so that a
player shows motion.  Rendering is cheap (a small label scaled up): the encoder thread of an
emulated worker must not eat the CPU the emulated cluster shares with its driver.
"""

from __future__ import annotations

import textwrap

import numpy as np

from ..spec import GenSpec


def label(spec: GenSpec, steps: int, digest: bytes) -> list[str]:
    prompt = textwrap.wrap(spec.prompt or "(no prompt)", 44)[:3]
    size = f"{spec.width}x{spec.height}" + (f"x{spec.frames}" if spec.frames > 1 else "")
    return ["EMULATED (genserve)", spec.model, *prompt, f"{size}, {steps} steps, seed {spec.seed}",
            f"digest {digest.hex()[:16]}"]


def _frame(spec: GenSpec, steps: int, digest: bytes, height: int, width: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    lines = label(spec, steps, digest)
    small = Image.new("RGB", (280, 12 * len(lines) + 8),
                      tuple(int(b) // 2 + 64 for b in digest[:3]))
    draw = ImageDraw.Draw(small)
    for i, line in enumerate(lines):
        draw.text((6, 4 + 12 * i), line, fill=(255, 255, 255))
    k = max(1, min(width // small.width, height // small.height))
    big = np.asarray(small.resize((small.width * k, small.height * k), Image.NEAREST))
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = big[0, 0]
    bh, bw = min(height, big.shape[0]), min(width, big.shape[1])
    y, x = (height - bh) // 2, (width - bw) // 2
    frame[y:y + bh, x:x + bw] = big[:bh, :bw]
    return frame


def _video(frame: np.ndarray, frames: int):
    """The frames of a video, one at a time (a 720p one is 224 MB as one array)."""
    h, w = frame.shape[:2]
    bar = max(2, h // 40)
    for f in range(frames):
        out = frame.copy()
        out[h - bar:, : w * (f + 1) // frames] = 255
        yield out


def render(spec: GenSpec, steps: int, digest: bytes) -> np.ndarray:
    """(H, W, 3) uint8 for an image, (F, H, W, 3) for a video (raw outputs: tests, replay)."""
    frame = _frame(spec, steps, digest, spec.height, spec.width)
    return frame if spec.frames == 1 else np.stack(list(_video(frame, spec.frames)))


def encode(spec: GenSpec, steps: int, digest: bytes, fps: int = 16):
    """The placeholder as a file (`models.output.Encoded`): PNG, or MP4 at `fps` made frame by
    frame with x264's fastest preset."""
    from ..models.output import MP4, Encoded, encode_frames, encode_png

    if spec.frames == 1:
        return Encoded(encode_png(_frame(spec, steps, digest, spec.height, spec.width)), "image/png")
    h, w = spec.height + spec.height % 2, spec.width + spec.width % 2
    frame = _frame(spec, steps, digest, h, w)
    return Encoded(encode_frames(_video(frame, spec.frames), h, w, fps, "ultrafast"), MP4)
