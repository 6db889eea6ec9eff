"""spo-serve's BentoML service: `bentoml serve service.service:SPOService`.

Thin by design: it validates, maps errors to HTTP and calls `spo_runtime`. The model loads in a
background thread so /livez answers at once; /readyz turns 200 after one warm-up image.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

import anyio
import bentoml
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.schemas import (FORMATS, BodyLimitMiddleware, JobBody, LoadBody, NameBody, ScaleBody, TrainSubmitBody,
                             error_response, parse_body)

log = logging.getLogger("spo_serve")
access = logging.getLogger("spo_serve.access")
if not log.handlers:  # BentoML configures its own loggers only; ours write JSON lines to stderr
    _h = logging.StreamHandler()
    _h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(_h)
    log.setLevel(logging.INFO)
    log.propagate = False

WORKERS = int(os.environ.get("SPO_WORKERS", "1"))
_service: SPOService | None = None  # this worker's instance, for the mounted admin app


def _admin_ok(request: Request) -> tuple[bool, JSONResponse | None]:
    """Bearer token when SPO_ADMIN_TOKEN is set; otherwise loopback clients only."""
    token = os.environ.get("SPO_ADMIN_TOKEN")
    if token:
        got = request.headers.get("authorization", "")
        if got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), token.encode()):
            return True, None
        return False, error_response(401, "authorization: a valid 'Authorization: Bearer <SPO_ADMIN_TOKEN>' header is required",
                                     "authorization", headers={"WWW-Authenticate": "Bearer"})
    host = request.client.host if request.client else ""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True, None
    except ValueError:
        pass
    return False, error_response(401, "authorization: admin routes answer only loopback clients until SPO_ADMIN_TOKEN is set",
                                 "authorization", headers={"WWW-Authenticate": "Bearer"})


def _map_error(e: BaseException) -> JSONResponse:
    """spo_runtime's typed errors -> HTTP."""
    from spo_runtime.engine import DeadlineExceededError, EngineUnavailableError, QueueFullError, RequestCancelledError
    from spo_runtime.errors import (AdapterInUseError, AdapterMemoryError, AdapterNotFoundError, InvalidRequestError,
                                    LoraFormatError, NonFiniteError)

    from spo_runtime.jobs import JobNotFoundError

    if isinstance(e, InvalidRequestError):
        return error_response(400, str(e), e.field, getattr(e, "errors", None))
    if isinstance(e, JobNotFoundError):
        return error_response(404, str(e), "job_id")
    if isinstance(e, AdapterNotFoundError):
        return error_response(400, str(e), "adapter")
    if isinstance(e, LoraFormatError):
        return error_response(400, f"file: {e}", "file")
    if isinstance(e, AdapterInUseError):
        return error_response(409, str(e), "name")
    if isinstance(e, AdapterMemoryError):
        return error_response(507, str(e), "name")
    if isinstance(e, QueueFullError):
        return error_response(429, str(e), headers={"Retry-After": str(int(e.retry_after))})
    if isinstance(e, DeadlineExceededError):
        return error_response(504, str(e), "timeout_s")
    if isinstance(e, RequestCancelledError):
        return error_response(499, str(e))
    if isinstance(e, EngineUnavailableError):
        return error_response(503, str(e), headers={"Retry-After": str(int(max(1, e.retry_after)))})
    if isinstance(e, NonFiniteError):
        return error_response(500, str(e))
    log.exception("unexpected error", exc_info=e)
    return error_response(500, f"internal error: {type(e).__name__}")


