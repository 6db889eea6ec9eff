"""The evaluation routes (/eval/*): submit an adapter evaluation job, follow it, fetch its report and contact
sheet, cancel or resume it, list them. Admin token only. An evaluation is a job of the training job machinery
(kind "eval", spo_runtime.training.evaluation): queued, run in the job process, resumable. Promoting an
adapter stays /admin/default_adapter's; the report only says whether each entry beat the default."""

from __future__ import annotations

from pathlib import Path

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import context
from service.context import ADMIN, Service, guarded
from service.errors import Conflict
from service.schemas import EvalEntryBody, EvalSubmitBody
from spo_runtime.errors import InvalidRequestError
from spo_runtime.limits import EVAL_MAX_ADAPTERS, EVAL_MAX_PROMPTS, LORA_SCALE_RANGE

_REQUEST_FIELDS = ("num_inference_steps", "guidance_scale", "scheduler", "width", "height", "negative_prompt")


def _entry(svc: Service, i: int, given: EvalEntryBody):
    """Entry i as the job will run it: "none", a loaded adapter (by its file under SPO_ADAPTER_DIR, or the
    preset's own) or a .safetensors file under SPO_ADAPTER_DIR; its scale in the LoRA scale range."""
    from spo_runtime.fsutil import file_sha256
    from spo_runtime.state import resolve_under
    from spo_runtime.training.evaluation import EvalEntry

    field = f"adapters[{i}]"
    if given.adapter == "none":
        if given.scale is not None:
            raise InvalidRequestError(f"{field}.scale", "must be absent for none (the base model: scale 0)")
        return EvalEntry(adapter="none", scale=0.0, source="none")
    scale = svc.pipe.default_lora_scale if given.scale is None else given.scale
    lo, hi = LORA_SCALE_RANGE
    if not lo <= scale <= hi:
        raise InvalidRequestError(f"{field}.scale", f"must be in {lo:g}..{hi:g}, got {scale!r}")
    root = svc.admin_store.adapter_dir.resolve()
    reg = svc.pipe.registry
    loaded = reg.adapters.get(given.adapter)
    if loaded is not None:
        src = Path(loaded.source)
        if src.is_absolute() and src.is_file() and src.resolve().is_relative_to(root):
            return EvalEntry(adapter=given.adapter, scale=scale, source="file", file=str(src.resolve().relative_to(root)),
                             sha256=loaded.sha256, load_as=given.adapter)
        if given.adapter in svc.sync.preset_adapters:
            return EvalEntry(adapter=given.adapter, scale=scale, source="preset", sha256=loaded.sha256, load_as=given.adapter)
        raise InvalidRequestError(field, f"adapter {given.adapter!r} is loaded but not from a file under SPO_ADAPTER_DIR, "
                                         "so an evaluation job cannot load it")
    if given.adapter.lower().endswith(".safetensors"):
        path = resolve_under(root, given.adapter, field)
        sha = file_sha256(path)
        return EvalEntry(adapter=given.adapter, scale=scale, source="file", file=str(path.relative_to(root)),
                         sha256=sha, load_as=f"eval-{sha[:16]}")
    raise InvalidRequestError(field, f"{given.adapter!r} is not \"none\", a loaded adapter "
                                     f"({', '.join(reg.adapters) or 'none loaded'}) or a .safetensors file under SPO_ADAPTER_DIR")


def _config(svc: Service, body: EvalSubmitBody, prompts: list[str]) -> dict:
    """The job's EvalConfig: entries resolved, seeds and scorer checked, the generation fields validated as
    /generate validates them (400 naming the field, sizes in the preset's range). Blocking (hashes files)."""
    from spo_runtime.training.evaluation import SCORERS, EvalConfig, check_seeds, default_entry

    if not 1 <= len(body.adapters) <= EVAL_MAX_ADAPTERS:
        raise InvalidRequestError("adapters", f"must hold 1..{EVAL_MAX_ADAPTERS} entries, got {len(body.adapters)}")
    entries = [_entry(svc, i, a) for i, a in enumerate(body.adapters)]
    check_seeds(body.seeds)
    if body.scorer not in SCORERS:
        raise InvalidRequestError("scorer", f"must be one of {', '.join(SCORERS)}, got {body.scorer!r}")
    fields = {k: getattr(body, k) for k in _REQUEST_FIELDS if getattr(body, k) is not None}
    svc.pipe.parse({"prompt": prompts[0], **fields})  # the fields every image shares, as /generate takes them
    adapter, scale = svc.pipe.default_adapter, svc.pipe.default_lora_scale
    cfg = EvalConfig(entries=entries, seeds=body.seeds, request=fields, scorer=body.scorer, batch=svc.settings.max_batch,
                     default_adapter=adapter, default_lora_scale=scale, default_entry=default_entry(entries, adapter, scale))
    return cfg.model_dump()


