"""One engine per GPU in one server: how many BentoML workers start, and which device each one binds.

`SPO_WORKERS=auto` starts one worker per GPU this process can see (one worker without CUDA). BentoML
numbers its workers from 1 (`bentoml.server_context.worker_index`); worker i binds the visible GPU
(i - 1) mod n, so an integer `SPO_WORKERS` above the GPU count spreads its workers round-robin. The
device is a CUDA ordinal *within* the visible set: with `CUDA_VISIBLE_DEVICES=3,5` worker 2 binds
`cuda:1`, which is physical GPU 5. An explicit `SPO_DEVICE` (`cpu`, `mps`, `cuda:N`) is the operator's
choice and wins: every worker binds it, and `auto` then means one worker.

Each worker records its index and device under `SPO_DATA_DIR/worker_devices/` so that whichever worker
answers `/info` can list every worker's device. Records are keyed by host and pid: pods that share
`SPO_DATA_DIR` see only their own.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Mapping

AUTO = "auto"


# -- pure mapping (unit-tested for 1, 2 and 8 GPUs and CUDA_VISIBLE_DEVICES subsets) ---------------


def visible_gpus(count: int, environ: Mapping[str, str] | None = None) -> list[str]:
    """Names of the `count` GPUs CUDA exposes, in ordinal order: the first `count` entries of
    CUDA_VISIBLE_DEVICES (indices or GPU-/MIG- UUIDs) when it is set, else "0".."count-1"."""
    env = os.environ if environ is None else environ
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return [str(i) for i in range(count)]
    names = [t.strip() for t in raw.split(",") if t.strip()]
    if len(names) < count:  # torch saw more than the variable names (set after CUDA started): plain ordinals
        return [str(i) for i in range(count)]
    return names[:count]


def pinned(device: str | None) -> bool:
    """SPO_DEVICE names one device (cpu, mps, cuda:N): every worker binds it."""
    return device is not None and device != "cuda"


def worker_count(workers: int | str, device: str | None, gpus: int) -> int:
    """BentoML workers to start: `auto` is one per visible GPU (at least one; one when the device is pinned)."""
    if workers != AUTO:
        return int(workers)
    if pinned(device) or gpus < 1:
        return 1
    return gpus


def worker_device(index: int | None, device: str | None, gpus: int) -> str | None:
    """The device worker `index` (1-based, as BentoML counts; None outside a server: 1) binds.

    Without a visible GPU an unset SPO_DEVICE is `cpu` (what the loader would pick), and `cuda` stays
    `cuda`, for the loader to refuse with its clear error."""
    if pinned(device):
        return device
    if gpus < 1:
        return device or "cpu"
    i = (1 if index is None else index) - 1
    if i < 0:
        raise ValueError(f"worker index must be >= 1, got {index}")
    return f"cuda:{i % gpus}"


def binding(index: int | None, device: str | None, gpus: int, environ: Mapping[str, str] | None = None) -> dict:
    """{"worker_index", "device", "gpu"} of worker `index`: gpu is the physical GPU's name (None off CUDA)."""
    dev = worker_device(index, device, gpus)
    gpu = None
    if dev is not None and dev.startswith("cuda"):
        names = visible_gpus(gpus, environ)
        ordinal = int(dev.partition(":")[2] or 0)
        gpu = names[ordinal] if ordinal < len(names) else str(ordinal)
    return {"worker_index": index, "device": dev, "gpu": gpu}


def plan(workers: int | str, device: str | None, gpus: int, environ: Mapping[str, str] | None = None) -> list[dict]:
    """Every worker's binding, in BentoML's worker order."""
    return [binding(i, device, gpus, environ) for i in range(1, worker_count(workers, device, gpus) + 1)]


# -- this process -------------------------------------------------------------------------------


def gpu_count() -> int:
    """GPUs this process can use (CUDA_VISIBLE_DEVICES applied); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def server_workers(settings) -> int:
    """The `workers=` of the BentoML service: SPO_WORKERS, with `auto` resolved on this machine."""
    return worker_count(settings.workers, settings.device, gpu_count() if settings.workers == AUTO else 0)


def resources(model: str, device: str | None, gpus: int) -> dict:
    """The `resources=` of the BentoML service, so that `bentoml build` and a deployment ask for GPUs where the
    served model runs on them: {"gpu": n} for sdxl-spo and sdxl-random (and `auto` with CUDA), n the visible GPUs
    (at least 1: a bento built on a CPU machine still asks for one). With n visible, BentoML's allocator gives
    every worker CUDA_VISIBLE_DEVICES=0..n-1, the identity, so each worker's binding above is unchanged; a set
    CUDA_VISIBLE_DEVICES is left alone. None for the tiny model, or a device the operator pinned (SPO_DEVICE):
    the allocator would otherwise hide that device behind CUDA_VISIBLE_DEVICES=0."""
    if pinned(device) or model == "tiny" or (model == "auto" and gpus == 0):
        return {}
    return {"gpu": max(1, gpus)}


def server_resources(settings) -> dict:
    return resources(settings.model, settings.device, gpu_count())


def worker_index() -> int | None:
    import bentoml

    return bentoml.server_context.worker_index


def bind(settings):
    """This worker's settings with its device, its binding recorded for /info. Call once, at load."""
    b = binding(worker_index(), settings.device, 0 if pinned(settings.device) else gpu_count())
    record(settings.data_dir, b)
    return settings if b["device"] == settings.device else settings.model_copy(update={"device": b["device"]})


def _dir(data_dir) -> Path:
    return Path(data_dir) / "worker_devices"


def _host() -> str:
    return socket.gethostname()


def record(data_dir, rec: dict) -> None:
    """Write this process's binding atomically (write, fsync, rename); drop this host's dead records."""
    d = _dir(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    rec = {**rec, "pid": os.getpid(), "host": _host()}
    for f in d.glob(f"{rec['host']}.*.json"):
        if not _alive(f.name.split(".")[-2]):
            f.unlink(missing_ok=True)
    path = d / f"{rec['host']}.{rec['pid']}.json"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        json.dump(rec, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True


def bindings(data_dir) -> dict[int, dict]:
    """{pid: {"worker_index", "device", "gpu"}} of this host's live workers."""
    out = {}
    host = _host()
    for f in sorted(_dir(data_dir).glob(f"{host}.*.json")):
        try:
            rec = json.loads(f.read_text())
            pid = int(rec["pid"])
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            continue
        if not _alive(pid):
            continue
        out[pid] = {k: rec.get(k) for k in ("worker_index", "device", "gpu")}
    return out


def describe(data_dir, reports: list[dict]) -> list[dict]:
    """The workers of /info: each report (AdminSync's, keyed by pid) with that worker's index, device and
    GPU, ordered by worker index. A worker still loading its model has no report yet and is not listed."""
    bound = bindings(data_dir)
    out = [{**r, **bound.get(r.get("pid"), {})} for r in reports]
    return sorted(out, key=lambda w: (w.get("worker_index") is None, w.get("worker_index") or 0, w.get("pid") or 0))
