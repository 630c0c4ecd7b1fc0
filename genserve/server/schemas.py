"""Request bodies of the HTTP API and their validation into a `JobSpec`.

Every bad field becomes an `ApiError(400)` naming the field and the allowed range; nothing a client
sends can raise anything else.  Unknown fields are ignored, as OpenAI's API does.  JSON bodies are
typed strictly: a boolean is not a number and neither is a numeric string (`"n": "2"`, `"seed":
true` are 400s naming the field; `2.0` is the integer 2, JSON having one number type); `seconds` is
OpenAI's string ("4") or a number.  Form bodies
(multipart) carry text, so their numbers are parsed from it, and files.  A video's input image,
`input_reference` (a file part, a base64 data: URL, or OpenAI's {"image_url": ...}), is taken out
of the body before validation (`take_reference`, `reference_bytes`; never fetched from a URL) and
checked and fitted to the request's size in `to_spec` (`genserve.input_image`).
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import input_image
from ..catalog import GENERATE_DEFAULTS, MODELS, ShapeError, uses_cfg
from ..request import Kind
from ..spec import GenSpec
from .service import ApiError, JobSpec
from .transfer import Upload

MAX_SEED = 2**31 - 1
PRIORITY_SCALE = {"high": 0.5, "normal": 1.0, "low": 4.0}  # x the default SLO

class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=200)
    prompt: str = Field(..., min_length=1)
    # What the unconditional branch of classifier-free guidance steers away from.
    negative_prompt: str | None = None
    size: str | None = Field(None, max_length=20)
    steps: int | None = Field(None, ge=1, le=1000)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    guidance: float | None = Field(None, ge=0.0, le=50.0, allow_inf_nan=False)
    slo_ms: float | None = Field(None, gt=0, le=86_400_000, allow_inf_nan=False)
    priority: Literal["high", "normal", "low"] | None = None


class ImageBody(_Common):
    n: int = Field(1, ge=1)
    response_format: Literal["b64_json", "url"] | None = "b64_json"


class VideoBody(_Common):
    seconds: Annotated[str, Field(max_length=32)] | int | float | None = None
    frames: int | None = Field(None, ge=1, le=10_000)


_INTEGERS = {"n", "steps", "seed", "frames"}


def parse(cls, data, max_prompt_chars: int, strict: bool = True):
    """Validate a decoded body (dict) into `cls`, or raise ApiError naming the field.  `strict`:
    the values are JSON's typed ones (no bool or string for a number); False for a form's text."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_request_error")
    if strict:  # JSON has one number type: 2.0 is the integer 2 (as JSON Schema says), 2.5 not
        data = {k: int(v) if k in _INTEGERS and type(v) is float and v.is_integer() else v
                for k, v in data.items()}
    try:
        body = cls.model_validate(data, strict=strict)
    except ValidationError as e:
        err = e.errors()[0]
        # The top-level field (deeper parts of loc name union members, not fields).
        field = str(err["loc"][0]) if err["loc"] else "body"
        msg = err["msg"]
        if strict and isinstance(data.get(field), (bool, str)) and err["type"] in (
                "int_type", "float_type"):
            msg += (" (a JSON number, not a "
                    f"{'boolean' if isinstance(data[field], bool) else 'string'})")
        raise ApiError(400, f"{field}: {msg}", "invalid_request_error", field) from None
    for field in ("prompt", "negative_prompt"):
        text = getattr(body, field) or ""
        if len(text) > max_prompt_chars:
            raise ApiError(400, f"{field}: {len(text)} characters; at most {max_prompt_chars}",
                           "invalid_request_error", field)
    return body


REFERENCE = "input_reference"
# OpenAI's object form ({"image_url": ...} or {"file_id": ...}), as a form flattens it.
_REFERENCE_PARTS = {f"{REFERENCE}[image_url]": "image_url", f"{REFERENCE}[file_id]": "file_id"}


def _bad_reference(message: str) -> ApiError:
    return ApiError(400, f"{REFERENCE}: {message}", "invalid_request_error", REFERENCE)


