"""Errors over HTTP: the one body of every 4xx/5xx, the mapping from spo_runtime's typed errors to it, and
the same errors in another API's shape (`foreign_shape`) for the compatibility routes. The door
(`service.door`) rewrites whatever the framework answers by itself into these bodies."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Callable

from starlette.responses import JSONResponse

from spo_runtime.errors import InvalidRequestError

log = logging.getLogger("spo_serve")


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


def map_error(e: BaseException, admin: bool = False) -> JSONResponse:
    """spo_runtime's typed errors -> HTTP; anything else is a logged 500 that names only the type. `admin`:
    the caller holds the admin token, so an unknown adapter's 400 lists the loaded ones (to others it does
    not: error messages travel further than the answers of the listing routes)."""
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
        return error_response(400, str(e) if admin else f"adapter: {e.name!r} is not loaded", "adapter")
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


@dataclass(frozen=True)
class ForeignShape:
    """Error answers under `prefix` in another API's shape (the OpenAI and A1111 routes).

    make(status, message, field, headers) builds one answer; is_own(body) recognises a body already in
    that shape; renames maps our field names to the client's (e.g. guidance_scale -> cfg_scale)."""

    prefix: str
    make: Callable[..., JSONResponse]
    is_own: Callable[[dict], bool]
    renames: dict[str, str] = field(default_factory=dict)

    def from_exception(self, e: BaseException, admin: bool = False) -> JSONResponse:
        """spo_runtime's typed errors (mapped once, by map_error) in this shape, under the client's field names."""
        resp = map_error(e, admin)
        message, name = _fields(json.loads(resp.body))
        if name in self.renames:
            message, name = f"{self.renames[name]}: {message.removeprefix(name + ': ')}", self.renames[name]
        retry = {k: v for k, v in resp.headers.items() if k.lower() == "retry-after"}
        return self.make(resp.status_code, message, name, retry or None)

    def from_ours(self, status: int, body: dict) -> bytes:
        """One of our error bodies (error_body's shape) as this API's body."""
        return self.make(status, *_fields(body), None).body


def foreign_shape(prefix: str, make: Callable[..., JSONResponse], is_own: Callable[[dict], bool],
                  renames: dict[str, str] | None = None) -> ForeignShape:
    """The error shape of the API served under `prefix`; the app hands it to the door when it mounts the routes."""
    return ForeignShape(prefix, make, is_own, dict(renames or {}))


def _fields(body: dict) -> tuple[str, str | None]:
    """(message, field) of one of our error bodies."""
    loc = body["detail"][0]["loc"] if body["detail"] else []
    return body["error"], (str(loc[0]) if loc else None)