@bentoml.service(
    name="spo-serve",
    workers=WORKERS,
    traffic={"timeout": 900, "max_concurrency": 512},
)
class SPOService:
    def __init__(self) -> None:
        global _service
        _service = self
        self.ready = False
        self.failure: str | None = None
        self.engine = None
        self.pipe = None
        self.sync = None
        self.started = time.time()
        threading.Thread(target=self._load, name="spo-load", daemon=True).start()

    # -- start-up ----------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            from spo_runtime import Settings, load_pipeline
            from spo_runtime.engine import Engine, EngineConfig
            from spo_runtime.state import AdminState, StateSync

            settings = Settings.from_env()
            config = EngineConfig.from_env(dict(os.environ))
            data_dir = Path(os.environ.get("SPO_DATA_DIR", ".data"))
            adapter_dir = Path(os.environ.get("SPO_ADAPTER_DIR", str(data_dir / "adapters")))
            self.pipe = load_pipeline(settings)
            self.state = AdminState(data_dir, adapter_dir)
            self.engine = Engine(self.pipe, config)
            self.sync = StateSync(self.pipe, self.state, on_change=lambda: self.engine.metrics.lora_scale.set(self.pipe.default_lora_scale))
            self.sync.running_scales = lambda: [s.scales for g in self.engine._running.values() for s in g]
            self.sync.poll()  # the persisted admin state, before the first request
            self.engine.on_boundary(self.sync.poll)
            self.engine.start()
            from spo_runtime.jobs import JobStore, Supervisor

            self.jobs = JobStore(data_dir, adapter_dir)
            metrics = self.engine.metrics
            self.supervisor = Supervisor(self.jobs, on_change=lambda c: [metrics.train_jobs.labels(k).set(v) for k, v in c.items()]).start()
            t0 = time.perf_counter()
            self.engine.generate_sync([{"prompt": "warm-up", "seed": 0, "num_inference_steps": 2}])
            if settings.compile:  # also compile the residual-LoRA graph before the first request needs it
                self.engine.generate_sync([{"prompt": "warm-up", "seed": 0, "num_inference_steps": 2,
                                            "lora_scale": 0.5 if self.pipe.default_lora_scale != 0.5 else 0.25}])
            log.info("warm-up image in %.2fs; ready", time.perf_counter() - t0)
            self.ready = True
        except Exception as e:  # keep the process up and say why on /livez and /readyz
            self.failure = f"{type(e).__name__}: {e}"
            log.exception("spo-serve failed to start")

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        """Let a running trainer checkpoint at its round boundary, then stop the engine."""
        sup = getattr(self, "supervisor", None)
        log.info("shutting down (trainer running: %s)", bool(sup and sup.proc and sup.proc.poll() is None))
        if sup is not None:
            sup.stop()
        if self.engine is not None:
            self.engine.stop()

    def __is_ready__(self) -> bool:
        return self.ready

    def __is_alive__(self) -> bool:
        return self.failure is None

    def _unready(self) -> JSONResponse:
        if self.failure:
            return error_response(503, f"the model failed to load: {self.failure}", headers={"Retry-After": "30"})
        return error_response(503, "the model is still loading", headers={"Retry-After": "5"})

    # -- generation --------------------------------------------------------------------------

    async def _run(self, ctx: bentoml.Context, requests: list[dict], timeout_s: float | None):
        """Submit to the engine; returns (results, None) or (None, error response)."""
        if not self.ready:
            return None, self._unready()
        try:
            results = await self.engine.generate(requests, timeout_s=timeout_s, is_disconnected=ctx.request.is_disconnected)
            return results, None
        except Exception as e:
            return None, _map_error(e)

    def _headers(self, rid: str, r, n: int = 1) -> dict[str, str]:
        t = r.timings
        return {
            "X-Request-Id": rid,
            "X-Seed": str(r.seed),
            "X-Lora-Scale": repr(float(r.lora_scale)),
            "X-Adapter": r.adapter or "",
            "X-Adapter-Sha256": (r.adapter_sha256 or "")[:16],
            "X-Prompt-Truncated": "true" if r.prompt_truncated else "false",
            "X-Queue-Ms": f"{t.get('queue_ms', 0.0):.1f}",
            "X-Inference-Ms": f"{t.get('encode_ms', 0.0) + t.get('denoise_ms', 0.0) + t.get('decode_ms', 0.0):.1f}",
        }

    def _log(self, route: str, rid: str, body: dict, status: int, t0: float, results=None) -> None:
        rec = {
            "route": route, "id": rid, "status": status, "ms": round((time.perf_counter() - t0) * 1e3, 1),
            "prompt_len": len(body.get("prompt") or ""),
            **{k: body.get(k) for k in ("width", "height", "num_inference_steps", "guidance_scale", "scheduler", "lora_scale", "adapter", "n")
               if body.get(k) is not None},
        }
        if os.environ.get("SPO_LOG_PROMPTS") == "1":
            rec["prompt"] = body.get("prompt")
        if results:
            t = results[0].timings
            rec.update({k: round(t.get(k, 0.0), 1) for k in ("queue_ms", "encode_ms", "denoise_ms", "decode_ms")})
            rec["seeds"] = [r.seed for r in results]
        access.info(json.dumps(rec))

    @staticmethod
    def _request_id(ctx: bentoml.Context) -> str:
        given = ctx.request.headers.get("x-request-id", "")
        return given if given and len(given) <= 64 and given.replace("-", "").isalnum() else uuid.uuid4().hex

    @bentoml.api(route="/generate")
    async def generate(
        self,
        ctx: bentoml.Context,
        prompt: str,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        scheduler: str = "ddim",
        seed: int | None = None,
        lora_scale: float | None = None,
        adapter: str | None = None,
        eta: float = 0.0,
        format: Literal["png", "jpeg", "webp"] = "png",
        quality: int = 90,
        timeout_s: float | None = None,
    ) -> Image.Image:
        """Text to image. Returns the encoded image; parameters and timings in X-* headers."""
        from spo_runtime.__main__ import encode_image

        t0 = time.perf_counter()
        rid = self._request_id(ctx)
        body = dict(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler,
                    seed=seed, lora_scale=lora_scale, adapter=adapter, eta=eta)
        request = {k: v for k, v in body.items() if v is not None or k == "negative_prompt"}
        resp = _check_output(quality, timeout_s)
        results = None
        if resp is None:
            results, resp = await self._run(ctx, [request], timeout_s)
        if resp is None:
            r = results[0]
            # encoding a 1024x1024 PNG takes tens of ms: off the event loop
            data = await anyio.to_thread.run_sync(encode_image, r, format, quality)
            resp = Response(data, media_type=FORMATS[format], headers=self._headers(rid, r))
        else:
            resp.headers["X-Request-Id"] = rid
        ctx.response.status_code = resp.status_code  # BentoML copies the context's status onto the response
        self._log("/generate", rid, body, resp.status_code, t0, results)
        return resp

    @bentoml.api(route="/generate_batch")
    async def generate_batch(
        self,
        ctx: bentoml.Context,
        prompt: str,
        n: int = 1,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        scheduler: str = "ddim",
        seed: int | None = None,
        lora_scale: float | None = None,
        adapter: str | None = None,
        eta: float = 0.0,
        format: Literal["png", "jpeg", "webp"] = "png",
        quality: int = 90,
        timeout_s: float | None = None,
    ) -> dict:
        """`n` images (1..8) of one prompt, seeds seed..seed+n-1, as JSON with base64 images."""
        import secrets

        from spo_runtime.__main__ import encode_image

        t0 = time.perf_counter()
        rid = self._request_id(ctx)
        body = dict(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler,
                    seed=seed, lora_scale=lora_scale, adapter=adapter, eta=eta, n=n)
        resp = _check_output(quality, timeout_s)
        if resp is None and not 1 <= n <= 8:
            resp = error_response(400, f"n: must be in 1..8, got {n}", "n")
        if resp is None and seed is not None and not 0 <= seed <= 2**32 - n:
            resp = error_response(400, f"seed: with n={n} must be in 0..{2**32 - n} (seeds seed..seed+n-1), got {seed}", "seed")
        results = None
        if resp is None:
            base = seed if seed is not None else secrets.randbelow(2**32 - n + 1)
            request = {k: v for k, v in body.items() if k != "n" and (v is not None or k == "negative_prompt")}
            results, resp = await self._run(ctx, [{**request, "seed": base + i} for i in range(n)], timeout_s)
        if resp is None:
            r0 = results[0]
            encoded = await anyio.to_thread.run_sync(lambda: [encode_image(r, format, quality) for r in results])
            payload = {
                "images": [{"seed": r.seed, "format": format, "image": base64.b64encode(data).decode()}
                           for r, data in zip(results, encoded)],
                "seeds": [r.seed for r in results],
                "lora_scale": r0.lora_scale, "adapter": r0.adapter, "adapter_sha256": (r0.adapter_sha256 or "")[:16],
                "prompt_truncated": r0.prompt_truncated, "timings_ms": {k: round(v, 1) for k, v in r0.timings.items()},
                "request_id": rid,
            }
            resp = JSONResponse(payload, headers=self._headers(rid, r0))
        else:
            resp.headers["X-Request-Id"] = rid
        ctx.response.status_code = resp.status_code
        self._log("/generate_batch", rid, body, resp.status_code, t0, results)
        return resp


