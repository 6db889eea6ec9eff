"""HTTP bodies of the admin and helper routes, error bodies, and the body-size limit."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.responses import JSONResponse

from spo_runtime.requests import validation_error

GENERATION_BODY_LIMIT = 64 * 1024
TRAINING_BODY_LIMIT = 8 * 1024 * 1024
FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ScaleBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    scale: float


class NameBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str | None


class TrainSubmitBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompts: list[str] | None = None
    prompts_file: str | None = None
    config: dict[str, Any] = {}
    start_adapter: str | None = None
    output_adapter: str | None = None


class JobBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    job_id: str


class LoadBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    file: str
    replace: bool = False


def error_body(status: int, message: str, field: str | None = None, errors: list[tuple[str, str]] | None = None) -> dict:
    """One shape for every error: BentoML's own validation errors look the same."""
    body: dict[str, Any] = {"error": message, "status": status}
    if errors:
        body["detail"] = [{"loc": [f], "msg": m, "type": "value_error"} for f, m in errors]
    elif field:
        body["detail"] = [{"loc": [field], "msg": message, "type": "value_error"}]
    return body


def error_response(status: int, message: str, field: str | None = None, errors=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, field, errors), status_code=status, headers=headers)


def parse_body(model: type[BaseModel], raw: bytes) -> BaseModel:
    """JSON body -> model, or InvalidRequestError naming the field."""
    from spo_runtime.errors import InvalidRequestError

    try:
        data = json.loads(raw or b"{}")
    except json.JSONDecodeError as e:
        raise InvalidRequestError("body", f"must be JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("body", "must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


class BodyLimitMiddleware:
    """Refuse bodies over the route's limit (Content-Length or streamed) with a 400 naming the limit."""

    def __init__(self, app, limits: dict[str, int] | None = None, default: int = TRAINING_BODY_LIMIT):
        self.app = app
        self.limits = limits or {"/generate": GENERATION_BODY_LIMIT, "/generate_batch": GENERATION_BODY_LIMIT}
        self.default = default

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope.get("path", ""), self.default)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._refuse(send, limit, int(length))
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
            await self._refuse(send, limit, e.size)

    @staticmethod
    async def _refuse(send, limit: int, size: int):
        body = json.dumps(error_body(400, f"body: must be at most {limit} bytes, got {size}", "body")).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    def __init__(self, size: int):
        self.size = size
