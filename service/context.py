"""What every route module shares: the service of this worker (`bind`, `bound`), whether it can take a
request now (`not_ready`), the one credential rule (`credentials_ok`), `guarded` (credentials, readiness,
typed errors in the route's API shape), `run` (n requests through the engine), the seed draw, the
request id and the access log, and what the job routes share (`job_prompts`, `job_id`).

Route modules import this module, never each other; the service (service.py) binds itself here at start.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import json
import logging
import math
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Protocol

import anyio
from starlette.requests import Request
from starlette.responses import Response

from service import auth, door
from service.errors import map_error
from spo_runtime.errors import EngineUnavailableError, InvalidRequestError
from spo_runtime.limits import MAX_SEED

log = logging.getLogger("spo_serve")
access = logging.getLogger("spo_serve.access")  # one JSON line per generation request


def configure_logging() -> None:
    """Our loggers write lines to stderr (BentoML configures its own loggers only). Once per process, at start."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class Service(Protocol):
    """What the routes use of the service (service.SPOService); the engine, pipeline and stores are None
    until the model has loaded."""

    settings: Any  # spo_runtime.settings.Settings
    bodies: Any  # schemas.Bodies: the generation bodies of the served preset
    ready: bool
    draining: float | None  # monotonic time of SIGTERM
    failure: str | None  # why the model failed to load
    inflight: int  # generation requests between the door and their last byte
    started: float
    api_token: str | None
    admin_token: str
    engine: Any
    pipe: Any
    sync: Any
    admin_store: Any
    jobs: Any
    supervisor: Any


class _Bound:
    service: Service | None = None


def bind(service: Service) -> None:
    """Make `service` this worker's (the service calls this once, at start)."""
    _Bound.service = service


def bound() -> Service | None:
    """This worker's service; None before it has started."""
    return _Bound.service


# -- who may call ------------------------------------------------------------------------------


def credentials_ok(svc: Service, headers: Mapping[str, str], *, admin: bool = False, basic: bool = False) -> bool:
    """The one credential rule. Admin routes: `Authorization: Bearer <admin token>`. Generation routes: anyone
    while SPO_API_TOKEN is unset; set, `Bearer <token>` with the api or the admin token, or with `basic`
    (A1111's --api-auth) HTTP Basic with either token as the password and any user name. Constant time."""
    if admin:
        tokens = [svc.admin_token]
    elif not svc.api_token:
        return True
    else:
        tokens = [t for t in (svc.api_token, svc.admin_token) if t]
    header = headers.get("authorization") or ""
    if any(hmac.compare_digest(header.encode(), b"Bearer " + t.encode()) for t in tokens):
        return True
    if basic and header[:6].lower() == "basic ":
        try:
            user_pass = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return False
        password = user_pass.partition(":")[2]
        return any(hmac.compare_digest(password.encode(), t.encode()) for t in tokens)
    return False


# -- whether it can take a request now ------------------------------------------------------------


def reason_code(failure: str | None) -> str | None:
    """Why the model failed to load, for callers without the admin token: the exception's type only
    (its message may hold paths, hub ids or host names; the admin sees it whole)."""
    return None if failure is None else failure.split(":", 1)[0].strip() or "load_failed"


def unavailable(svc: Service | None) -> EngineUnavailableError:
    """Why the service cannot take a request, with the Retry-After that reason deserves."""
    if svc is None:
        return EngineUnavailableError("the server is starting", retry_after=5)
    if svc.draining is not None:
        return EngineUnavailableError("the server is stopping (SIGTERM): send this request to another replica",
                                      retry_after=1)
    if svc.engine is not None and not svc.engine.alive:
        # the exception's type only: its text may hold paths (the server log and /info with the admin token have it)
        return EngineUnavailableError(f"the engine thread died ({svc.engine.died_type}); the server must be restarted",
                                      retry_after=30)
    if svc.failure:
        return EngineUnavailableError(f"the model failed to load ({reason_code(svc.failure)}); the server log and "
                                      "/info with the admin token say why", retry_after=30)
    return EngineUnavailableError("the model is still loading", retry_after=5)


def not_ready(svc: Service | None, *, admin: bool = False) -> EngineUnavailableError | None:
    """None when the service can take the request now, else why not. Generation routes need the model
    loaded, no SIGTERM and a live engine; admin routes only the model loaded (they work while draining)."""
    if svc is None:
        return unavailable(None)
    if admin:
        ok = svc.ready
    else:
        ok = svc.ready and svc.draining is None and svc.engine is not None and svc.engine.alive
    return None if ok else unavailable(svc)