def _check_output(quality: int, timeout_s: float | None) -> JSONResponse | None:
    if not 1 <= quality <= 100:
        return error_response(400, f"quality: must be in 1..100, got {quality}", "quality")
    if timeout_s is not None and not 0 < timeout_s <= 3600:
        return error_response(400, f"timeout_s: must be in (0, 3600], got {timeout_s}", "timeout_s")
    return None


# ---------------------------------------------------------------------------------------------
# Info and admin routes (a Starlette app mounted on the service: GET routes and bearer auth)


async def info(request: Request) -> Response:
    svc = _service
    if svc is None or svc.pipe is None:
        return JSONResponse({"ready": False, "failure": svc.failure if svc else None, "version": _version()}, status_code=200)
    authed, _ = _admin_ok(request)
    body = svc.pipe.info(show_paths=authed)
    body.update({"ready": svc.ready, "engine": svc.engine.stats(), "workers": svc.sync.workers() if svc.sync else [],
                 "pid": os.getpid(), "uptime_s": round(time.time() - svc.started, 1)})
    return JSONResponse(body)


def _version() -> str:
    from spo_runtime import __version__

    return __version__


def admin(handler):
    async def wrapped(request: Request) -> Response:
        ok, denied = _admin_ok(request)
        if not ok:
            return denied
        svc = _service
        if svc is None or not svc.ready:
            return svc._unready() if svc else error_response(503, "starting", headers={"Retry-After": "5"})
        try:
            return await handler(svc, request)
        except Exception as e:
            return _map_error(e)

    return wrapped


