"""/info, the admin routes (/admin/*) and the training routes (/train/*): a Starlette app mounted on the
BentoML service. Every handler raises spo_runtime's typed errors (mapped to HTTP in one place) and runs
its blocking work (file locks, fsync, adapter reads) off the event loop."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import a1111, openai_api
from service.auth import admin_denied
from service.errors import Conflict, map_error, parse_body
from service.stream import generate_stream
from service.schemas import JobBody, LoadBody, NameBody, ScaleBody, TrainSubmitBody
from spo_runtime.errors import InvalidRequestError
from spo_runtime.limits import ADAPTER_NAME, ADAPTER_NAME_RULE
from spo_runtime.requests import GenerationRequest

if TYPE_CHECKING:
    from service.service import SPOService


class _Bound:
    """The service instance of this worker, for the mounted app's handlers."""

    service: SPOService | None = None


def bind(service: SPOService) -> None:
    _Bound.service = service


def bound() -> SPOService | None:
    return _Bound.service


async def info(request: Request) -> Response:
    from service.workers import describe, worker_index
    from spo_runtime import __version__

    svc = _Bound.service
    if svc is None or svc.pipe is None:
        return JSONResponse({"ready": False, "failure": svc.failure if svc else None, "version": __version__,
                             "worker_index": worker_index(), "pid": os.getpid()})
    authed = admin_denied(request, svc.admin_token) is None
    body = svc.pipe.info(show_paths=authed)
    reports = await anyio.to_thread.run_sync(svc.sync.workers) if svc.sync else []
    workers = await anyio.to_thread.run_sync(describe, svc.settings.data_dir, reports)  # each one's index and device
    body.update({"ready": svc.ready, "engine": svc.engine.stats(), "workers": workers, "worker_index": worker_index(),
                 "pid": os.getpid(), "uptime_s": round(time.time() - svc.started, 1)})
    return JSONResponse(body)


def admin(handler):
    """Admin-only, ready-only; typed errors -> HTTP."""

    async def wrapped(request: Request) -> Response:
        svc = _Bound.service
        if svc is None:
            return map_error(_starting())
        denied = admin_denied(request, svc.admin_token)
        if denied is not None:
            return denied
        if not svc.ready:
            return svc.unready()
        try:
            return await handler(svc, request)
        except Exception as e:
            return map_error(e)

    return wrapped


def _starting():
    from spo_runtime.errors import EngineUnavailableError

    return EngineUnavailableError("starting", retry_after=5)


async def _body(model, request: Request):
    return parse_body(model, await request.body())


def _adapter_name(field: str, name: str) -> str:
    if not ADAPTER_NAME.match(name):
        raise InvalidRequestError(field, f"must be {ADAPTER_NAME_RULE}")
    return name


@admin
async def set_scale(svc: SPOService, request: Request) -> Response:
    body = await _body(ScaleBody, request)
    out = await anyio.to_thread.run_sync(svc.engine.set_default_lora_scale, body.scale)
    await anyio.to_thread.run_sync(svc.admin_store.mutate, lambda s: s.update(default_lora_scale=out["scale"]))
    return JSONResponse({"previous": out["previous"], "scale": out["scale"], "swap_ms": round(out["swap_ms"], 3),
                         "applied_ms": round(out["applied_ms"], 3)})


@admin
async def set_default_adapter(svc: SPOService, request: Request) -> Response:
    body = await _body(NameBody, request)
    await anyio.to_thread.run_sync(svc.engine.set_default_adapter, body.name)
    await anyio.to_thread.run_sync(svc.admin_store.mutate, lambda s: s.update(default_adapter=body.name))
    return JSONResponse({"default_adapter": body.name})


