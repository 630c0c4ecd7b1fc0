"""The API's description, `/openapi.json`: what the handlers actually take and answer.

The generation endpoints parse their bodies by hand (`transfer.read_body`: content types 415,
size limits 413; `schemas.parse` / `to_spec`: 400 naming the field), so FastAPI sees no body to
describe: `request_body` declares them here, JSON and multipart, built from the served
configuration so that a body the schema calls valid is one the server takes (served model names,
each model's sizes, frames and seconds, `n` up to `max_images`, prompt lengths, a negative prompt
only where classifier-free guidance runs) and a body it calls invalid is a 400.  A form's fields
are text: their schema says which text (patterns for the numbers, the enums as strings).

Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}` (`Error`); `errors()`
lists the statuses a route can answer.  `install` adds the shared parts to the document and
replaces FastAPI's 422 (this app answers a bad parameter with a 400) on every operation,
including those of routers other modules include.
"""

from __future__ import annotations

import warnings

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ..catalog import GENERATE_DEFAULTS, MODELS
from ..request import Kind

ERROR_REF = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string", "enum": ["invalid_request_error", "server_error"]},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]}}}}}

WHY = {
    400: "a parameter or body field is invalid (`param` names it)",
    401: "missing or unknown API key (only when the server has keys)",
    404: "no such object (or not the caller's, or expired)",
    409: "conflict: the job is not in a state for this, or the Idempotency-Key was used for "
         "another request",
    413: "request body over the size limit",
    415: "content type other than application/json (UTF-8) or multipart/form-data",
    416: "the requested byte range is not in the file",
    422: "the deadline (slo_ms) cannot be met (only with --infeasible reject)",
    429: "too many requests of this kind are waiting; retry after Retry-After seconds",
    500: "the generation failed",
    503: "the server is draining, stopping or its engine is down; retry later",
}
_RETRY = {"Retry-After": {"description": "seconds to wait before retrying",
                          "schema": {"type": "integer"}}}


def errors(*statuses: int) -> dict:
    """FastAPI `responses=` for these error statuses, each with the error body."""
    out = {}
    for s in statuses:
        out[s] = {"description": WHY[s], "content": {"application/json": {"schema": ERROR_REF}}}
        if s in (429, 503):
            out[s]["headers"] = _RETRY
    return out