@guarded(ADMIN)
async def eval_submit(svc: Service, request: Request) -> Response:
    """A new evaluation: 400 naming the field (prompts, adapters[i], adapters[i].scale, seeds, scorer, a
    generation field), 429 with Retry-After past SPO_MAX_QUEUED_JOBS waiting jobs of either kind."""
    body = await context.body(request, EvalSubmitBody)
    prompts = await anyio.to_thread.run_sync(context.job_prompts, svc, body.prompts, body.prompts_file, EVAL_MAX_PROMPTS)
    cfg = await anyio.to_thread.run_sync(_config, svc, body, prompts)
    images = len(prompts) * len(cfg["seeds"]) * len(cfg["entries"])
    rec = await anyio.to_thread.run_sync(lambda: svc.jobs.create(prompts, cfg, max_queued=svc.settings.max_queued_jobs,
                                                                 kind="eval", images_total=images, images_done=0))
    return JSONResponse({"job_id": rec["job_id"], "state": rec["state"], "images": images,
                         "entries": [{"adapter": e["adapter"], "scale": e["scale"], "sha256": e["sha256"]} for e in cfg["entries"]],
                         "default_adapter": cfg["default_adapter"], "default_entry": cfg["default_entry"]})


async def _completed(svc: Service, request: Request) -> tuple[dict, Path]:
    rec = await anyio.to_thread.run_sync(svc.jobs.read, context.job_id(request), "eval")
    if rec["state"] != "completed":
        raise Conflict("job_id", f"the job is {rec['state']}, not completed")
    return rec, svc.jobs.dir(rec["job_id"])


@guarded(ADMIN)
async def eval_status(svc: Service, request: Request) -> Response:
    return JSONResponse(await anyio.to_thread.run_sync(svc.jobs.read, context.job_id(request), "eval"))


@guarded(ADMIN)
async def eval_get(svc: Service, request: Request) -> Response:
    """The report: per entry the score's mean and 95% interval, the sign test against the first entry and
    against the default, `beats_default`; the sheet's geometry."""
    import json

    rec, d = await _completed(svc, request)
    report = json.loads(await anyio.to_thread.run_sync((d / "report.json").read_text))
    return JSONResponse({**report, "state": rec["state"]})


@guarded(ADMIN)
async def eval_sheet(svc: Service, request: Request) -> Response:
    """The contact sheet: prompts (rows) x entries (columns), the first seed's images, as PNG."""
    _, d = await _completed(svc, request)
    return Response(await anyio.to_thread.run_sync((d / "sheet.png").read_bytes), media_type="image/png")


@guarded(ADMIN)
async def eval_cancel(svc: Service, request: Request) -> Response:
    return JSONResponse(await context.cancel_job(svc, request, "eval"))


@guarded(ADMIN)
async def eval_resume(svc: Service, request: Request) -> Response:
    """Queue a failed, canceled or interrupted evaluation again: it goes on from its last batch."""
    return JSONResponse(await context.resume_job(svc, request, "eval"))


@guarded(ADMIN)
async def eval_list(svc: Service, request: Request) -> Response:
    records = await anyio.to_thread.run_sync(svc.jobs.list, "eval")
    counts = await anyio.to_thread.run_sync(svc.supervisor.counts, "eval")
    jobs = [{k: v for k, v in r.items() if v is not None and k not in ("history", "config")} for r in records]
    return JSONResponse({"jobs": jobs, "counts": counts})


ROUTES = [
    Route("/eval/submit", eval_submit, methods=["POST"]),
    Route("/eval/status", eval_status, methods=["GET"]),
    Route("/eval/get", eval_get, methods=["GET"]),
    Route("/eval/sheet", eval_sheet, methods=["GET"]),
    Route("/eval/cancel", eval_cancel, methods=["POST"]),
    Route("/eval/resume", eval_resume, methods=["POST"]),
    Route("/eval/list", eval_list, methods=["GET"]),
]