@dataclass(frozen=True)
class Shape:
    """How one API answers what `guarded` refuses: a caller without credentials, a typed error."""

    unauthorized: Callable[[], Response]
    error: Callable[..., Response]  # (exception, admin: whether the caller holds the admin token) -> answer
    admin: bool = False  # admin routes: the admin token, and readiness as `not_ready(admin=True)`
    basic: bool = False  # HTTP Basic with the token as the password is accepted too (A1111)
    retry_after: float | None = None  # this API's Retry-After when not ready (None: the reason's own)


ADMIN = Shape(unauthorized=auth.admin_unauthorized, error=map_error, admin=True)  # /admin/*, /train/*, /eval/*


def door_check(shape: Shape) -> Callable[[Mapping[str, str]], Response | None]:
    """The door's check for the routes `shape` guards: `guarded`'s credential rule, applied before the body is
    read (None lets the caller in; else `shape.unauthorized()`). The route checks again, as it must anyway."""

    def check(headers: Mapping[str, str]) -> Response | None:
        svc = bound()
        ok = svc is None or credentials_ok(svc, headers, admin=shape.admin, basic=shape.basic)
        return None if ok else shape.unauthorized()

    return check


def guarded(shape: Shape, ready: bool = True):
    """Route decorator: `handler(svc, request)` runs only for a caller with credentials (`shape.unauthorized()`
    otherwise) and, with `ready`, when the service can take the request; any exception it raises, typed
    or not, is answered by `shape.error` (the route's API error shape)."""

    def decorate(handler: Callable[[Service | None, Request], Awaitable[Response]]):
        @functools.wraps(handler)
        async def wrapped(request: Request) -> Response:
            svc = bound()
            if svc is not None and not credentials_ok(svc, request.headers, admin=shape.admin, basic=shape.basic):
                return shape.unauthorized()
            try:
                reason = not_ready(svc, admin=shape.admin) if ready else None
                if reason is not None:
                    if shape.retry_after is not None:
                        reason.retry_after = shape.retry_after
                    raise reason
                return await handler(svc, request)
            except Exception as e:
                return shape.error(e, admin=svc is not None and credentials_ok(svc, request.headers, admin=True))

        return wrapped

    return decorate


async def body(request: Request, model):
    """The request's body as `model`: the door's parsed body when it validated this one, else parsed here
    (InvalidRequestError naming the field)."""
    value = door.parsed(request.scope, model)
    return value if value is not None else door.parse_body(model, await request.body())


_SURROGATE = re.compile("[\ud800-\udfff]")


def json_body(raw: bytes) -> Any:
    """A compatibility route's JSON body, parsed by Python's json (NaN and Infinity parse: the route's model
    refuses them naming the field), or InvalidRequestError naming `body`: not JSON, nested too deep, or a
    lone surrogate escape ("\\ud800") in a string or a key, which no answer could echo as UTF-8."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise InvalidRequestError("body", "must be JSON nested less deep") from None
    except ValueError as e:
        raise InvalidRequestError("body", f"must be JSON ({e})") from None
    for where, leaf in leaves(value):
        if isinstance(leaf, str) and _SURROGATE.search(leaf):
            raise InvalidRequestError("body", f"must be valid UTF-8 text: a lone surrogate escape in {where}")
    return value


def leaves(value: Any):
    """(path, value) of every key and scalar in a parsed JSON value (path: a.b.0, or body for the top level),
    without recursion."""
    stack: list[tuple[str | None, Any]] = [(None, value)]
    while stack:
        at, v = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                yield at or "body", k
                stack.append((k if at is None else f"{at}.{k}", item))
        elif isinstance(v, list):
            stack.extend((f"{at or 'body'}.{i}", item) for i, item in enumerate(v))
        else:
            yield at or "body", v


def check_finite(value: Any) -> None:
    """InvalidRequestError naming the first NaN or Infinity in a parsed JSON value (no answer can echo one)."""
    for where, leaf in leaves(value):
        if isinstance(leaf, float) and not math.isfinite(leaf):
            raise InvalidRequestError(where, f"must be a finite number, got {leaf}")


# -- jobs (/train/*, /eval/*) ----------------------------------------------------------------------------


def job_prompts(svc: Service, prompts: list[str] | None, prompts_file: str | None, limit: int) -> list[str]:
    """A job's prompts: exactly one of a list or a .txt file under SPO_DATA_DIR (one prompt a line, blank
    lines skipped); 1..`limit` of them, each a valid one-line prompt (InvalidRequestError naming `prompts`,
    `prompts_file` or `prompts[i]`). Blocking (file reads): call it off the event loop."""
    from spo_runtime.requests import GenerationRequest
    from spo_runtime.state import resolve_under

    if (prompts is None) == (prompts_file is None):
        raise InvalidRequestError("prompts", "give exactly one of prompts (a list) or prompts_file")
    if prompts_file is not None:
        path = resolve_under(svc.jobs.root.parent, prompts_file, "prompts_file", suffixes=(".txt",))
        prompts = [p for p in path.read_text().splitlines() if p.strip()]
    if not 1 <= len(prompts) <= limit:
        raise InvalidRequestError("prompts", f"must hold 1..{limit} prompts, got {len(prompts)}")
    for i, p in enumerate(prompts):
        try:
            GenerationRequest.parse({"prompt": p})
        except InvalidRequestError as e:
            raise InvalidRequestError(f"prompts[{i}]", e.message) from None
        if "\n" in p:
            raise InvalidRequestError(f"prompts[{i}]", "must be one line")
    return prompts


def job_id(request: Request) -> str:
    """The `job_id` query parameter (InvalidRequestError naming it when absent)."""
    value = request.query_params.get("job_id")
    if not value:
        raise InvalidRequestError("job_id", "query parameter required")
    return value


async def cancel_job(svc: Service, request: Request, kind: str) -> dict:
    """POST /train/cancel, /eval/cancel: the body's job (of this kind, else 404) canceled; its record."""
    from service.schemas import JobBody

    job = (await body(request, JobBody)).job_id
    await anyio.to_thread.run_sync(svc.jobs.read, job, kind)
    return await anyio.to_thread.run_sync(svc.jobs.cancel, job)


