"""Bytes into the HTTP API: request bodies (content type, size limit).

Bodies.  A generation request is JSON (`application/json`, UTF-8) or a multipart form
(`multipart/form-data`, what the openai client sends for videos); anything else is 415 naming
`content-type` (415, not 400: the body may be fine, its declared type is not one we read, and
JSON sent as `text/plain` is not parsed on a guess).  JSON bodies may be `max_body_bytes` long,
forms `max_upload_bytes` (room for a file part; none is used yet).  A larger Content-Length is a
413 before a byte of the body is read; a body without one (chunked) is counted as it arrives and
refused as soon as it passes the limit, so no more than the limit (plus one chunk) is ever held.
JSON values are typed strictly (`"2"` and `true` are not numbers); a form's values are all text,
so numbers in them are parsed.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

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
        # File parts are not used by any endpoint yet: only text fields count.
        return {k: v for k, v in form.items() if isinstance(v, str)}
    finally:
        await form.close()
