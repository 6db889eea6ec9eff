"""spo-serve's BentoML service: `bentoml serve service.service:SPOService`.

Thin by design: this file holds start-up, the SIGTERM drain, /generate and /generate_batch, and mounts the
route table (`app`: /generate/stream, /info, /admin/*, /train/*, the OpenAI and A1111 routes) behind the
door (`door.Contract`: body limits, media types, the request schema, error shapes), with BentoML's HTTP
metrics labelled by route template (`paths`). The HTTP bodies are
in `schemas`, the error mapping in `errors`, what the routes share in `context`; the work is
`spo_runtime`'s. The model loads in a background thread so /livez answers at once; /readyz turns 200
after one warm-up image.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import signal
import sys
import threading
import time

import anyio
import bentoml
from PIL import Image
from starlette.responses import JSONResponse, Response

from service import context, door, paths, workers
from service.app import ERROR_SHAPES, GUARDS, IMAGE_ROUTES, JSON_ROUTES, app
from service.auth import admin_token, api_unauthorized, check_token_file
from service.errors import map_error
from service.schemas import (BatchResponse, core_request, declare_responses, framework_spec, generation_bodies,
                             result_headers)
from spo_runtime.errors import ConfigError
from spo_runtime.imaging import FORMATS, encode_image
from spo_runtime.settings import Settings

log = logging.getLogger("spo_serve")


def _settings() -> Settings:
    """SPO_* once, at import (the CLI process and every worker): a bad variable, or an admin token file that
    exists but is refused, is one line and exit 2."""
    try:
        settings = Settings.from_env()
        check_token_file(settings.token("admin_token"), settings.data_dir)
        return settings
    except ConfigError as e:
        print(f"spo-serve: configuration error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _size_range(settings: Settings) -> tuple[int, int]:
    from spo_runtime.model.presets import resolve

    try:
        return resolve(settings)[0].size_range
    except Exception as e:  # a device that is missing fails at load, where /livez reports it
        log.warning("size bounds of the default preset (%s)", e)
        from spo_runtime.limits import SIZE_RANGE

        return SIZE_RANGE


# What BentoML needs when it imports this module: the worker count (the decorator's `workers=`) and the
# request bodies (the `input_spec`s, which /docs.json publishes with the served preset's size range). So
# SPO_* is read, and the default preset resolved (CUDA probed for SPO_MODEL=auto), here; the rest
# (logging, tokens, the model) happens at start, in SPOService.__init__.
SETTINGS = _settings()
BODIES = generation_bodies(_size_range(SETTINGS))


@bentoml.service(
    name="spo-serve",
    workers=workers.server_workers(SETTINGS),  # SPO_WORKERS=auto: one per visible GPU
    resources=workers.server_resources(SETTINGS),  # {"gpu": n} where the model runs on GPUs (workers.resources)
    traffic={"timeout": 900, "max_concurrency": 512},
)
class SPOService:
    def __init__(self) -> None:
        context.configure_logging()
        self.settings = SETTINGS
        self.bodies = BODIES
        self.ready = False
        self.draining: float | None = None  # monotonic time of SIGTERM
        self.inflight = 0  # generation requests between the door and their last byte
        self.failure: str | None = None
        self.engine = self.pipe = self.sync = None
        self.started = time.time()
        self.admin_token = admin_token(SETTINGS.token("admin_token"), SETTINGS.data_dir)
        self.api_token = SETTINGS.token("api_token")
        context.bind(self)
        self._install_drain()
        threading.Thread(target=self._load, name="spo-load", daemon=True).start()

    # -- start-up ----------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            from spo_runtime import load_pipeline
            from spo_runtime.engine import Engine, EngineConfig
            from spo_runtime.training.jobs import JobStore, Supervisor
            from spo_runtime.state import AdminStore, AdminSync

            s = self.settings
            self.pipe = load_pipeline(workers.bind(s))  # this worker's device: one engine per GPU
            self.admin_store = AdminStore(s.data_dir, s.adapters_path)
            scorer, why_not = _scorer(s, self.pipe)  # best_of's preference model (SPO_SCORER)
            self.engine = Engine(self.pipe, EngineConfig.from_settings(s), faults=s.fault_plan, scorer=scorer,
                                 scorer_unavailable=why_not)
            metrics = self.engine.metrics
            self.sync = AdminSync(self.pipe, self.admin_store, on_change=lambda: metrics.lora_scale.set(self.pipe.default_lora_scale))
            self.sync.running_scales = self.engine.running_scales
            self.sync.poll()  # the persisted admin state, before the first request
            self.engine.on_boundary(self.sync.poll)
            self.engine.start()
            self.jobs = JobStore(s.data_dir, s.adapters_path)
            self.supervisor = Supervisor(self.jobs, env=dict(os.environ), train_device=s.train_device,
                                         max_jobs=s.max_train_jobs, on_change=lambda c: [metrics.train_jobs.labels(k).set(v) for k, v in c.items()]).start()
            t0 = time.perf_counter()
            if self.pipe.compiled:  # each batch bucket's fused and residual-LoRA graphs (cached under SPO_DATA_DIR)
                warm = self.engine.call(self.pipe.warm_up).result()
                log.info("compiled graphs warm in %.1fs (%s)", warm["total_s"], self.pipe.compile_why)
            self.engine.generate_sync([self.pipe.parse({"prompt": "warm-up", "seed": 0, "num_inference_steps": 2})])
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

    # -- drain on SIGTERM ---------------------------------------------------------------------

    def _install_drain(self) -> None:
        """Wrap the server's SIGTERM handler (uvicorn's, installed before the service starts): first drain,
        then let the server stop. While draining /readyz is 503 and new generation requests get 503 with
        Retry-After; admitted and queued requests run to the end, for at most SPO_DRAIN_S; a running
        training job is asked to checkpoint at its round boundary. A second SIGTERM stops at once."""
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(sig, frame):
            if self.draining is None:
                self.draining = time.monotonic()
                threading.Thread(target=self._drain, args=(previous, sig), name="spo-drain", daemon=True).start()
            elif callable(previous):
                previous(sig, frame)

        signal.signal(signal.SIGTERM, on_term)

    def _drain(self, previous, sig) -> None:
        deadline = self.draining + self.settings.drain_s
        log.warning("SIGTERM: draining for at most %.0fs (SPO_DRAIN_S)", self.settings.drain_s)
        sup = getattr(self, "supervisor", None)
        stopper = threading.Thread(target=sup.stop, name="spo-drain-jobs", daemon=True) if sup else None
        if stopper:
            stopper.start()  # the trainer checkpoints at its round boundary meanwhile
        while time.monotonic() < deadline:
            stats = self.engine.stats() if self.engine is not None else {"waiting": 0, "running": 0}
            if stats["waiting"] == 0 and stats["running"] == 0 and self.inflight == 0:
                break
            time.sleep(0.05)
        left = self.engine.stats() if self.engine is not None else {}
        log.warning("drained in %.1fs (left: %s waiting, %s running, %d in flight); stopping",
                    time.monotonic() - self.draining, left.get("waiting", 0), left.get("running", 0), self.inflight)
        if stopper:
            stopper.join(max(0.0, deadline - time.monotonic()))
        if callable(previous):
            previous(sig, None)

    def __is_ready__(self) -> bool:
        return self.ready and self.draining is None

    def __is_alive__(self) -> bool:
        return self.failure is None and (self.engine is None or self.engine.alive)

    # -- generation --------------------------------------------------------------------------

    async def _generate(self, ctx: bentoml.Context, route: str, model, body: dict, respond) -> Response:
        """Run the door's parsed body (validated here only for a caller that bypassed the door), encode, log."""
        t0 = time.perf_counter()
        rid = context.request_id(ctx.request.headers)
        parsed = door.parsed(ctx.request.scope, model)
        results = None
        self.inflight += 1
        try:
            reason = context.not_ready(self)
            if reason is not None:
                resp = map_error(reason)
            else:
                if parsed is None:
                    parsed = model.model_validate(body)
                request = core_request(parsed)
                if model is self.bodies.batch:  # seeds seed..seed+n-1 (best_of k: image i's candidates from seed + i*k)
                    k = parsed.best_of
                    first = context.first_seed(parsed.seed, parsed.n * k)
                    requests = [request.model_copy(update={"seed": first + i * k}) for i in range(parsed.n)]
                else:
                    requests = [request]
                results = await self.engine.generate(requests, timeout_s=parsed.timeout_s,
                                                     is_disconnected=ctx.request.is_disconnected)
                resp = await respond(rid, parsed, results)
        except Exception as e:
            resp = map_error(e, admin=context.credentials_ok(self, ctx.request.headers, admin=True))
        finally:
            self.inflight -= 1
        resp.headers["X-Request-Id"] = rid
        ctx.response.status_code = resp.status_code  # BentoML copies the context's status onto the response
        context.access_log(self, route, rid, dict(parsed) if parsed is not None else body, resp.status_code, t0, results)
        return resp

    @bentoml.api(route="/generate", input_spec=framework_spec(BODIES.generate))
    async def generate(self, ctx: bentoml.Context, **body) -> Image.Image:
        """Text to image. Returns the encoded image; parameters and timings in X-* headers."""

        async def respond(rid, parsed, results):
            r = results[0]
            # encoding a 1024x1024 PNG takes tens of ms: off the event loop
            data = await anyio.to_thread.run_sync(encode_image, r, parsed.format, parsed.quality)
            return Response(data, media_type=FORMATS[parsed.format], headers=result_headers(rid, r))

        return await self._generate(ctx, "/generate", self.bodies.generate, body, respond)

    @bentoml.api(route="/generate_batch", input_spec=framework_spec(BODIES.batch))
    async def generate_batch(self, ctx: bentoml.Context, **body) -> BatchResponse:
        """`n` images (1..8) of one prompt, seeds seed..seed+n-1, as JSON with base64 images."""

        async def respond(rid, parsed, results):
            fmt, r0 = parsed.format, results[0]
            encoded = await anyio.to_thread.run_sync(lambda: [encode_image(r, fmt, parsed.quality) for r in results])
            payload = {
                "images": [{"seed": r.seed, "format": fmt, "image": base64.b64encode(data).decode(),
                            **({"preference": r.selection.as_dict()} if r.selection is not None else {})}
                           for r, data in zip(results, encoded)],
                "seeds": [r.seed for r in results],
                "lora_scale": r0.lora_scale, "adapter": r0.adapter, "adapter_sha256": (r0.adapter_sha256 or "")[:16],
                "prompt_truncated": r0.prompt_truncated, "timings_ms": {k: round(v, 1) for k, v in r0.timings.items()},
                "request_id": rid,
            }
            return JSONResponse(payload, headers=result_headers(rid, r0))

        return await self._generate(ctx, "/generate_batch", self.bodies.batch, body, respond)