@admin
async def set_scale(svc: SPOService, request: Request) -> Response:
    body = parse_body(ScaleBody, await request.body())
    out = await anyio.to_thread.run_sync(svc.engine.set_default_lora_scale, body.scale)
    svc.state.mutate(lambda s: s.update(default_lora_scale=out["scale"]))
    return JSONResponse({"previous": out["previous"], "scale": out["scale"], "swap_ms": round(out["swap_ms"], 3),
                         "applied_ms": round(out["applied_ms"], 3)})


@admin
async def set_default_adapter(svc: SPOService, request: Request) -> Response:
    body = parse_body(NameBody, await request.body())
    await anyio.to_thread.run_sync(svc.engine.set_default_adapter, body.name)
    svc.state.mutate(lambda s: s.update(default_adapter=body.name))
    return JSONResponse({"default_adapter": body.name})


@admin
async def load_adapter(svc: SPOService, request: Request) -> Response:
    from spo_runtime.requests import ADAPTER_NAME
    from spo_runtime.state import resolve_under

    body = parse_body(LoadBody, await request.body())
    if not ADAPTER_NAME.match(body.name):
        return error_response(400, "name: must be 1..64 characters of letters, digits, '_', '.', '-'", "name")
    if body.name in svc.pipe.registry.adapters and not body.replace:
        return error_response(409, f"name: adapter {body.name!r} is already loaded (send \"replace\": true)", "name")
    path = resolve_under(svc.state.adapter_dir, body.file, "file")
    t0 = time.perf_counter()
    adapter = await anyio.to_thread.run_sync(svc.engine.load_adapter, body.name, path, body.replace)
    rel = str(path.relative_to(svc.state.adapter_dir.resolve()))

    def record(s):
        s["adapters"][body.name] = {"file": rel, "sha256": adapter.sha256}
        s["removed"] = [n for n in s.get("removed", []) if n != body.name]

    svc.state.mutate(record)
    return JSONResponse({**adapter.info(show_source=False), "file": rel, "load_ms": round((time.perf_counter() - t0) * 1e3, 1)})


@admin
async def unload_adapter(svc: SPOService, request: Request) -> Response:
    body = parse_body(NameBody, await request.body())
    if body.name is None:
        return error_response(400, "name: required", "name")
    await anyio.to_thread.run_sync(svc.engine.unload_adapter, body.name)

    def record(s):
        s["adapters"].pop(body.name, None)
        if body.name in svc.sync.preset_adapters and body.name not in s.get("removed", []):
            s.setdefault("removed", []).append(body.name)
        if s.get("default_adapter") == body.name or svc.pipe.default_adapter is None:
            s["default_adapter"] = svc.pipe.default_adapter

    svc.state.mutate(record)
    return JSONResponse({"unloaded": body.name, "default_adapter": svc.pipe.default_adapter})


@admin
async def list_adapters(svc: SPOService, request: Request) -> Response:
    reg = svc.pipe.registry
    return JSONResponse({
        "default_adapter": svc.pipe.default_adapter,
        "default_lora_scale": svc.pipe.default_lora_scale,
        "fused": {"adapter": reg.fused[0], "scale": reg.fused[1]} if reg.fused else None,
        "memory_bytes": reg.nbytes,
        "memory_limit_bytes": reg.memory_limit_bytes,
        "adapters": [{**a.info(show_source=False), "targets": a.targets} for a in reg.adapters.values()],
    })


# -- training jobs ---------------------------------------------------------------------------


