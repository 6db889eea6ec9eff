"""The OpenAI Images API over the one request model: what the `openai` SDK sends, answered by the served model.

    POST /v1/images/generations   JSON: prompt, model (any string), n 1..8, size "WxH" | "auto",
                                  response_format b64_json | url, output_format png | jpeg | webp,
                                  output_compression, quality/style/user/moderation (ignored); ours, for
                                  the SDK's extra_body: seed, num_inference_steps, best_of, search,
                                  search_steps (docs/api.md, Best of)
    POST /v1/images/edits         multipart (as the SDK sends it): image (one), prompt, n, size, ... ->
                                  img2img at `strength` (ours, default 0.75); a mask is refused
    GET  /v1/images/files/{id}    a `url` result, for SPO_IMAGE_TTL_S (then 404), under SPO_IMAGE_CACHE_MB; the
                                  url is SPO_PUBLIC_URL + /v1/images/files/{id}, or relative when it is unset
    GET  /v1/models               the served model's id

Every request becomes `GenerationRequest`s (n of them, seeds seed..seed+n-1 as /generate_batch) run by the
engine; nothing here samples. Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}},
the framework's included (a hook of the door middleware). With SPO_API_TOKEN set it is the API key
(`Authorization: Bearer`; the admin token works too).
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from pathlib import Path

import anyio
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import context
from service.context import Shape, guarded
from service.errors import foreign_shape
from spo_runtime.errors import InvalidRequestError
from spo_runtime.fsutil import atomic_write
from spo_runtime.imaging import FORMATS
from spo_runtime.limits import BEST_OF_RANGE, DEFAULT_STRENGTH, MAX_IMAGES, MAX_SEED, SEARCH_STEPS_RANGE

FILE_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_FILES, MAX_FIELDS = 4, 64  # parts of an edits body: the image (and a mask, refused by name); the form fields


def size_range(svc) -> tuple[int, int, int]:
    """(lo, hi, default) of the served preset."""
    p = svc.pipe.preset
    return p.size_range[0], p.size_range[1], p.default_size


# -- OpenAI's error shape ----------------------------------------------------------------------

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 409: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error", 499: "invalid_request_error"}
_CODES = {401: "invalid_api_key", 404: "not_found", 429: "rate_limit_exceeded", 504: "timeout", 503: "unavailable"}


def oa_error(status: int, message: str, param: str | None = None, code: str | None = None, headers=None) -> JSONResponse:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code or _CODES.get(status)}},
                        status_code=status, headers=headers)


FIELDS = {"width": "size", "height": "size", "init_image": "image"}  # our request model's names -> OpenAI's
# every error under /v1/ in OpenAI's shape, the framework's included (the app hands this to the door)
ERRORS = foreign_shape(
    "/v1/", lambda status, message, param, headers: oa_error(status, message, param, headers=headers),
    lambda d: isinstance(d.get("error"), dict) and "message" in d["error"], FIELDS)


def unauthorized() -> JSONResponse:
    return oa_error(401, "Incorrect API key provided: send SPO_API_TOKEN as the API key "
                         "(Authorization: Bearer <key>)", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


# SPO_API_TOKEN as the API key; not ready: 503 with Retry-After 5, as these routes have always answered
GUARD = Shape(unauthorized=unauthorized, error=ERRORS.from_exception, retry_after=5)


# -- parsing -------------------------------------------------------------------------------------

# What the SDK may send that changes nothing here: accepted at any value.
_IGNORED = {"model", "quality", "style", "user", "moderation", "safety_identifier", "input_fidelity"}
# Accepted only at a value that changes nothing (None, or these).
_NEUTRAL = {"background": (None, "auto", "opaque"), "stream": (None, False), "partial_images": (None, 0),
            "complexity": (None,), "frame_count": (None, 1), "frame_duration_ms": (None,), "svg": (None,),
            "markup": (None,)}
_OWN = {"prompt", "n", "size", "response_format", "output_format", "output_compression", "seed", "image", "image[]",
        "mask", "strength", "num_inference_steps", "best_of", "search", "search_steps"}


def _int(name: str, v, lo: int, hi: int, form: bool) -> int:
    if form and isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip()):
        v = int(v.strip())
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise InvalidRequestError(name, f"must be an integer in {lo}..{hi}, got {v!r}")
    return v


def parse(body: dict, svc, form: bool = False) -> dict:
    """The OpenAI body -> {"request": the common request fields, "n", "seed", "response_format", "format",
    "quality"}; InvalidRequestError naming the parameter otherwise."""
    for key, value in body.items():
        if key in _IGNORED or key in _OWN:
            continue
        if key in _NEUTRAL:
            allowed = _NEUTRAL[key]
            if value in allowed or (form and str(value).lower() in {str(a).lower() for a in allowed if a is not None}):
                continue
            raise InvalidRequestError(key, f"{value!r} is not supported by this server "
                                           f"(accepted: {', '.join(repr(a) for a in allowed)})")
        raise InvalidRequestError(key, "Unrecognized request argument supplied")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequestError("prompt", "a non-empty string is required")
    n = 1 if body.get("n") in (None, "") else _int("n", body["n"], 1, MAX_IMAGES, form)
    lo, hi, default = size_range(svc)
    size = body.get("size")
    request: dict = {"prompt": prompt}
    if size not in (None, "", "auto"):
        m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size) if isinstance(size, str) else None
        w, h = (int(m[1]), int(m[2])) if m else (0, 0)
        if not m or not all(lo <= v <= hi and v % 8 == 0 for v in (w, h)):
            raise InvalidRequestError("size", f"must be 'WxH' with W and H multiples of 8 in {lo}..{hi} "
                                              f"(or 'auto': {default}x{default}), got {size!r}")
        request.update(width=w, height=h)
    fmt = body.get("response_format") or "b64_json"
    if fmt not in ("b64_json", "url"):
        raise InvalidRequestError("response_format", f"must be 'b64_json' or 'url', got {fmt!r}")
    out = body.get("output_format") or "png"
    if out not in FORMATS:
        raise InvalidRequestError("output_format", f"must be one of {', '.join(FORMATS)}, got {out!r}")
    quality = 100 if body.get("output_compression") in (None, "") else \
        _int("output_compression", body["output_compression"], 0, 100, form)
    seed = None if body.get("seed") in (None, "") else _int("seed", body["seed"], 0, MAX_SEED, form)
    if body.get("num_inference_steps") not in (None, ""):  # ours, like seed and strength (the SDK's extra_body)
        request["num_inference_steps"] = _int("num_inference_steps", body["num_inference_steps"], 1, 100, form)
    for name, (lo_, hi_) in (("best_of", BEST_OF_RANGE), ("search_steps", SEARCH_STEPS_RANGE)):  # ours too
        if body.get(name) not in (None, ""):
            request[name] = _int(name, body[name], lo_, hi_, form)
    if body.get("search") not in (None, ""):
        request["search"] = body["search"]  # the request model checks it (and best_of > 1)
    return {"request": request, "n": n, "seed": seed, "response_format": fmt, "format": out,
            "quality": max(1, quality)}


# -- url results -----------------------------------------------------------------------------------


def _files(svc) -> Path:
    return Path(svc.settings.data_dir) / "openai_images"


def _sweep(root: Path, ttl: float, cap_bytes: float) -> None:
    """Remove expired files, then the oldest until the directory is under the cap."""
    now = time.time()
    entries = []
    for p in root.glob("*"):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if now - st.st_mtime > ttl or p.name.startswith("."):
            if now - st.st_mtime > ttl:
                p.unlink(missing_ok=True)
            continue
        entries.append((st.st_mtime, st.st_size, p))
    total = sum(e[1] for e in entries)
    for _, size, p in sorted(entries, key=lambda e: e[0]):
        if total <= cap_bytes:
            break
        p.unlink(missing_ok=True)
        total -= size


def store(svc, data: bytes) -> str:
    """Write one result under an unguessable 128-bit id (atomically); returns the id."""
    root = _files(svc)
    root.mkdir(parents=True, exist_ok=True)
    cap = svc.settings.image_cache_mb * 1024 * 1024
    _sweep(root, svc.settings.image_ttl_s, max(0.0, cap - len(data)))
    file_id = secrets.token_hex(16)
    atomic_write(root / file_id, data)
    return file_id


def public_base(svc) -> str:
    """The base of `url` results: SPO_PUBLIC_URL, else "" (a relative URL, which the client resolves against
    the address it called). Never the request's Host header: the caller chooses that one."""
    return svc.settings.public_url.rstrip("/") if svc.settings.public_url else ""