def _scorer(settings: Settings, pipe):
    """(SPO_SCORER's preference scorer, why best_of > 1 is refused without one). A scorer that does not load
    (no SPO_SPM offline, a bad file) leaves the server up with best_of off: logged, and said in best_of's 400
    without the error's text (it may name paths)."""
    if settings.scorer == "none":
        return None, "no preference model is loaded (SPO_SCORER=none)"
    from spo_runtime.preference.scorers import scorer_from_settings

    t0 = time.perf_counter()
    try:
        scorer = scorer_from_settings(settings, pipe)
    except Exception as e:
        log.warning("best_of is off: the preference model (SPO_SCORER=%s) did not load: %s: %s", settings.scorer,
                    type(e).__name__, e)
        return None, (f"its preference model (SPO_SCORER={settings.scorer}) did not load; the server log says why "
                      "(set SPO_SPM to a local file of the step-aware preference model)")
    log.info("best_of: preference scorer %s on %s in %.1fs", getattr(scorer, "name", type(scorer).__name__),
             pipe.device, time.perf_counter() - t0)
    return scorer, ""


# /generate, /generate_batch and /generate/stream: SPO_API_TOKEN's rule, checked at the door like the other routes
GENERATION = context.Shape(unauthorized=api_unauthorized, error=map_error)


SPOService = bentoml.asgi_app(app, path="/")(SPOService)
MODELS = {"/generate": BODIES.generate, "/generate_batch": BODIES.batch, "/generate/stream": BODIES.stream}
SPOService.add_asgi_middleware(
    door.Contract, models=MODELS, image_limit=SETTINGS.max_image_bytes, shapes=ERROR_SHAPES,
    guards={p: context.door_check(g) for p, g in {**dict.fromkeys(MODELS, GENERATION), **GUARDS}.items()},
    limits={**dict.fromkeys([*MODELS, *JSON_ROUTES], door.GENERATION_BODY_LIMIT),
            **dict.fromkeys(IMAGE_ROUTES, SETTINGS.max_image_bytes)},
    docs=functools.partial(declare_responses, routes={"/generate": (list(FORMATS.values()), None),
                                                      "/generate_batch": (["application/json"], BatchResponse)},
                           stream=BODIES.stream))
paths.bound_http_metrics(SPOService)  # BentoML's HTTP series labelled by route template, not by raw path