def take_reference(data) -> Upload | str | dict | None:
    """Remove the input image from a decoded body and return it as sent: a form's file part, a
    data: URL, or OpenAI's object form ({"image_url": ...}).  Left to `reference_bytes`, not to
    the body's schema: a file part is not a JSON value."""
    if not isinstance(data, dict):
        return None
    raw = data.pop(REFERENCE, None)
    parts = {sub: data.pop(key) for key, sub in _REFERENCE_PARTS.items() if key in data}
    if parts:
        if raw is not None:
            raise _bad_reference("give it once: a file, a data: URL or an object")
        raw = parts
    return raw


def reference_bytes(raw: Upload | str | dict, max_bytes: int = input_image.MAX_BYTES) -> bytes:
    """The image's encoded bytes; a 400 naming `input_reference` for anything the server would
    have to fetch (a remote URL, a file id) or cannot read."""
    if isinstance(raw, Upload):
        if len(raw.data) > max_bytes:
            raise _bad_reference(f"{len(raw.data)} bytes; at most {max_bytes}")
        return raw.data
    if isinstance(raw, dict):
        if "file_id" in raw:
            raise _bad_reference("file ids are not supported here: upload the file (multipart) "
                                 "or send a base64 data: URL")
        if set(raw) != {"image_url"}:
            raise _bad_reference('an object must be {"image_url": "data:..."}')
        raw = raw["image_url"]
    if not isinstance(raw, str):
        raise _bad_reference('must be a file upload, a base64 data: URL or '
                             '{"image_url": "data:..."}')
    try:
        return input_image.from_data_url(raw, max_bytes)
    except input_image.InputImageError as e:
        raise _bad_reference(str(e)) from None


def _input_image(model: str, image: bytes | None, height: int, width: int) -> str:
    """`GenSpec.image` for the request: the upload normalised to its size (`input_image`), ""
    for none; a 400 naming `input_reference` when the model requires one and it is missing,
    takes none and one came, or it is not an image we take."""
    takes = MODELS[model].image_input
    if image is None:
        if takes == "required":
            raise _bad_reference(f"{model} makes a video from an image: an input image is "
                                 "required (a file upload or a base64 data: URL)")
        return ""
    if takes == "none":
        raise _bad_reference(f"{model} takes no input image")
    try:
        return input_image.encode(input_image.normalize(image, width, height))
    except input_image.InputImageError as e:
        raise _bad_reference(str(e)) from None


def _size(raw: str | None, default: tuple[int, int]) -> tuple[int, int]:
    """'WxH' -> (height, width)."""
    if raw is None or raw == "auto":
        return default
    m = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", raw.strip().lower())
    if m is None:
        raise ApiError(400, f"size={raw!r}: must look like WIDTHxHEIGHT, e.g. 1024x1024",
                       "invalid_request_error", "size")
    return int(m.group(2)), int(m.group(1))


def _model(name: str | None, kind: Kind, served: tuple[str, ...]) -> str:
    of_kind = [m for m in served if MODELS[m].kind is kind]
    if name is None:
        if not of_kind:
            raise ApiError(400, f"no {kind.value} model is served here", "model_not_found",
                           "model")
        return of_kind[0]
    if name not in of_kind:
        raise ApiError(400, f"model={name!r}: not a {kind.value} model served here; served: "
                            f"{', '.join(of_kind) or 'none'}", "model_not_found", "model")
    return name


def _default_guidance(spec) -> float:
    """CFG scale for a model trained with it; FLUX's distilled guidance input otherwise."""
    return 5.0 if spec.cfg else 3.5