async def image_file(request: Request) -> Response:
    svc = context.bound()
    file_id = request.path_params["file_id"]
    if svc is None or not FILE_ID.fullmatch(file_id):
        return oa_error(404, "No such image (the id is unknown or expired)", "id")
    path = _files(svc) / file_id

    def read() -> bytes | None:
        try:
            if time.time() - path.stat().st_mtime > svc.settings.image_ttl_s:
                path.unlink(missing_ok=True)
                return None
            return path.read_bytes()
        except FileNotFoundError:
            return None

    data = await anyio.to_thread.run_sync(read)
    if data is None:
        return oa_error(404, "No such image (the id is unknown or expired)", "id")
    media = ("image/png" if data[:4] == b"\x89PNG" else "image/jpeg" if data[:2] == b"\xff\xd8" else "image/webp")
    return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=60"})


# -- the routes --------------------------------------------------------------------------------------


async def _answer(svc, request: Request, opts: dict, fields: dict) -> Response:
    from spo_runtime.imaging import encode_image

    results = await context.run(svc, request, [fields], opts["n"], opts["seed"])
    encoded = await anyio.to_thread.run_sync(lambda: [encode_image(r, opts["format"], opts["quality"]) for r in results])
    data = []
    for r, blob in zip(results, encoded):
        if opts["response_format"] == "url":
            file_id = await anyio.to_thread.run_sync(store, svc, blob)
            data.append({"url": f"{public_base(svc)}/v1/images/files/{file_id}", "revised_prompt": None})
        else:
            data.append({"b64_json": base64.b64encode(blob).decode(), "revised_prompt": None})
        if r.selection is not None:  # best_of > 1: the chosen candidate's score
            data[-1]["preference_score"] = r.selection.score
    size = f"{results[0].image.width}x{results[0].image.height}"
    return JSONResponse({"created": int(time.time()), "data": data, "output_format": opts["format"], "size": size,
                         "background": "opaque"},
                        headers={"X-Seed": str(results[0].seed), "X-Adapter": results[0].adapter or ""})