def install(app: FastAPI) -> None:
    """Make `app.openapi()` add the Error schema and say 400 where FastAPI says 422."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            with warnings.catch_warnings():  # GET and HEAD of a route share an operation id
                warnings.simplefilter("ignore", UserWarning)
                doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                  description=app.description)
            doc.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
            for item in doc.get("paths", {}).values():
                for method, op in item.items():
                    if not isinstance(op, dict) or "responses" not in op:
                        continue
                    if method == "head" and "operationId" in op:
                        op["operationId"] += "_head"
                    r = op["responses"]
                    # Our validation handler answers 400 (a path parameter is any string).
                    if r.pop("422", None) is not None and any(
                            p.get("in") != "path" for p in op.get("parameters", [])):
                        r.setdefault("400", errors(400)[400])
            for name in ("HTTPValidationError", "ValidationError"):  # no longer referenced
                doc["components"]["schemas"].pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


# ----------------------------------------------------------------------------- patterns
def _fixed(lo: str, hi: str) -> list[str]:
    """Regex alternatives matching the digit strings of one length between lo and hi."""
    if lo == hi:
        return [lo]
    n = len(lo) - 1
    a, b, rest_lo, rest_hi = lo[0], hi[0], lo[1:], hi[1:]
    if a == b:
        return [a + r for r in _fixed(rest_lo, rest_hi)]
    out, start, end = [], a, b
    if rest_lo != "0" * n:
        out += [a + r for r in _fixed(rest_lo, "9" * n)]
        start = chr(ord(a) + 1)
    tail = [] if rest_hi == "9" * n else [b + r for r in _fixed("0" * n, rest_hi)]
    if tail:
        end = chr(ord(b) - 1)
    if start <= end:
        cls = start if start == end else f"[{start}-{end}]"
        out.append(cls + ("" if n == 0 else "[0-9]" if n == 1 else f"[0-9]{{{n}}}"))
    return out + tail


def int_alternatives(lo: int, hi: int) -> str:
    """A regex group matching the decimal integers in [lo, hi] (lo >= 0) written plainly."""
    parts = []
    for d in range(len(str(lo)), len(str(hi)) + 1):
        a, b = max(lo, 10 ** (d - 1) if d > 1 else 0), min(hi, 10 ** d - 1)
        if a <= b:
            parts += _fixed(str(a), str(b))
    return "(" + "|".join(parts) + ")"


def number_pattern(lo: int, hi: int, lo_exclusive: bool = False) -> str:
    """Decimal numbers in [lo, hi] (or (lo, hi]), integer bounds, as a form writes them."""
    frac = r"(\.[0-9]+)?"
    alts = [f"{int_alternatives(hi, hi)}(\\.0+)?"]
    if lo_exclusive:
        alts.append(f"{lo}\\.[0-9]*[1-9][0-9]*")
        if lo + 1 <= hi - 1:
            alts.append(int_alternatives(lo + 1, hi - 1) + frac)
    elif lo <= hi - 1:
        alts.append(int_alternatives(lo, hi - 1) + frac)
    return "^(" + "|".join(alts) + ")$"


# ----------------------------------------------------------------------------- request bodies
BINARY = {"type": "string", "format": "binary"}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_SPACE = ("[\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f"
          "\u205f\u3000]")  # what str.strip() removes, as literal characters


def _sizes(m: str) -> dict:
    spec = MODELS[m]
    g = spec.vae_spatial * spec.patch
    lo = -(-spec.min_side // g) * g
    # As `schemas._size` reads it: stripped (Python's whitespace), either case, up to 5 digits.
    sides = "|".join(f"0{{0,{5 - len(str(s))}}}{s}" for s in range(lo, spec.max_side + 1, g))
    return {"type": "string", "pattern": f"^(auto|{_SPACE}*({sides})[xX]({sides}){_SPACE}*)$",
            "description": f"WIDTHxHEIGHT, each a multiple of {g} in [{spec.min_side}, "
                           f"{spec.max_side}], or auto (default: {_default_size(m)})"}


def _default_size(m: str) -> str:
    spec = MODELS[m]
    dh, dw, _, _ = GENERATE_DEFAULTS.get(m, (spec.sizes[0][1], spec.sizes[0][0], 0, 0))
    return f"{dw}x{dh}"


def _frames(m: str, fps: int) -> tuple[list[int], list[str], float, bool]:
    """(frame counts, seconds as strings, the longest `seconds` number, inclusive?)."""
    spec = MODELS[m]
    t = spec.vae_temporal
    kmax = (spec.max_frames - 1) // t
    frames = [t * k + 1 for k in range(kmax + 1)]
    seconds = [f"{t * k / fps:g}" for k in range(1, kmax + 1)]
    # round() to the nearest frame count, ties to even: k + 0.5 rounds down when k is even.
    return frames, seconds, (kmax + 0.5) * t / fps, kmax % 2 == 0


def _branch(m: str, kind: Kind, default: bool, cfg, form: bool) -> dict:
    """What the body's fields may be for model `m`."""
    spec = MODELS[m]
    props = {"model": ({"type": "string", "enum": [m]} if form or not default
                       else {"enum": [m, None]}),
             "size": _sizes(m) if form else _nullable(_sizes(m))}
    if form:
        empty = {"type": "string", "maxLength": 0}
        above_one = {"type": "string", "pattern": number_pattern(1, 50, lo_exclusive=True)}
    else:
        empty = {"enum": [None, ""]}
        above_one = _nullable({"type": "number", "exclusiveMinimum": 1, "maximum": 50})
    branch = {"type": "object", "properties": props}
    if not default:
        branch["required"] = ["model"]
    # A negative prompt steers classifier-free guidance's unconditional branch: only where it
    # runs (a model trained with CFG, guidance above 1; its default guidance is).
    if spec.cfg:
        branch["anyOf"] = [{"properties": {"negative_prompt": empty}},
                           {"properties": {"guidance": above_one}}]
    else:
        props["negative_prompt"] = empty
    if kind is Kind.VIDEO:
        frames, seconds, smax, inclusive = _frames(m, cfg.fps)
        top = {"maximum": smax} if inclusive else {"exclusiveMaximum": smax}
        if form:
            props["frames"] = {"type": "string", "enum": [str(f) for f in frames]}
            props["seconds"] = {"type": "string", "enum": seconds}
        else:
            props["frames"] = _nullable({"type": "integer", "enum": frames})
            props["seconds"] = {"anyOf": [
                {"type": "string", "enum": seconds},
                {"type": "number", "exclusiveMinimum": 0, **top}, {"type": "null"}]}
        if spec.image_input != "none":  # image to video: the first frame
            props["input_reference"] = BINARY if form else {
                "anyOf": [{"type": "string", "description": "a base64 data: URL (PNG, JPEG, "
                                                            "WebP)"},
                          {"type": "object", "required": ["image_url"],
                           "properties": {"image_url": {"type": "string"}}}]}
            if spec.image_input == "required":
                branch["required"] = [*branch.get("required", []), "input_reference"]
    return branch


