"""The training routes (/train/*): submit an SPO training job, follow it, fetch its adapter, cancel or
resume it. Admin token only. A job's input stays inside its directories and bounds (its config's ranges,
its files under SPO_DATA_DIR and SPO_ADAPTER_DIR, an output adapter that replaces nothing, at most
SPO_MAX_QUEUED_JOBS waiting). The jobs run in their own process (spo_runtime.training.jobs); every
handler raises typed errors (mapped to HTTP in one place) and does its file work off the event loop."""

from __future__ import annotations

from pathlib import Path

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import context
from service.context import ADMIN, Service, guarded
from service.errors import Conflict
from service.schemas import TrainSubmitBody, check_adapter_name
from spo_runtime.errors import InvalidRequestError


def _start_adapter(svc: Service, name: str | None) -> str | None:
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


@guarded(ADMIN)
async def train_submit(svc: Service, request: Request) -> Response:
    """A new job: 400 naming the field for bad input (config.<field> with its range, config.spm_path outside
    SPO_ADAPTER_DIR and not SPO_SPM), 409 naming output_adapter when that name is taken, 429 with
    Retry-After past SPO_MAX_QUEUED_JOBS waiting jobs."""
    from spo_runtime.training.config import TrainConfig

    body = await context.body(request, TrainSubmitBody)
    prompts = await anyio.to_thread.run_sync(context.job_prompts, svc, body.prompts, body.prompts_file, 10_000)
    cfg = TrainConfig.parse(body.config)  # 400 naming config.<field>
    _check_sizes(svc, cfg)
    cfg = await anyio.to_thread.run_sync(cfg.with_spm_under, svc.settings.adapters_path, svc.settings.spm)
    world = _world(svc, cfg)
    if body.output_adapter is not None:
        check_adapter_name("output_adapter", body.output_adapter)
    start = await anyio.to_thread.run_sync(_start_adapter, svc, body.start_adapter)
    rec = await anyio.to_thread.run_sync(_create, svc, prompts, cfg.model_dump(exclude_defaults=True), start,
                                         body.output_adapter)
    rec = await anyio.to_thread.run_sync(lambda: svc.jobs.update(rec["job_id"], **world))
    return JSONResponse({"job_id": rec["job_id"], "state": rec["state"], "output_adapter": rec["output_adapter"], **world})


def _create(svc: Service, prompts: list[str], config: dict, start: str | None, output: str | None) -> dict:
    from spo_runtime.training.checkpoint import AdapterExistsError

    try:
        return svc.jobs.create(prompts, config, start, output, max_queued=svc.settings.max_queued_jobs)
    except AdapterExistsError as e:
        raise Conflict("output_adapter", str(e)) from None


def _check_sizes(svc: Service, cfg) -> None:
    """A job's width and height within the served preset's sizes (its trainer loads the same preset)."""
    lo, hi = svc.pipe.preset.size_range
    for name in ("width", "height"):
        value = getattr(cfg, name)
        if value is not None and not lo <= value <= hi:
            raise InvalidRequestError(f"config.{name}", f"must be a multiple of 8 in {lo}..{hi} (the preset's sizes), "
                                                        f"got {value}")


def _world(svc: Service, cfg) -> dict:
    """The job's data-parallel shape as its trainer will resolve it (400 naming config.nproc when the
    training GPUs are fewer): ranks, pairs per optimiser step, micro-batch and accumulation."""
    from spo_runtime.training.distributed import resolve_world

    world, _ = resolve_world(cfg.nproc, svc.settings)
    cfg.check_world(world)
    return {"world_size": world, "pairs_per_step": cfg.pairs_per_step(world), "micro_batch": cfg.micro_batch,
            "grad_accum": cfg.accumulation(world)}


def _public(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("result", "metrics")}


@guarded(ADMIN)
async def train_status(svc: Service, request: Request) -> Response:
    return JSONResponse(_public(await anyio.to_thread.run_sync(svc.jobs.read, context.job_id(request), "train")))


@guarded(ADMIN)
async def train_get(svc: Service, request: Request) -> Response:
    rec = await anyio.to_thread.run_sync(svc.jobs.read, context.job_id(request), "train")
    if rec["state"] != "completed":
        raise Conflict("job_id", f"the job is {rec['state']}, not completed")
    res = rec["result"]
    return JSONResponse({"job_id": rec["job_id"], "state": rec["state"], "adapter": rec["output_adapter"],
                         "files": res["files"], "sha256": res["sha256"], "metrics": rec.get("metrics"), "round": rec["round"]})


@guarded(ADMIN)
async def train_cancel(svc: Service, request: Request) -> Response:
    return JSONResponse(_public(await context.cancel_job(svc, request, "train")))


@guarded(ADMIN)
async def train_resume(svc: Service, request: Request) -> Response:
    """Queue a failed, canceled or interrupted job again: it resumes from its last checkpoint."""
    return JSONResponse(_public(await context.resume_job(svc, request, "train")))


@guarded(ADMIN)
async def train_list(svc: Service, request: Request) -> Response:
    records = await anyio.to_thread.run_sync(svc.jobs.list, "train")
    counts = await anyio.to_thread.run_sync(svc.supervisor.counts)
    jobs = [_public(r) | {"history": None} for r in records]
    return JSONResponse({"jobs": [{k: v for k, v in j.items() if v is not None} for j in jobs], "counts": counts})


ROUTES = [
    Route("/train/submit", train_submit, methods=["POST"]),
    Route("/train/status", train_status, methods=["GET"]),
    Route("/train/get", train_get, methods=["GET"]),
    Route("/train/cancel", train_cancel, methods=["POST"]),
    Route("/train/resume", train_resume, methods=["POST"]),
    Route("/train/list", train_list, methods=["GET"]),
]