@guarded(GUARD)
async def generations(svc, request: Request) -> Response:
    body = context.json_body(await request.body() or b"null")
    if not isinstance(body, dict):
        raise InvalidRequestError("body", "must be a JSON object")
    opts = parse(body, svc)
    return await _answer(svc, request, opts, opts["request"])


@guarded(GUARD)
async def edits(svc, request: Request) -> Response:
    from PIL import Image

    from spo_runtime.imaging import image_from_bytes

    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "multipart/form-data":
        raise InvalidRequestError("body", f"must be multipart/form-data (as the OpenAI SDK sends it), got {media!r}")
    try:  # the door bounds the body's bytes (SPO_MAX_IMAGE_BYTES); the parser its parts
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS)
    except (HTTPException, MultiPartException) as e:  # Starlette's: a part too many or too large, a broken body
        detail = e.detail if isinstance(e, HTTPException) else e.message
        raise InvalidRequestError("body", f"multipart/form-data: {detail} (at most {MAX_FILES} files and "
                                          f"{MAX_FIELDS} fields)") from None
    try:
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        files = [(k, v) for k, v in form.multi_items() if not isinstance(v, str)]
        if any(k == "mask" for k, _ in files) or fields.get("mask"):
            raise InvalidRequestError("mask", "masks are not supported (no inpainting): send the image alone; the whole "
                                              f"image is edited (img2img at strength {DEFAULT_STRENGTH})")
        images = [f for k, f in files if k in ("image", "image[]")]
        if len(images) != 1 or any(k not in ("image", "image[]") for k, _ in files):
            raise InvalidRequestError("image", f"exactly one image file is supported, got {len(images)}"
                                      + (f" (and {', '.join(k for k, _ in files if k not in ('image', 'image[]'))})"
                                         if len(files) != len(images) else ""))
        data = await images[0].read()
    finally:
        await form.close()
    opts = parse(fields, svc, form=True)
    strength = fields.get("strength")
    try:
        strength = DEFAULT_STRENGTH if strength in (None, "") else float(strength)
    except ValueError:
        raise InvalidRequestError("strength", f"must be a number in (0, 1], got {strength!r}") from None

    def decode():
        request_fields = opts["request"]
        try:  # the uploaded file's bytes, bounded from its header, then decoded once
            return image_from_bytes(data, size_range=svc.pipe.preset.size_range, width=request_fields.get("width"),
                                    height=request_fields.get("height"))
        except ValueError as e:
            raise InvalidRequestError("image", str(e)) from None

    init: Image.Image = await anyio.to_thread.run_sync(decode)
    return await _answer(svc, request, opts, {**opts["request"], "init_image": init, "strength": strength})


@guarded(GUARD, ready=False)
async def models(svc, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model(svc)]})


def _model(svc) -> dict:
    if svc is None:
        return {"id": "spo", "object": "model", "created": 0, "owned_by": "spo-serve"}
    name = svc.pipe.preset.name if svc.pipe is not None else svc.settings.model
    return {"id": name, "object": "model", "created": int(svc.started) if svc else 0, "owned_by": "spo-serve"}


ROUTES = [
    Route("/v1/images/generations", generations, methods=["POST"]),
    Route("/v1/images/edits", edits, methods=["POST"]),
    Route("/v1/images/files/{file_id}", image_file, methods=["GET"]),
    Route("/v1/models", models, methods=["GET"]),
]