@admin
async def load_adapter(svc: SPOService, request: Request) -> Response:
    from spo_runtime.state import resolve_under

    body = await _body(LoadBody, request)
    _adapter_name("name", body.name)
    if body.name in svc.pipe.registry.adapters and not body.replace:
        raise Conflict("name", f"adapter {body.name!r} is already loaded (send \"replace\": true)")
    root = svc.admin_store.adapter_dir
    path = await anyio.to_thread.run_sync(lambda: resolve_under(root, body.file, "file"))
    t0 = time.perf_counter()
    adapter = await anyio.to_thread.run_sync(svc.engine.load_adapter, body.name, path, body.replace)
    rel = str(path.relative_to(root.resolve()))

    def record(s):
        s["adapters"][body.name] = {"file": rel, "sha256": adapter.sha256}
        s["removed"] = [n for n in s.get("removed", []) if n != body.name]

    await anyio.to_thread.run_sync(svc.admin_store.mutate, record)
    return JSONResponse({**adapter.info(show_source=False), "file": rel, "load_ms": round((time.perf_counter() - t0) * 1e3, 1)})


@admin
async def unload_adapter(svc: SPOService, request: Request) -> Response:
    body = await _body(NameBody, request)
    if body.name is None:
        raise InvalidRequestError("name", "required")
    await anyio.to_thread.run_sync(svc.engine.unload_adapter, body.name)

    def record(s):
        s["adapters"].pop(body.name, None)
        if body.name in svc.sync.preset_adapters and body.name not in s.get("removed", []):
            s.setdefault("removed", []).append(body.name)
        if s.get("default_adapter") == body.name or svc.pipe.default_adapter is None:
            s["default_adapter"] = svc.pipe.default_adapter

    await anyio.to_thread.run_sync(svc.admin_store.mutate, record)
    return JSONResponse({"unloaded": body.name, "default_adapter": svc.pipe.default_adapter})


@admin
async def list_adapters(svc: SPOService, request: Request) -> Response:
    from spo_runtime.state import file_state

    reg = svc.pipe.registry
    adapters = list(reg.adapters.values())
    # the loaded weights keep serving whatever happens to their file; the listing says when it changed
    states = await anyio.to_thread.run_sync(lambda: [file_state(a.source, a.sha256) for a in adapters])
    return JSONResponse({
        "default_adapter": svc.pipe.default_adapter,
        "default_lora_scale": svc.pipe.default_lora_scale,
        "fused": {"adapter": reg.fused[0], "scale": reg.fused[1]} if reg.fused else None,
        "memory_bytes": reg.nbytes,
        "memory_limit_bytes": reg.memory_limit_bytes,
        "adapters": [{**a.info(show_source=False), "targets": a.targets, "file_state": st} for a, st in zip(adapters, states)],
    })


# -- training jobs ---------------------------------------------------------------------------


def _training_prompts(svc: SPOService, body: TrainSubmitBody) -> list[str]:
    from spo_runtime.state import resolve_under

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
    return prompts


def _start_adapter(svc: SPOService, name: str | None) -> str | None:
    from spo_runtime.state import resolve_under

    if not name:
        return None
    root = svc.admin_store.adapter_dir.resolve()
    reg = svc.pipe.registry
    if name in reg.adapters and Path(reg.adapters[name].source).is_file():
        src = Path(reg.adapters[name].source).resolve()
        if not src.is_relative_to(root):
            raise InvalidRequestError("start_adapter", "the adapter's file is not under SPO_ADAPTER_DIR")
        return str(src.relative_to(root))
    return str(resolve_under(root, name, "start_adapter").relative_to(root))


@admin
async def train_submit(svc: SPOService, request: Request) -> Response:
    from spo_runtime.training.config import TrainConfig

    body = await _body(TrainSubmitBody, request)
    prompts = await anyio.to_thread.run_sync(_training_prompts, svc, body)
    cfg = TrainConfig.parse(body.config)  # 400 naming config.<field>
    world = _world(svc, cfg)
    if body.output_adapter is not None:
        _adapter_name("output_adapter", body.output_adapter)
    start = await anyio.to_thread.run_sync(_start_adapter, svc, body.start_adapter)
    rec = await anyio.to_thread.run_sync(svc.jobs.create, prompts, cfg.model_dump(exclude_defaults=True), start,
                                         body.output_adapter)
    rec = await anyio.to_thread.run_sync(lambda: svc.jobs.update(rec["job_id"], **world))
    return JSONResponse({"job_id": rec["job_id"], "state": rec["state"], "output_adapter": rec["output_adapter"], **world})