async def resume_job(svc: Service, request: Request, kind: str) -> dict:
    """POST /train/resume, /eval/resume: the body's failed, canceled or interrupted job (of this kind)
    queued again, within SPO_MAX_QUEUED_JOBS; its record."""
    from service.schemas import JobBody

    job = (await body(request, JobBody)).job_id
    await anyio.to_thread.run_sync(svc.jobs.read, job, kind)
    return await anyio.to_thread.run_sync(lambda: svc.jobs.resume(job, max_queued=svc.settings.max_queued_jobs))


# -- running requests ----------------------------------------------------------------------------------


def first_seed(seed: int | None, n: int) -> int:
    """The first of n seeds seed..seed+n-1: `seed`, or drawn so that all n stay <= MAX_SEED."""
    if seed is None:
        return secrets.randbelow(MAX_SEED - n + 2)
    if not 0 <= seed <= MAX_SEED - n + 1:
        raise InvalidRequestError("seed", f"with n={n} must be in 0..{MAX_SEED - n + 1}, got {seed}")
    return seed


async def run(svc: Service, request: Request, fields: list[dict], n: int, seed: int | None) -> list:
    """n requests of one prompt through the engine, as /generate_batch runs them: request i is
    fields[i % len(fields)] with seed seed+i (drawn when None). Each distinct request is validated once
    (a 400 naming the field); the access-log line is written once, whatever the outcome."""
    first = first_seed(seed, n)
    svc.inflight += 1
    t0, status, results = time.perf_counter(), 200, None
    try:
        parsed = [svc.pipe.parse(f) for f in fields]
        k = max(p.best_of for p in parsed)  # best_of (OpenAI's extra_body): image i's candidates from seed + i*k
        if k > 1:
            first = first_seed(seed, n * k)
        requests = [parsed[i % len(parsed)].model_copy(update={"seed": first + i * k}) for i in range(n)]
        results = await svc.engine.generate(requests, is_disconnected=request.is_disconnected)
        return results
    except Exception as e:
        status = map_error(e).status_code
        raise
    finally:
        svc.inflight -= 1
        access_log(svc, request.url.path, request_id(request.headers), {**fields[0], "n": n}, status, t0, results)


def request_id(headers: Mapping[str, str]) -> str:
    """The caller's X-Request-Id when it is short and plain, else a fresh one."""
    given = headers.get("x-request-id", "")
    return given if given and len(given) <= 64 and given.isascii() and given.replace("-", "").isalnum() else uuid.uuid4().hex


_LOGGED = ("width", "height", "num_inference_steps", "guidance_scale", "scheduler", "lora_scale", "adapter", "n")


def access_log(svc: Service, route: str, rid: str, fields: Mapping[str, Any], status: int, t0: float,
               results=None) -> None:
    """The request's one access-log line (JSON): route, id, status, ms, the prompt's length (its text only
    with SPO_LOG_PROMPTS), the parameters set, and with results their timings and seeds."""
    rec = {"route": route, "id": rid, "status": status, "ms": round((time.perf_counter() - t0) * 1e3, 1),
           "prompt_len": len(fields.get("prompt") or ""),
           **{k: fields.get(k) for k in _LOGGED if fields.get(k) is not None}}
    if svc.settings.log_prompts:
        rec["prompt"] = fields.get("prompt")
    if results:
        t = results[0].timings
        rec.update({k: round(t.get(k, 0.0), 1) for k in ("queue_ms", "encode_ms", "denoise_ms", "decode_ms")})
        rec["seeds"] = [r.seed for r in results]
    access.info(json.dumps(rec))
