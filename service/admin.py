"""/info and the admin routes (/admin/*: the default LoRA scale and adapter, loading, unloading and
listing adapters). Admin token only, but /info: open to all, it shows file paths, host names, pids and
error texts only to the admin token (others get short reason codes). Every handler raises spo_runtime's
typed errors (mapped to HTTP in one place) and runs its blocking work (file locks, fsync, adapter reads)
off the event loop."""

from __future__ import annotations

import os
import time

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import context
from service.context import ADMIN, Service, guarded
from service.errors import Conflict
from service.schemas import LoadBody, NameBody, ScaleBody, check_adapter_name
from spo_runtime.errors import InvalidRequestError


async def info(request: Request) -> Response:
    from service.workers import describe, worker_index
    from spo_runtime import __version__

    svc = context.bound()
    authed = svc is not None and context.credentials_ok(svc, request.headers, admin=True)
    own = {"pid": os.getpid()} if authed else {}
    if svc is None or svc.pipe is None:
        failure = svc.failure if svc else None
        return JSONResponse({"ready": False, "failure": failure if authed else context.reason_code(failure),
                             "version": __version__, "worker_index": worker_index(), **own})
    body = svc.pipe.info(show_paths=authed)
    reports = await anyio.to_thread.run_sync(svc.sync.workers) if svc.sync else []
    workers = await anyio.to_thread.run_sync(describe, svc.settings.data_dir, reports)  # each one's index and device
    body.update({"ready": svc.ready, "engine": svc.engine.stats(),
                 "workers": workers if authed else [public_worker(w) for w in workers], "worker_index": worker_index(),
                 **own, "uptime_s": round(time.time() - svc.started, 1)})
    return JSONResponse(body)


def public_worker(w: dict) -> dict:
    """A worker of /info without the admin token: no host or pid, and each error as a reason code."""
    out = {k: v for k, v in w.items() if k not in ("host", "pid")}
    if "errors" in w:
        out["errors"] = {k: "damaged" if k == "admin_state" else "not_loaded" for k in w["errors"] or {}}
    return out


@guarded(ADMIN)
async def set_scale(svc: Service, request: Request) -> Response:
    body = await context.body(request, ScaleBody)
    out = await anyio.to_thread.run_sync(svc.engine.set_default_lora_scale, body.scale)
    await anyio.to_thread.run_sync(svc.admin_store.mutate, lambda s: s.update(default_lora_scale=out["scale"]))
    return JSONResponse({"previous": out["previous"], "scale": out["scale"], "swap_ms": round(out["swap_ms"], 3),
                         "applied_ms": round(out["applied_ms"], 3)})


@guarded(ADMIN)
async def set_default_adapter(svc: Service, request: Request) -> Response:
    body = await context.body(request, NameBody)
    await anyio.to_thread.run_sync(svc.engine.set_default_adapter, body.name)
    await anyio.to_thread.run_sync(svc.admin_store.mutate, lambda s: s.update(default_adapter=body.name))
    return JSONResponse({"default_adapter": body.name})


@guarded(ADMIN)
async def load_adapter(svc: Service, request: Request) -> Response:
    from spo_runtime.state import resolve_under

    body = await context.body(request, LoadBody)
    check_adapter_name("name", body.name)
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


@guarded(ADMIN)
async def unload_adapter(svc: Service, request: Request) -> Response:
    body = await context.body(request, NameBody)
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


@guarded(ADMIN)
async def list_adapters(svc: Service, request: Request) -> Response:
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


ROUTES = [
    Route("/info", info, methods=["GET"]),
    Route("/admin/lora_scale", set_scale, methods=["POST"]),
    Route("/admin/default_adapter", set_default_adapter, methods=["POST"]),
    Route("/admin/adapters/load", load_adapter, methods=["POST"]),
    Route("/admin/adapters/unload", unload_adapter, methods=["POST"]),
    Route("/admin/adapters", list_adapters, methods=["GET"]),
]