@admin
async def train_submit(svc: SPOService, request: Request) -> Response:
    from spo_runtime.errors import InvalidRequestError
    from spo_runtime.requests import ADAPTER_NAME, GenerationRequest
    from spo_runtime.state import resolve_under
    from spo_runtime.train import TrainConfig

    body = parse_body(TrainSubmitBody, await request.body())
    if (body.prompts is None) == (body.prompts_file is None):
        raise InvalidRequestError("prompts", "give exactly one of prompts (a list) or prompts_file")
    if body.prompts_file is not None:
        path = resolve_under(svc.jobs.root.parent, body.prompts_file, "prompts_file", suffixes=(".txt",))
        prompts = [p for p in path.read_text().splitlines() if p.strip()]
    else:
        prompts = body.prompts
    if not 1 <= len(prompts) <= 10_000:
        raise InvalidRequestError("prompts", f"must hold 1..10000 prompts, got {len(prompts)}")
    for i, p in enumerate(prompts):
        try:
            GenerationRequest.parse({"prompt": p})
        except InvalidRequestError as e:
            raise InvalidRequestError(f"prompts[{i}]", e.message) from None
        if "\n" in p:
            raise InvalidRequestError(f"prompts[{i}]", "must be one line")
    cfg = TrainConfig.parse(body.config)  # 400 naming config.<field>
    if body.output_adapter is not None and not ADAPTER_NAME.match(body.output_adapter):
        raise InvalidRequestError("output_adapter", "must be 1..64 characters of letters, digits, '_', '.', '-'")
    start = None
    if body.start_adapter:
        reg = svc.pipe.registry
        if body.start_adapter in reg.adapters and Path(reg.adapters[body.start_adapter].source).is_file():
            src = Path(reg.adapters[body.start_adapter].source).resolve()
            if not src.is_relative_to(svc.state.adapter_dir.resolve()):
                raise InvalidRequestError("start_adapter", "the adapter's file is not under SPO_ADAPTER_DIR")
            start = str(src.relative_to(svc.state.adapter_dir.resolve()))
        else:
            path = resolve_under(svc.state.adapter_dir, body.start_adapter, "start_adapter")
            start = str(path.relative_to(svc.state.adapter_dir.resolve()))
    rec = svc.jobs.create(prompts, cfg.model_dump(exclude_defaults=True), start, body.output_adapter)
    return JSONResponse({"job_id": rec["job_id"], "state": rec["state"], "output_adapter": rec["output_adapter"]})


def _job_id(request: Request) -> str:
    from spo_runtime.errors import InvalidRequestError

    job_id = request.query_params.get("job_id")
    if not job_id:
        raise InvalidRequestError("job_id", "query parameter required")
    return job_id


def _public(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("result", "metrics")}


@admin
async def train_status(svc: SPOService, request: Request) -> Response:
    return JSONResponse(_public(svc.jobs.read(_job_id(request))))


@admin
async def train_get(svc: SPOService, request: Request) -> Response:
    rec = svc.jobs.read(_job_id(request))
    if rec["state"] != "completed":
        return error_response(409, f"job_id: the job is {rec['state']}, not completed", "job_id")
    res = rec["result"]
    return JSONResponse({"job_id": rec["job_id"], "state": rec["state"], "adapter": rec["output_adapter"],
                         "files": res["files"], "sha256": res["sha256"], "metrics": rec.get("metrics"), "round": rec["round"]})


@admin
async def train_cancel(svc: SPOService, request: Request) -> Response:
    body = parse_body(JobBody, await request.body())
    return JSONResponse(_public(svc.jobs.cancel(body.job_id)))


@admin
async def train_list(svc: SPOService, request: Request) -> Response:
    jobs = [_public(r) | {"history": None} for r in svc.jobs.list()]
    return JSONResponse({"jobs": [{k: v for k, v in j.items() if v is not None} for j in jobs], "counts": svc.supervisor.counts()})


ops_app = Starlette(routes=[
    Route("/train/submit", train_submit, methods=["POST"]),
    Route("/train/status", train_status, methods=["GET"]),
    Route("/train/get", train_get, methods=["GET"]),
    Route("/train/cancel", train_cancel, methods=["POST"]),
    Route("/train/list", train_list, methods=["GET"]),
    Route("/info", info, methods=["GET"]),
    Route("/admin/lora_scale", set_scale, methods=["POST"]),
    Route("/admin/default_adapter", set_default_adapter, methods=["POST"]),
    Route("/admin/adapters/load", load_adapter, methods=["POST"]),
    Route("/admin/adapters/unload", unload_adapter, methods=["POST"]),
    Route("/admin/adapters", list_adapters, methods=["GET"]),
])
SPOService = bentoml.asgi_app(ops_app, path="/")(SPOService)
SPOService.add_asgi_middleware(BodyLimitMiddleware)
