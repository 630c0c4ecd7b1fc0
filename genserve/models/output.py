"""Writing outputs: PNG for images (Pillow), H.264 MP4 for videos (PyAV)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_png(path: str | Path, image: np.ndarray) -> None:
    from PIL import Image

    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"write_png needs a (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
    Image.fromarray(image).save(path, format="PNG")


def write_mp4(path: str | Path, video: np.ndarray, fps: int = 16) -> None:
    """(F, H, W, 3) uint8 -> H.264 MP4 (yuv420p, so H and W are padded to even sizes)."""
    import av

    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"write_mp4 needs a (F, H, W, 3) uint8 array, got {video.shape} "
                         f"{video.dtype}")
    h, w = video.shape[1] + video.shape[1] % 2, video.shape[2] + video.shape[2] % 2
    if (h, w) != video.shape[1:3]:
        video = np.pad(video, ((0, 0), (0, h - video.shape[1]), (0, w - video.shape[2]), (0, 0)),
                       mode="edge")
    with av.open(str(path), mode="w", format="mp4") as box:
        stream = box.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18"}
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                box.mux(packet)
        for packet in stream.encode():
            box.mux(packet)


def read_mp4(path: str | Path) -> np.ndarray:
    """Decode an MP4 back to (F, H, W, 3) uint8 (for tests and inspection)."""
    import av

    with av.open(str(path)) as box:
        return np.stack([f.to_ndarray(format="rgb24") for f in box.decode(video=0)])
