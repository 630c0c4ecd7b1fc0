"""Outputs as files: PNG for images (Pillow), H.264 MP4 for videos (PyAV).

Encoding happens in memory (`encode`, `encode_png`, `encode_mp4` return bytes) so that a worker
can encode where the frames are made and send the driver only the file (`Encoded`); `write_png` /
`write_mp4` are the same encoders writing to a path (the CLI).  PNG is lossless: `Encoded.decode`
gives the very array back.  MP4 (yuv420p, crf 18) is not: exactness checks keep raw arrays.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PNG, MP4 = "image/png", "video/mp4"


@dataclass(frozen=True)
class Encoded:
    """An output as its file's bytes: `media_type` is `PNG` (an image) or `MP4` (a video)."""

    data: bytes
    media_type: str

    @property
    def suffix(self) -> str:
        return {PNG: ".png", MP4: ".mp4"}[self.media_type]

    def decode(self) -> np.ndarray:
        """The array again: (H, W, 3) from a PNG (exactly), (F, H, W, 3) from an MP4 (lossy)."""
        if self.media_type == PNG:
            from PIL import Image

            return np.asarray(Image.open(io.BytesIO(self.data)).convert("RGB"))
        return _frames(io.BytesIO(self.data))


def encode(array: np.ndarray, fps: int = 16) -> Encoded:
    """A decoded output as a file: (H, W, 3) -> PNG, (F, H, W, 3) -> MP4 at `fps`."""
    if array.ndim == 4:
        return Encoded(encode_mp4(array, fps), MP4)
    return Encoded(encode_png(array), PNG)


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"a PNG needs a (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def encode_mp4(video: np.ndarray, fps: int = 16) -> bytes:
    """(F, H, W, 3) uint8 -> H.264 MP4 (yuv420p, so H and W are padded to even sizes)."""
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"an MP4 needs a (F, H, W, 3) uint8 array, got {video.shape} "
                         f"{video.dtype}")
    h, w = video.shape[1] + video.shape[1] % 2, video.shape[2] + video.shape[2] % 2
    if (h, w) != video.shape[1:3]:
        video = np.pad(video, ((0, 0), (0, h - video.shape[1]), (0, w - video.shape[2]), (0, 0)),
                       mode="edge")
    return encode_frames(video, h, w, fps)


def encode_frames(frames, height: int, width: int, fps: int = 16,
                  preset: str | None = None, pix: str = "rgb24") -> bytes:
    """H.264 MP4 of an iterable of frames (even sizes), made one frame at a time: (height, width,
    3) uint8 arrays, or in `pix` "yuv420p" (height * 3/2, width) planes as-is; `preset`: x264's
    speed preset (None: its default)."""
    import av

    buf = io.BytesIO()  # the muxer seeks back to finish the file: a seekable buffer
    with av.open(buf, mode="w", format="mp4") as box:
        stream = box.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", **({"preset": preset} if preset else {})}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format=pix)):
                box.mux(packet)
        for packet in stream.encode():
            box.mux(packet)
    return buf.getvalue()


def write_png(path: str | Path, image: np.ndarray) -> None:
    Path(path).write_bytes(encode_png(image))


def write_mp4(path: str | Path, video: np.ndarray, fps: int = 16) -> None:
    Path(path).write_bytes(encode_mp4(video, fps))


def read_mp4(path: str | Path) -> np.ndarray:
    """Decode an MP4 back to (F, H, W, 3) uint8 (for tests and inspection)."""
    return _frames(str(path))


def _frames(src) -> np.ndarray:
    import av

    with av.open(src) as box:
        return np.stack([f.to_ndarray(format="rgb24") for f in box.decode(video=0)])
