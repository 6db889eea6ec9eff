"""The door: the outermost ASGI middleware, which keeps the HTTP contract before any route runs (body
size, media type, the generation routes' schema, every route's credential before its body is read) and rewrites every error the
framework answers by itself into the one error body, or the path's foreign API's shape.

A generation body is validated once, here, and handed on parsed: the route reads it with `parsed(scope)`.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import anyio
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.responses import Response

from service.errors import ForeignShape, error_body
from spo_runtime.errors import InvalidRequestError
from spo_runtime.validation import validation_error

GENERATION_BODY_LIMIT = 64 * 1024
DEFAULT_BODY_LIMIT = 8 * 1024 * 1024  # training submissions carry prompt lists
PARSED = "spo.body"  # the key of the door's parsed body in the ASGI scope's `state`


def parse_body(model: type[BaseModel], raw: bytes) -> BaseModel:
    """A JSON body -> `model` (strict JSON types), or InvalidRequestError naming the field."""
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as e:
        raise validation_error(e, model) from None


def parsed(scope: Mapping, model: type[BaseModel] | None = None) -> BaseModel | None:
    """The body the door validated for this request (an instance of `model` when given), or None."""
    body = (scope.get("state") or {}).get(PARSED)
    return body if body is not None and (model is None or isinstance(body, model)) else None


class Contract:
    """Outermost middleware. For every POST: read the body here, whatever its framing (Content-Length or
    chunked), and refuse it past the route's limit (`limits`, else `default_limit`) with a 400 naming `body`
    (the status this API has always given) in the route's API shape; the route reads the body read here.
    Before reading it, check the caller (`guards`: path prefix -> headers -> None or the refusal; the longest
    prefix of the path applies), so a caller without credentials never gets a body read, on any route.
    For the generation routes (`models`): refuse bodies that are not JSON (415)
    and validate the JSON against the route's model, answering our 400 naming the field; the framework's
    own validation then never sees a bad body, and the route gets the parsed model (`parsed`); validating runs
    in a worker thread, since it decodes an init_image (bounded from its header first). For every
    route: an error answer that is not already in the one error shape (a framework 404/405/500, a
    validation error of BentoML's) is rewritten into it, or into the shape registered for its path prefix
    (`shapes`)."""

    def __init__(self, app, models: dict[str, type[BaseModel]] | None = None,
                 limits: dict[str, int] | None = None, default_limit: int = DEFAULT_BODY_LIMIT,
                 docs: Callable[[dict], dict] | None = None,
                 guards: Mapping[str, Callable[[Headers], Response | None]] | None = None,
                 image_limit: int | None = None, shapes: Mapping[str, ForeignShape] | None = None):
        self.app = app
        self.docs = docs
        self.image_limit = image_limit  # generation bodies that carry init_image may be this large
        # path prefix -> (headers -> None (let in) or the answer, a 401 in the route's API shape), longest first
        self.guards = sorted((guards or {}).items(), key=lambda kv: -len(kv[0]))
        self.models = models or {}
        self.limits = limits if limits is not None else {path: GENERATION_BODY_LIMIT for path in self.models}
        self.default_limit = default_limit
        self.shapes = dict(shapes or {})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        send = _shape_errors(send, next((s for prefix, s in self.shapes.items() if path.startswith(prefix)), None))
        if self.docs is not None and scope.get("method") == "GET" and scope.get("path") == "/docs.json":
            send = _rewrite_json(send, self.docs)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.limits.get(path, self.default_limit)
        plain_limit = limit  # a generation body without an image keeps the small limit
        if path in self.models and self.image_limit:
            limit = max(limit, self.image_limit)
        headers = Headers(scope=scope)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return await _refuse(send, 400, f"body: must be at most {limit} bytes, got {int(length)}", "body")
        guard = next((check for prefix, check in self.guards if path.startswith(prefix)), None)
        refusal = guard(headers) if guard is not None else None
        if refusal is not None:
            return await refusal(scope, receive, send)
        model = self.models.get(path)
        if model is not None:
            media = headers.get("content-type", "application/json").split(";")[0].strip().lower()
            if media not in ("application/json", ""):
                return await _refuse(send, 415, f"content-type: must be application/json, got {media!r}",
                                     "content-type", "unsupported_media_type")
        # every route's body is read here, bounded, before its handler runs: an overflow is this answer, in
        # the route's API shape, never an exception inside a handler (which would answer it as a 500)
        try:
            body = await _read(receive, limit)
        except _TooLarge as e:
            return await _refuse(send, 400, f"body: must be at most {limit} bytes, got at least {e.size}", "body")
        if body is None:  # the client left
            return
        if model is not None:
            # off the event loop: validating decodes an init_image (after its header is bounded)
            value, invalid, image = await anyio.to_thread.run_sync(_validate, model, body, plain_limit)
            if len(body) > plain_limit and not image:
                return await _refuse(send, 400, f"body: must be at most {plain_limit} bytes without init_image "
                                                f"(SPO_MAX_IMAGE_BYTES={limit} with one), got {len(body)}", "body")
            if invalid is not None:
                return await _send_json(send, 400, error_body(400, str(invalid), invalid.field,
                                                              getattr(invalid, "errors", None)))
            scope["state"] = {**(scope.get("state") or {}), PARSED: value}  # a copy: the server's state dict stays as it was
        await self.app(scope, _replay(body, receive), send)


async def _read(receive, limit: int) -> bytes | None:
    """The whole request body, or None when the client disconnected; _TooLarge once it passes `limit`."""
    chunks, seen, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            raise _TooLarge(seen)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A `receive` that hands the app the body read at the door, then waits on the client as before."""
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _validate(model: type[BaseModel], body: bytes, plain_limit: int) -> tuple[Any, InvalidRequestError | None, bool]:
    """(the parsed body or None, the error or None, whether it carries an init_image): in a worker thread."""
    try:
        value = parse_body(model, body)
        return value, None, getattr(value, "init_image", None) is not None
    except InvalidRequestError as e:
        return None, e, len(body) > plain_limit and _has_image(body)


def _has_image(body: bytes) -> bool:
    """Whether a body that did not validate carries an init_image (which picks its size limit)."""
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("init_image") is not None


class _TooLarge(Exception):
    def __init__(self, size: int):
        self.size = size


def _shape_errors(send, shape: ForeignShape | None = None):
    """Wrap `send`: buffer an error answer's body and rewrite it into the one shape unless it has it
    (or into the path's foreign `shape` unless it has that one)."""
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
        body = _reshape(status, raw) if shape is None else _foreign(shape, status, raw)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        state["pass"] = True
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return wrapped


def _foreign(shape: ForeignShape, status: int, raw: bytes) -> bytes:
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    if isinstance(data, dict) and shape.is_own(data):
        return raw
    return shape.from_ours(status, json.loads(_reshape(status, raw)))


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
    """Any error body (ours, the framework's) as the one error shape."""
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