def _world(svc: SPOService, cfg) -> dict:
    """The job's data-parallel shape as its trainer will resolve it (400 naming config.nproc when the
    training GPUs are fewer): ranks, pairs per optimiser step, micro-batch and accumulation."""
    from spo_runtime.training.distributed import resolve_world

    world, _ = resolve_world(cfg.nproc, svc.settings)
    cfg.check_world(world)
    return {"world_size": world, "pairs_per_step": cfg.pairs_per_step(world), "micro_batch": cfg.micro_batch,
            "grad_accum": cfg.accumulation(world)}


def _job_id(request: Request) -> str:
    job_id = request.query_params.get("job_id")
    if not job_id:
        raise InvalidRequestError("job_id", "query parameter required")
    return job_id


def _public(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("result", "metrics")}


@admin
async def train_status(svc: SPOService, request: Request) -> Response:
    return JSONResponse(_public(await anyio.to_thread.run_sync(svc.jobs.read, _job_id(request))))


@admin
async def train_get(svc: SPOService, request: Request) -> Response:
    rec = await anyio.to_thread.run_sync(svc.jobs.read, _job_id(request))
    if rec["state"] != "completed":
        raise Conflict("job_id", f"the job is {rec['state']}, not completed")
    res = rec["result"]
    return JSONResponse({"job_id": rec["job_id"], "state": rec["state"], "adapter": rec["output_adapter"],
                         "files": res["files"], "sha256": res["sha256"], "metrics": rec.get("metrics"), "round": rec["round"]})


@admin
async def train_cancel(svc: SPOService, request: Request) -> Response:
    body = await _body(JobBody, request)
    return JSONResponse(_public(await anyio.to_thread.run_sync(svc.jobs.cancel, body.job_id)))


@admin
async def train_resume(svc: SPOService, request: Request) -> Response:
    """Queue a failed, canceled or interrupted job again: it resumes from its last checkpoint."""
    body = await _body(JobBody, request)
    return JSONResponse(_public(await anyio.to_thread.run_sync(svc.jobs.resume, body.job_id)))


@admin
async def train_list(svc: SPOService, request: Request) -> Response:
    records = await anyio.to_thread.run_sync(svc.jobs.list)
    counts = await anyio.to_thread.run_sync(svc.supervisor.counts)
    jobs = [_public(r) | {"history": None} for r in records]
    return JSONResponse({"jobs": [{k: v for k, v in j.items() if v is not None} for j in jobs], "counts": counts})


app = Starlette(routes=[
    Route("/generate/stream", generate_stream, methods=["POST"]),
    Route("/train/submit", train_submit, methods=["POST"]),
    Route("/train/status", train_status, methods=["GET"]),
    Route("/train/get", train_get, methods=["GET"]),
    Route("/train/cancel", train_cancel, methods=["POST"]),
    Route("/train/resume", train_resume, methods=["POST"]),
    Route("/train/list", train_list, methods=["GET"]),
    Route("/info", info, methods=["GET"]),
    Route("/admin/lora_scale", set_scale, methods=["POST"]),
    Route("/admin/default_adapter", set_default_adapter, methods=["POST"]),
    Route("/admin/adapters/load", load_adapter, methods=["POST"]),
    Route("/admin/adapters/unload", unload_adapter, methods=["POST"]),
    Route("/admin/adapters", list_adapters, methods=["GET"]),
    *openai_api.ROUTES,  # /v1/*: the OpenAI Images API
    *a1111.ROUTES,  # /sdapi/v1/*: the AUTOMATIC1111 API
])
