"""Input images (image-to-video): what a client may upload, and the one form a request carries.

An upload is checked here once, by the HTTP server: a PNG, JPEG or WebP (the format Pillow reads
in the bytes, not the type the client declares), at most `MAX_BYTES` encoded and `MAX_SIDE` /
`MAX_PIXELS` decoded (checked from the header, before the pixels are decoded), and decodable.  It
is then normalised to the request's size the way the diffusers I2V example prepares its input
(RGB, EXIF orientation applied): scaled to cover width x height with its aspect kept (Lanczos,
as diffusers' image processor resamples), centre-cropped, and stored as a PNG.  The pipeline's
own resize to the request's size is then the identity, and the model sees the same pixels
wherever and whenever the request runs.

That PNG travels inside the request's `GenSpec` (`GenSpec.image`, base64), so everything that
already carries a spec carries the image with no other path: the job store (a restarted server
re-runs the job), traces, the `New` message to the worker that encodes the request, Ray workers
on machines that share no filesystem with the server.  It is bounded by the request's size
(3 x width x height bytes before compression).

Torch-free: the server and the emulated workers import it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re

import numpy as np

MAX_BYTES = 16 << 20     # an encoded upload
MAX_SIDE = 8192          # decoded, either side
MAX_PIXELS = 40_000_000  # decoded, width x height
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}

_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[^;,]*)*)(;base64)?,(.*)",
                       re.DOTALL | re.IGNORECASE)


class InputImageError(ValueError):
    """An input image that cannot be used; the message says why (the field is the caller's)."""


def from_data_url(url: str, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of a base64 `data:` URL.  Remote URLs are refused: the server fetches nothing
    (no request forgery through it, no wait on a third party inside a request)."""
    if not isinstance(url, str):
        raise InputImageError("must be a data: URL string or a file upload")
    head = url[:16].lower()
    if head.startswith(("http://", "https://", "ftp://", "file:")):
        raise InputImageError("remote URLs are not fetched: upload the file (multipart) or send "
                              "a base64 data: URL")
    m = _DATA_URL.fullmatch(url.strip())
    if m is None or not m.group(3):
        raise InputImageError("must be a base64 data: URL (data:image/png;base64,...) or a file "
                              "upload")
    media = (m.group(1) or "").lower()
    if media and not media.startswith("image/"):
        raise InputImageError(f"a data: URL of {media[:40]!r}; send an image (PNG, JPEG or WebP)")
    payload = m.group(4)
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise InputImageError(f"larger than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputImageError("the data: URL is not valid base64") from None


def normalize(data: bytes, width: int, height: int, max_bytes: int = MAX_BYTES) -> bytes:
    """A PNG of exactly width x height from an uploaded image; InputImageError if it is not one
    we take (see the module doc)."""
    return to_png(cover(_open(data, max_bytes), width, height))


def _open(data: bytes, max_bytes: int):
    """The decoded RGB image (EXIF orientation applied), after every check of the module doc."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise InputImageError("empty")
    if len(data) > max_bytes:
        raise InputImageError(f"{len(data)} bytes; at most {max_bytes}")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputImageError("not an image Pillow can read; send PNG, JPEG or WebP") from None
    except Image.DecompressionBombError:
        raise InputImageError(f"too large: at most {MAX_PIXELS} pixels") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputImageError(f"unreadable image ({_short(e)})") from None
    with im:
        if im.format not in FORMATS:
            raise InputImageError(f"{im.format or 'unknown'} images are not accepted; send PNG, "
                                  "JPEG or WebP")
        w, h = im.size
        if max(w, h) > MAX_SIDE or w * h > MAX_PIXELS:
            raise InputImageError(f"{w}x{h} pixels is too large: at most {MAX_SIDE} a side and "
                                  f"{MAX_PIXELS} pixels")
        try:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise InputImageError(f"cannot be decoded ({_short(e)})") from None


def cover(im, width: int, height: int):
    """`im` scaled to cover width x height (aspect kept) and centre-cropped to it."""
    from PIL import Image

    if im.size == (width, height):
        return im
    scale = max(width / im.width, height / im.height)
    w, h = max(width, round(im.width * scale)), max(height, round(im.height * scale))
    im = im.resize((w, h), Image.LANCZOS)
    left, top = (w - width) // 2, (h - height) // 2
    return im.crop((left, top, left + width, top + height))


def to_png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode(png: bytes) -> str:
    """The form `GenSpec.image` holds."""
    return base64.b64encode(png).decode("ascii")


def decode(image: str, width: int, height: int):
    """`GenSpec.image` as an RGB PIL image of width x height (normalised here too when it came
    from elsewhere than the server, e.g. the command line, at another size)."""
    try:
        raw = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise InputImageError("not valid base64") from None
    return cover(_open(raw, max(MAX_BYTES, len(raw))), width, height)


def digest(image: str) -> str:
    """A short content hash of `GenSpec.image` (logs, placeholders): never the bytes."""
    return hashlib.sha256(image.encode("ascii")).hexdigest()[:16]


def probe(width: int, height: int) -> str:
    """A fixed gradient image at width x height (`GenSpec.image`): the profiler's and the
    calibration's stand-in for an upload, so image-to-video models can be timed."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / max(1, width - 1), 255 * y / max(1, height - 1),
                    np.full(x.shape, 128.0)], axis=-1).astype(np.uint8)
    return encode(to_png(Image.fromarray(rgb, "RGB")))


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:120]}"