def to_spec(body: _Common, kind: Kind, served: tuple[str, ...], max_images: int,
            fps: int, image: bytes | None = None) -> tuple[JobSpec, float]:
    """The job to run and its SLO factor (priority); raises ApiError naming a bad field.
    `image`: the input image's encoded bytes (`reference_bytes`); it is decoded and resized
    here, so with one, call this off the event loop."""
    model = _model(body.model, kind, served)
    spec = MODELS[model]
    dh, dw, df, dsteps = GENERATE_DEFAULTS.get(model, (spec.sizes[0][1], spec.sizes[0][0],
                                                       spec.sizes[0][2], spec.steps))
    height, width = _size(body.size, (dh, dw))
    frames, n, seconds = 1, 1, None
    if kind is Kind.IMAGE:
        n = body.n
        if n > max_images:
            raise ApiError(400, f"n={n}: at most {max_images} images per request",
                           "invalid_request_error", "n")
    else:
        if body.frames is not None and body.seconds is not None:
            raise ApiError(400, "give seconds or frames, not both", "invalid_request_error",
                           "seconds")
        frames = body.frames or df
        if body.seconds is not None:
            try:
                sec = float(body.seconds)
            except (ValueError, OverflowError, TypeError):
                sec = float("nan")
            if not 0 < sec <= 3600:
                raise ApiError(400, f"seconds={body.seconds!r}: must be a number in (0, 3600]",
                               "invalid_request_error", "seconds")
            t = spec.vae_temporal
            frames = max(1, t * round(sec * fps / t) + 1)
        seconds = f"{(frames - 1) / fps:g}" if frames > 1 else "0"
    steps = body.steps or dsteps
    try:
        spec.validate_shape(height, width, frames, steps)
    except ShapeError as e:
        msg = str(e)
        param = msg.split("=", 1)[0]
        if param in ("height", "width"):
            param = "size"
        elif param == "frames" and body.seconds is not None:
            param, msg = "seconds", f"seconds={body.seconds!r} -> {msg}"
        raise ApiError(400, msg, "invalid_request_error", param) from None
    guidance = body.guidance if body.guidance is not None else _default_guidance(spec)
    slo_ms = body.slo_ms
    seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED)
    negative = body.negative_prompt or ""
    if negative and not uses_cfg(model, guidance):
        why = (f"{model} is guidance-distilled (no classifier-free guidance)" if not spec.cfg
               else f"guidance={guidance:g} runs no unconditional branch (it must be > 1)")
        raise ApiError(400, f"negative_prompt: has no effect here: {why}",
                       "invalid_request_error", "negative_prompt")
    gen = GenSpec(model, height, width, frames, steps, guidance, seed, prompt=body.prompt,
                  negative_prompt=negative, image=_input_image(model, image, height, width))
    return (JobSpec(kind, gen, n=n, slo_ms=slo_ms, seconds=seconds),
            PRIORITY_SCALE[body.priority or "normal"])


def capabilities(model: str, cfg) -> dict:
    """What `GET /v1/models` tells a client about one served model: the sizes, frames and steps it
    takes (the same rules `to_spec` enforces), and which features apply."""
    spec = MODELS[model]
    dh, dw, df, dsteps = GENERATE_DEFAULTS.get(model, (spec.sizes[0][1], spec.sizes[0][0],
                                                       spec.sizes[0][2], spec.steps))
    out = {"sizes": sorted({f"{w}x{h}" for w, h, _ in spec.sizes} | {f"{dw}x{dh}"}),
           "default_size": f"{dw}x{dh}",
           "size_rule": {"multiple_of": spec.vae_spatial * spec.patch,
                         "min_side": spec.min_side, "max_side": spec.max_side},
           "default_steps": dsteps, "max_steps": 1000,
           # Classifier-free guidance: the unconditional branch a negative prompt steers.
           "cfg": spec.cfg, "negative_prompt": spec.cfg,
           "default_guidance": _default_guidance(spec),
           # Ulysses degrees the scheduler may give one request (within this server's GPUs).
           "sp_degrees": [k for k in spec.sp_degrees if not cfg.workers or k <= cfg.workers],
           # ... and GPU counts for its two CFG branches side by side (Ulysses inside each half).
           "cfg_split_gpus": [2 * k for k in spec.sp_degrees
                              if spec.cfg and (not cfg.workers or 2 * k <= cfg.workers)],
           # An input image (`input_reference`): "none", "required" or "optional".
           "image_input": spec.image_input}
    if spec.kind is Kind.VIDEO:
        out["frames"] = {"default": df, "max": spec.max_frames,
                         "rule": f"{spec.vae_temporal}k+1"}
        out["fps"] = cfg.fps
    return out
