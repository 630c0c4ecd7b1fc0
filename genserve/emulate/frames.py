"""Placeholder outputs: an image or video of the requested size that says what it stands for.

Every frame shows "EMULATED", the model, the prompt, the size, the steps taken and the state's
digest (equal for equal specs however the request was scheduled); its background colour comes
from the digest too.  A video's frames also carry a bar that grows frame by frame, so that a
player shows motion.

Cheap on purpose: the encoders of emulated workers share the machine's cores with the driver,
and under a time scale S every wall millisecond they take is S milliseconds of trace time.  So a
frame is two colours, drawn small and scaled up by Pillow, an image a 2-colour palette PNG at the
fastest compression, and a video's frames are made in the encoder's own pixel format (YUV 4:2:0)
for x264's fastest preset.
"""

from __future__ import annotations

import io
import textwrap

import numpy as np

from ..spec import GenSpec


def label(spec: GenSpec, steps: int, digest: bytes) -> list[str]:
    prompt = textwrap.wrap(spec.prompt or "(no prompt)", 44)[:3]
    size = f"{spec.width}x{spec.height}" + (f"x{spec.frames}" if spec.frames > 1 else "")
    return ["EMULATED (genserve)", spec.model, *prompt, f"{size}, {steps} steps, seed {spec.seed}",
            f"digest {digest.hex()[:16]}"]


def _frame(spec: GenSpec, steps: int, digest: bytes, height: int, width: int):
    """The frame as a 2-colour palette image (Pillow), the label centred and scaled up."""
    from PIL import Image, ImageDraw

    lines = label(spec, steps, digest)
    small = Image.new("P", (280, 12 * len(lines) + 8), 0)
    ImageDraw.Draw(small).multiline_text((6, 4), "\n".join(lines), fill=1, spacing=2)
    k = max(1, min(width // small.width, height // small.height))
    big = Image.new("P", (width, height), 0)
    big.putpalette([*(int(b) // 2 + 64 for b in digest[:3]), 255, 255, 255])
    scaled = small.resize((small.width * k, small.height * k), Image.NEAREST)
    big.paste(scaled, ((width - scaled.width) // 2, (height - scaled.height) // 2))
    return big


def render(spec: GenSpec, steps: int, digest: bytes) -> np.ndarray:
    """(H, W, 3) uint8 for an image, (F, H, W, 3) for a video (raw outputs: tests, replay)."""
    frame = np.asarray(_frame(spec, steps, digest, spec.height, spec.width).convert("RGB"))
    if spec.frames == 1:
        return frame
    video = np.repeat(frame[None], spec.frames, axis=0)
    for f, bar in enumerate(_bars(spec.height, spec.width, spec.frames)):
        video[f, spec.height - bar[0]:, :bar[1]] = 255
    return video


def _bars(height: int, width: int, frames: int):
    """Per frame: (rows, columns) of the progress bar at the bottom."""
    rows = max(2, height // 40)
    return [(rows, width * (f + 1) // frames) for f in range(frames)]


def encode(spec: GenSpec, steps: int, digest: bytes, fps: int = 16):
    """The placeholder as a file (`models.output.Encoded`): PNG, or MP4 at `fps`."""
    from ..models.output import MP4, PNG, Encoded, encode_frames

    if spec.frames == 1:
        buf = io.BytesIO()
        _frame(spec, steps, digest, spec.height, spec.width).save(buf, format="PNG",
                                                                   compress_level=1)
        return Encoded(buf.getvalue(), PNG)
    h, w = spec.height + spec.height % 2, spec.width + spec.width % 2
    rgb = np.asarray(_frame(spec, steps, digest, h, w).convert("RGB"))
    yuv = _to_yuv420(rgb)

    def frames():
        for rows, cols in _bars(h, w, spec.frames):
            f = yuv.copy()
            f[h - rows:h, :cols] = 235  # white on the luma plane (video range)
            yield f

    return Encoded(encode_frames(frames(), h, w, fps, "ultrafast", pix="yuv420p"), MP4)


def _to_yuv420(rgb: np.ndarray) -> np.ndarray:
    import av

    return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray()
