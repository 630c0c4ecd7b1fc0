"""Bytes in and out of the HTTP API: request bodies (content type, size limit) and result files.

Bodies.  A generation request is JSON (`application/json`, UTF-8) or a multipart form
(`multipart/form-data`, what the openai client sends for videos); anything else is 415 naming
`content-type` (415, not 400: the body may be fine, its declared type is not one we read, and
JSON sent as `text/plain` is not parsed on a guess).  JSON bodies may be `max_body_bytes` long,
forms `max_upload_bytes` (room for a file part: a video's `input_reference` image).  A larger Content-Length is a
413 before a byte of the body is read; a body without one (chunked) is counted as it arrives and
refused as soon as it passes the limit, so no more than the limit (plus one chunk) is ever held.
JSON values are typed strictly (`"2"` and `true` are not numbers); a form's values are all text,
so numbers in them are parsed; a file part comes as an `Upload` (its bytes), for the field's own
validation.

Files.  A result is opened before the answer is chosen and streamed from that handle: a DELETE
(or the expiry) that removes the file meanwhile cannot turn a 200 already under way into a broken
response, and a file already gone is a 404, never a 500.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, BinaryIO

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .service import ApiError

JSON = "application/json"
MULTIPART = "multipart/form-data"


def _media_type(header: str) -> tuple[str, dict[str, str]]:
    """'application/json; charset="UTF-8"' -> ('application/json', {'charset': 'utf-8'})."""
    media, *params = header.split(";")
    out = {}
    for p in params:
        k, _, v = p.partition("=")
        out[k.strip().lower()] = v.strip().strip('"').lower()
    return media.strip().lower(), out


def _too_large(limit: int, what: str) -> ApiError:
    # The rest of the body stays unread: the connection cannot carry another request.
    return ApiError(413, f"{what} bodies are limited to {limit} bytes", "request_too_large",
                    "body", headers={"Connection": "close"})


class _TooLarge(Exception):
    pass


@dataclass(frozen=True)
class Upload:
    """A form's file part, read whole (the body's limit bounds it)."""

    filename: str
    content_type: str
    data: bytes = b""

    def __repr__(self) -> str:  # never the bytes
        return f"Upload({self.filename!r}, {self.content_type!r}, {len(self.data)} bytes)"


def _counted(receive: Receive, limit: int) -> Receive:
    """`receive` that raises _TooLarge once the body read so far passes `limit` bytes."""
    seen = 0

    async def counted() -> dict:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
        return message

    return counted


async def read_body(request: Request, max_json: int, max_form: int) -> tuple[Any, bool]:
    """The decoded body (a JSON value, or a form's text fields as a dict) and whether its values
    are typed (JSON: validate strictly) or all text (a form)."""
    header = request.headers.get("content-type", "")
    media, params = _media_type(header)
    if media == JSON:
        if params.get("charset", "utf-8") not in ("utf-8", "utf8"):
            raise ApiError(415, f"content-type: JSON must be UTF-8, not charset "
                                f"{params['charset'][:20]!r}", "unsupported_media_type",
                           "content-type")
        limit, what = max_json, "JSON"
    elif media == MULTIPART:
        limit, what = max_form, "multipart"
    else:
        raise ApiError(415, f"content-type {header[:40]!r}: send {JSON} or {MULTIPART}",
                       "unsupported_media_type", "content-type")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "content-length: not a byte count", "invalid_request_error",
                           "content-length")
        if int(length) > limit:
            raise _too_large(limit, what)
    counted = Request(request.scope, _counted(request.receive, limit))
    try:
        if media == JSON:
            return _json(await counted.body()), True
        return await _form(counted), False
    except _TooLarge:
        raise _too_large(limit, what) from None
    except ClientDisconnect:
        raise ApiError(400, "the client went away while sending the body",
                       "invalid_request_error", "body") from None


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8") if raw else "null")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"malformed JSON body: {e}", "invalid_request_error") from None


async def _form(request: Request) -> dict:
    try:
        form = await request.form()
    except (_TooLarge, ClientDisconnect):
        raise
    except Exception as e:  # noqa: BLE001 - a malformed form: the client's error
        detail = getattr(e, "detail", None) or str(e)
        raise ApiError(400, f"malformed form body: {str(detail)[:200]}",
                       "invalid_request_error") from None
    try:
        return {k: v if isinstance(v, str) else Upload(v.filename or "", v.content_type or "",
                                                      await v.read())
                for k, v in form.items()}
    finally:
        await form.close()


# ----------------------------------------------------------------------------- files out
def open_regular(path: os.PathLike | str) -> tuple[BinaryIO, os.stat_result]:
    """The file opened for reading and its stat (blocking: call in a thread); FileNotFoundError
    when it is gone or not a regular file."""
    fh = open(path, "rb")  # noqa: SIM115 - the response closes it
    try:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(path)
    except BaseException:
        fh.close()
        raise
    return fh, st


MEDIA_TYPES = {".png": "image/png", ".mp4": "video/mp4"}


def result_media_type(name: str) -> str:
    """The content type of a result file, by its suffix."""
    return MEDIA_TYPES.get(os.path.splitext(name)[1], "application/octet-stream")


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class OpenFileResponse(Response):
    """A file streamed from an open handle (closed when the response ends), with HEAD, and one
    byte range (`Range: bytes=a-b`, what video players ask for; several ranges get the whole
    file, as RFC 9110 allows)."""

    chunk_size = 256 * 1024

    def __init__(self, fh: BinaryIO, st: os.stat_result, media_type: str):
        self.fh, self.size = fh, st.st_size
        self.etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        super().__init__(None, media_type=media_type, headers={
            "accept-ranges": "bytes", "etag": self.etag,
            "last-modified": formatdate(st.st_mtime, usegmt=True)})

    def _range(self, scope: Scope) -> tuple[int, int, int]:
        """(status, start, end) of what to send."""
        headers = dict(scope.get("headers") or ())
        asked = headers.get(b"range", b"").decode("latin-1").strip()
        if_range = headers.get(b"if-range")
        m = _RANGE.fullmatch(asked)
        if not m or (if_range is not None and if_range.decode("latin-1") != self.etag):
            return 200, 0, self.size
        first, last = m.groups()
        if not first and not last:
            return 200, 0, self.size
        if not first:  # the last N bytes
            start, end = max(0, self.size - int(last)), self.size
        else:
            start, end = int(first), min(self.size, int(last) + 1 if last else self.size)
        if start >= self.size or start >= end:
            return 416, 0, 0
        return 206, start, end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            status, start, end = self._range(scope)
            headers = self.headers.mutablecopy()
            headers["content-length"] = str(end - start)
            if status == 206:
                headers["content-range"] = f"bytes {start}-{end - 1}/{self.size}"
            elif status == 416:
                headers["content-range"] = f"bytes */{self.size}"
            await send({"type": "http.response.start", "status": status,
                        "headers": headers.raw})
            if scope["method"] == "HEAD" or status == 416:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await anyio.to_thread.run_sync(self.fh.seek, start)
            left = end - start
            while True:
                chunk = await anyio.to_thread.run_sync(self.fh.read,
                                                       min(self.chunk_size, left))
                left -= len(chunk)
                more = left > 0 and bool(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": more})
                if not more:
                    return
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.fh.close)