def body_schema(kind: Kind, cfg, form: bool = False) -> dict:
    """The JSON schema of a generation request's body (a form's text fields when `form`)."""
    served = [m for m in cfg.presets if MODELS[m].kind is kind]
    text = {"type": "string", "maxLength": cfg.max_prompt_chars}
    if form:
        props = {
            "prompt": {**text, "minLength": 1},
            "negative_prompt": text,
            "steps": {"type": "string", "pattern": f"^{int_alternatives(1, 1000)}$"},
            "seed": {"type": "string", "pattern": f"^{int_alternatives(0, 2**31 - 1)}$"},
            "guidance": {"type": "string", "pattern": number_pattern(0, 50)},
            "slo_ms": {"type": "string", "pattern": number_pattern(0, 86_400_000, True)},
            "priority": {"type": "string", "enum": ["high", "normal", "low"]}}
    else:
        props = {
            "prompt": {**text, "minLength": 1},
            "negative_prompt": _nullable(text),
            "steps": _nullable({"type": "integer", "minimum": 1, "maximum": 1000}),
            "seed": _nullable({"type": "integer", "minimum": 0, "maximum": 2**31 - 1}),
            "guidance": _nullable({"type": "number", "minimum": 0, "maximum": 50}),
            "slo_ms": _nullable({"type": "number", "exclusiveMinimum": 0,
                                 "maximum": 86_400_000}),
            "priority": {"enum": ["high", "normal", "low", None]}}
    # Which model, size, frames and seconds: per served model, in the branches below.
    props["model"] = {"type": "string"} if form else {"type": ["string", "null"]}
    props["size"] = {"type": "string"} if form else {"type": ["string", "null"]}
    if kind is Kind.IMAGE:
        if form:
            props["n"] = {"type": "string", "pattern": f"^{int_alternatives(1, cfg.max_images)}$"}
            props["response_format"] = {"type": "string", "enum": ["b64_json", "url"]}
        else:
            props["n"] = {"type": "integer", "minimum": 1, "maximum": cfg.max_images,
                          "default": 1}
            props["response_format"] = {
                "enum": ["b64_json", "url", None], "default": "b64_json",
                "description": "b64_json: the PNGs in the answer; url: links to "
                               "GET /v1/files/{id}, readable until the job's expires_at"}
    elif form:
        props["frames"] = {"type": "string"}
        props["seconds"] = {"type": "string"}
    else:
        props["frames"] = {"type": ["integer", "null"]}
        props["seconds"] = {"type": ["string", "number", "null"]}
    out = {"type": "object", "required": ["prompt"], "properties": props}
    branches = [_branch(m, kind, i == 0, cfg, form) for i, m in enumerate(served)]
    if branches:
        out["anyOf"] = branches
    if kind is Kind.VIDEO:  # seconds or frames, not both
        both = {"required": ["seconds", "frames"]}
        if not form:
            both["properties"] = {"seconds": {"not": {"type": "null"}},
                                  "frames": {"not": {"type": "null"}}}
        out["not"] = both
    return out


def request_body(kind: Kind, cfg) -> dict:
    """`openapi_extra` of a generation endpoint: its JSON and multipart bodies."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": body_schema(kind, cfg)},
        "multipart/form-data": {"schema": body_schema(kind, cfg, form=True)}}}}


IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False,
               "description": "a retry with the same key returns the first request's job",
               "schema": {"type": "string", "minLength": 1, "maxLength": 255,
                          "pattern": "^[!-~]([ -~]*[!-~])?$"}}


# ----------------------------------------------------------------------------- answers
_INT_OR_NULL = {"type": ["integer", "null"]}
VIDEO = {
    "type": "object",
    "required": ["id", "object", "model", "status", "progress", "created_at", "completed_at",
                 "expires_at", "size", "seconds", "error"],
    "properties": {
        "id": {"type": "string"}, "object": {"type": "string", "enum": ["video", "job"]},
        "model": {"type": "string"},
        "status": {"type": "string",
                   "enum": ["queued", "in_progress", "completed", "failed"]},
        "progress": {"type": "integer", "minimum": 0, "maximum": 100},
        "created_at": {"type": "integer"}, "completed_at": _INT_OR_NULL,
        "expires_at": {**_INT_OR_NULL, "description": "unix time the job and its files are "
                                                      "removed (set once it ends)"},
        "size": {"type": "string"}, "seconds": {"type": "string"},
        "error": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
            "code": {"type": "string"}, "message": {"type": "string"}}}]}}}
JOB = {**VIDEO, "required": [*VIDEO["required"], "kind", "n"],
       "properties": {**VIDEO["properties"], "kind": {"type": "string", "enum": ["image", "video"]},
                      "n": {"type": "integer"}}}


def ok(description: str, schema: dict | None = None, media: str = "application/json") -> dict:
    """A 200 answer for FastAPI's `responses=`."""
    return {"description": description,
            "content": {media: {"schema": schema} if schema is not None else {}}}

