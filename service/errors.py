"""Errors over HTTP: one body for every 4xx/5xx, the mapping from spo_runtime's typed errors, and the
ASGI middleware that keeps the contract at the door (body size, media type, the request schema) and
rewrites any error the framework answers by itself into the same body."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse

from spo_runtime.errors import InvalidRequestError
from spo_runtime.validation import validation_error

log = logging.getLogger("spo_serve")

GENERATION_BODY_LIMIT = 64 * 1024
DEFAULT_BODY_LIMIT = 8 * 1024 * 1024  # training submissions carry prompt lists

# Path prefix -> (status, raw error body) -> body. Routes that speak another API (the OpenAI and A1111
# compatibility routes) register their error shape here; every other path keeps the one error shape.
ERROR_SHAPES: dict[str, Callable[[int, bytes], bytes]] = {}


def ours(status: int, raw: bytes) -> dict:
    """Any error body (ours, the framework's) as the one error shape, parsed."""
    return json.loads(_reshape(status, raw))


def foreign_shape(prefix: str, make: Callable[..., JSONResponse], is_own: Callable[[dict], bool],
                  renames: dict[str, str] | None = None):
    """Error answers under `prefix` in another API's shape: `make(status, message, field, headers)` builds
    one, `is_own(body)` recognises a body already in it. Registers the door's rewrite for the prefix and
    returns `from_exception(e)`: spo_runtime's typed errors (mapped once, by map_error) in that shape, our
    field names replaced by the client's (`renames`: ours -> theirs, e.g. guidance_scale -> cfg_scale)."""

    def fields(status: int, body: dict) -> tuple[str, str | None]:
        loc = body["detail"][0]["loc"] if body["detail"] else []
        return body["error"], (str(loc[0]) if loc else None)

    def shape(status: int, raw: bytes) -> bytes:
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        if isinstance(data, dict) and is_own(data):
            return raw
        return make(status, *fields(status, ours(status, raw)), None).body

    def from_exception(e: BaseException) -> JSONResponse:
        resp = map_error(e)
        message, field = fields(resp.status_code, json.loads(resp.body))
        if field in (renames or {}):
            message, field = f"{renames[field]}: {message.removeprefix(field + ': ')}", renames[field]
        retry = {k: v for k, v in resp.headers.items() if k.lower() == "retry-after"}
        return make(resp.status_code, message, field, retry or None)

    ERROR_SHAPES[prefix] = shape
    return from_exception


def error_body(status: int, message: str, field: str | None = None, errors: list[tuple[str, str]] | None = None,
               kind: str = "value_error") -> dict:
    """{"error", "status", "detail": [{"loc", "msg", "type"}]}: the one error shape."""
    if errors:
        detail = [{"loc": [f], "msg": m, "type": kind} for f, m in errors]
    else:
        detail = [{"loc": [field] if field else [], "msg": message, "type": kind}]
    return {"error": message, "status": status, "detail": detail}


def error_response(status: int, message: str, field: str | None = None, errors=None, headers=None,
                   kind: str = "value_error") -> JSONResponse:
    return JSONResponse(error_body(status, message, field, errors, kind), status_code=status, headers=headers)


class Conflict(Exception):
    """The request is well-formed but contradicts the current state (HTTP 409)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def map_error(e: BaseException) -> JSONResponse:
    """spo_runtime's typed errors -> HTTP; anything else is a logged 500 that names only the type."""
    from spo_runtime.errors import (AdapterInUseError, AdapterMemoryError, AdapterNotFoundError, DeadlineExceededError,
                                    EngineUnavailableError, JobNotFoundError, JobStateError, LoraFormatError,
                                    NonFiniteError, QueueFullError, RequestCancelledError)

    if isinstance(e, Conflict):
        return error_response(409, str(e), e.field, kind="conflict")
    if isinstance(e, JobStateError):
        return error_response(409, str(e), "job_id", kind="conflict")
    if isinstance(e, InvalidRequestError):
        return error_response(400, str(e), e.field, getattr(e, "errors", None))
    if isinstance(e, JobNotFoundError):
        return error_response(404, str(e), "job_id", kind="not_found")
    if isinstance(e, AdapterNotFoundError):
        return error_response(400, str(e), "adapter")
    if isinstance(e, LoraFormatError):
        return error_response(400, f"file: {e}", "file")
    if isinstance(e, AdapterInUseError):
        return error_response(409, str(e), "name", kind="conflict")
    if isinstance(e, AdapterMemoryError):
        return error_response(507, str(e), "name", kind="insufficient_storage")
    if isinstance(e, QueueFullError):
        return error_response(429, str(e), "queue", headers={"Retry-After": str(int(e.retry_after))}, kind="overloaded")
    if isinstance(e, DeadlineExceededError):
        return error_response(504, str(e), "timeout_s", kind="deadline")
    if isinstance(e, RequestCancelledError):
        return error_response(499, str(e), kind="cancelled")
    if isinstance(e, EngineUnavailableError):
        return error_response(503, str(e), headers={"Retry-After": str(int(max(1, e.retry_after)))}, kind="unavailable")
    if isinstance(e, NonFiniteError):
        return error_response(500, str(e), kind="non_finite")
    log.error("unexpected error", exc_info=e)
    return error_response(500, f"internal error: {type(e).__name__}", kind="internal")


def parse_body(model: type[BaseModel], raw: bytes) -> BaseModel:
    """A JSON body -> `model` (strict JSON types), or InvalidRequestError naming the field."""
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as e:
        raise validation_error(e, model) from None


# -- ASGI middleware -------------------------------------------------------------------------


class Contract:
    """Outermost middleware. For every POST: refuse bodies over the route's limit (400 naming the limit: the status this API
    has always given).
    For the generation routes: refuse bodies that are not JSON (415) and validate the JSON against the
    route's model, answering our 400 naming the field; the framework's own validation then never sees a
    bad body. For every route: an error answer that is not already in the one error shape (a framework
    404/405/500, a validation error of BentoML's) is rewritten into it."""

    def __init__(self, app, models: dict[str, type[BaseModel]] | None = None,
                 limits: dict[str, int] | None = None, default_limit: int = DEFAULT_BODY_LIMIT,
                 docs: Callable[[dict], dict] | None = None, guard: Callable[[dict], dict | None] | None = None,
                 image_limit: int | None = None):
        self.app = app
        self.docs = docs
        self.image_limit = image_limit  # generation bodies that carry init_image may be this large
        self.guard = guard  # headers -> None (let in) or an error body (401) for the generation routes
        self.models = models or {}
        self.limits = limits if limits is not None else {path: GENERATION_BODY_LIMIT for path in self.models}
        self.default_limit = default_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        send = _shape_errors(send, next((fn for prefix, fn in ERROR_SHAPES.items() if path.startswith(prefix)), None))
        if self.docs is not None and scope.get("method") == "GET" and scope.get("path") == "/docs.json":
            send = _rewrite_json(send, self.docs)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.limits.get(path, self.default_limit)
        plain_limit = limit  # a generation body without an image keeps the small limit
        if path in self.models and self.image_limit:
            limit = max(limit, self.image_limit)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await _refuse(send, 400, f"body: must be at most {limit} bytes, got {int(length)}", "body")
        model = self.models.get(path)
        if model is None:  # stream through, counting
            return await self._limited(scope, receive, send, limit)
        refusal = self.guard(headers) if self.guard is not None else None
        if refusal is not None:
            return await _send_json(send, refusal["status"], refusal, [(b"www-authenticate", b"Bearer")])
        media = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        if media not in (b"application/json", b""):
            return await _refuse(send, 415, f"content-type: must be application/json, got {media.decode('latin-1')!r}",
                                 "content-type", "unsupported_media_type")
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await _refuse(send, 400, f"body: must be at most {limit} bytes, got more", "body")
        if len(body) > plain_limit and not _has_image(body):
            return await _refuse(send, 400, f"body: must be at most {plain_limit} bytes without init_image "
                                            f"(SPO_MAX_IMAGE_BYTES={limit} with one), got {len(body)}", "body")
        try:
            parse_body(model, body)
        except InvalidRequestError as e:
            return await _send_json(send, 400, error_body(400, str(e), e.field, getattr(e, "errors", None)))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _limited(self, scope, receive, send, limit):
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(seen)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge as e:
            await _refuse(send, 400, f"body: must be at most {limit} bytes, got {e.size}", "body")


def _has_image(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("init_image") is not None


class _TooLarge(Exception):
    def __init__(self, size: int):
        self.size = size


def _shape_errors(send, reshape: Callable[[int, bytes], bytes] | None = None):
    """Wrap `send`: buffer an error answer's body and rewrite it into the one shape unless it has it
    (or into the path's registered shape, `reshape`)."""
    state: dict[str, Any] = {}

    async def wrapped(message):
        if message["type"] == "http.response.start":
            if message["status"] < 400:
                state["pass"] = True
                return await send(message)
            state.update(start=message, body=b"")
            return None
        if state.get("pass") or "start" not in state:
            return await send(message)
        state["body"] += message.get("body", b"")
        if message.get("more_body"):
            return None
        start, raw = state.pop("start"), state["body"]
        status = start["status"]
        body = (reshape or _reshape)(status, raw)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        state["pass"] = True
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return wrapped


def _rewrite_json(send, fn: Callable[[dict], dict]):
    """Wrap `send`: pass a successful JSON answer through `fn` (the OpenAPI document's additions)."""
    state: dict[str, Any] = {"body": b""}

    async def wrapped(message):
        if message["type"] == "http.response.start":
            state["start"] = message
            return None
        state["body"] += message.get("body", b"")
        if message.get("more_body"):
            return None
        start, body = state["start"], state["body"]
        if start["status"] == 200:
            body = json.dumps(fn(json.loads(body))).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return wrapped


def _reshape(status: int, raw: bytes) -> bytes:
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    if isinstance(data, dict) and {"error", "status", "detail"} <= set(data):
        return raw  # already ours
    if isinstance(data, dict) and isinstance(data.get("detail"), list) and all(isinstance(d, dict) for d in data["detail"]):
        # BentoML's validator: {"error": "N validation error for X", "detail": pydantic errors}
        detail = [{"loc": [str(p) for p in d.get("loc", [])], "msg": str(d.get("msg", "")), "type": str(d.get("type", ""))}
                  for d in data["detail"]]
        first = detail[0] if detail else {"loc": [], "msg": str(data.get("error", ""))}
        message = (".".join(first["loc"]) + ": " if first["loc"] else "") + first["msg"]
        return json.dumps({"error": message, "status": status, "detail": detail}).encode()
    if isinstance(data, list) and data and isinstance(data[0], dict):  # BentoML's ({"error": ...},)
        data = data[0]
    text = str(data.get("error") or data.get("detail") or "") if isinstance(data, dict) else raw.decode("utf-8", "replace")
    text = text.strip() or _PHRASES.get(status, "error")
    if status >= 500 and "unexpected error" in text:
        text = "internal error: see the server log"
    return json.dumps(error_body(status, text[:500], kind=_PHRASES.get(status, "error").lower().replace(" ", "_"))).encode()


_PHRASES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Entity", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout"}


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


async def _refuse(send, status: int, message: str, field: str, kind: str = "value_error") -> None:
    await _send_json(send, status, error_body(status, message, field, kind=kind))
