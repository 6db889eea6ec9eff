"""The trainer process of a training job: `python -m spo_runtime train-job <dir>`, which the supervisor
(`jobs.Supervisor`) starts, one per job.

- It dies with the server: first thing, it asks the kernel for SIGKILL when its parent dies
  (PR_SET_PDEATHSIG), then checks that its parent is still the supervisor's process (`--parent-pid`)
  and exits if not, as the server may have died before the request.
- It holds `<dir>/.lock` for its life, so two trainers never write one job. It checks for
  `<dir>/cancel` and for SIGTERM at round boundaries and checkpoints before it stops.
- Rank 0 records progress and the outcome in the job record and exports the adapter.
- A job of N > 1 data-parallel ranks runs them as N processes under the trainer process
  (`distributed.launch`): it forwards SIGTERM to them, and when one dies it stops the others and
  fails the job with the rank and the reason.
- An evaluation job (kind "eval") runs `evaluation.run_eval` instead, under the same lock, signals and
  cancel file; it stops between batches.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from spo_runtime.errors import failure_reason
from spo_runtime.training.jobs import JobStore

__all__ = ["die_with_parent", "run_job"]

log = logging.getLogger("spo_runtime.jobs")

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> bool:
    """In the trainer, before anything else: SIGKILL when the parent (the thread that started us)
    dies, by Linux prctl(PR_SET_PDEATHSIG). The parent may have died before the request, so this
    returns whether the parent is still `parent_pid`; on False the caller must exit."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError):  # not Linux: no death signal, the pid check still holds
        pass
    return os.getppid() == parent_pid


def run_job(job_dir: str | Path, adapter_dir: str | Path, parent_pid: int | None = None) -> int:
    """Body of `python -m spo_runtime train-job DIR`: train, checkpoint, export, record the outcome (an
    evaluation job: `evaluation.run_eval`).

    `parent_pid`: the supervisor's pid (`--parent-pid`, which the supervisor passes); the trainer dies
    with that process. Started by hand without it, it does not. A job of N > 1 ranks (config `nproc`,
    SPO_TRAIN_NPROC, the training GPUs) runs them as N processes under this one, which forwards a stop
    to them and fails the job, naming the rank and why, when one of them dies."""
    if parent_pid is not None and not die_with_parent(parent_pid):
        print(f"the supervisor (pid {parent_pid}) is gone: not training", file=sys.stderr)
        return 4
    from spo_runtime.settings import Settings
    from spo_runtime.training.config import TrainConfig
    from spo_runtime.training.distributed import launch, resolve_world, run_rank

    d = Path(job_dir)
    store = JobStore(d.parent.parent, adapter_dir)
    job_id = d.name
    lock = open(d / ".lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"job {job_id} is already being trained by another process", file=sys.stderr)
        return 3
    stop = {"term": False}
    for sig in (signal.SIGTERM, signal.SIGINT):  # stop at the next round boundary, after a checkpoint
        signal.signal(sig, lambda *_: stop.update(term=True))
    try:
        if store.read(job_id).get("kind", "train") == "eval":
            from spo_runtime.training.evaluation import run_eval

            try:
                return run_eval(store, job_id, lambda: stop["term"])
            except Exception as e:
                return _failed(store, job_id, e)
        try:
            settings = Settings.from_env()
            cfg = TrainConfig.parse(store.read(job_id)["config"])
            cfg.with_spm_under(adapter_dir, settings.spm)  # as at submit: SPO_SPM or a file under the adapter dir
            world, devices = resolve_world(cfg.nproc, settings)
            cfg.check_world(world)
        except Exception as e:
            return _failed(store, job_id, e)
        store.update(job_id, world_size=world, devices=devices, pairs_per_step=cfg.pairs_per_step(world),
                     micro_batch=cfg.micro_batch, grad_accum=cfg.accumulation(world))
        if world == 1:
            try:
                return run_rank(0, 1, None, devices[0], d, lambda g: _train_job(d, Path(adapter_dir), g, lambda: stop["term"]))
            except Exception as e:
                return _failed(store, job_id, e)
        result = launch(world, _job_rank, (str(d), str(adapter_dir), devices), d / ".rendezvous", error_dir=d,
                        should_stop=lambda: stop["term"])
        if result.ok:
            return 0
        if store.read(job_id)["state"] == "running":
            store.update(job_id, state="failed", finished_at=time.time(), error=result.reason)
        print(f"job {job_id} failed: {result.reason}", file=sys.stderr)
        return 1
    finally:
        lock.close()


def _failed(store: JobStore, job_id: str, e: BaseException) -> int:
    store.update(job_id, state="failed", finished_at=time.time(), error=failure_reason(e))
    traceback.print_exc()
    return 1


def _job_rank(rank: int, world: int, rendezvous: str, job_dir: str, adapter_dir: str, devices: list[str]) -> None:
    """One rank of a data-parallel job, in its own (spawned) process: join the group, train, and on an
    error write the reason to `<dir>/rank-N.error` for the job process to report."""
    from spo_runtime.training.distributed import run_rank

    die_with_parent(os.getppid())  # a rank never outlives the job process
    d = Path(job_dir)
    stop = {"term": False}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.update(term=True))
    code = run_rank(rank, world, rendezvous, devices[rank], d, lambda g: _train_job(d, Path(adapter_dir), g, lambda: stop["term"]))
    if code:
        sys.exit(code)


def _train_job(d: Path, adapter_dir: Path, group, stop_requested) -> int:
    """Train the job in `d` as `group`'s rank; rank 0 records progress and the outcome (but a failure,
    which the caller records), exports the adapter and writes the checkpoints."""
    from spo_runtime.training.config import TrainConfig
    from spo_runtime.training.run import build_trainer, read_prompts
    from spo_runtime.training.trainer import JobCancelled

    store = JobStore(d.parent.parent, adapter_dir)
    job_id = d.name
    rec = store.read(job_id)
    main = group.main
    cfg = TrainConfig.parse(rec["config"])
    start = adapter_dir / rec["start_adapter"] if rec.get("start_adapter") else None
    trainer = build_trainer(cfg, read_prompts(d / "prompts.txt"), d / "run", start_adapter=start, group=group)
    t_start, r_start = time.time(), trainer.round
    # the rounds up to the checkpoint (metrics.jsonl holds only those now): the ones after it run again
    pairs = {"kept": _summary(d / "run" / "metrics.jsonl")["pairs_kept"]}
    if main:
        store.update(job_id, total_rounds=trainer.total_rounds, resumed_from_round=trainer.resumed_from,
                     round=trainer.round, pairs_kept=pairs["kept"])

    def on_round(stats: dict) -> None:
        if not main:
            return
        from spo_runtime.metrics import default_metrics

        default_metrics().train_round.observe(stats["seconds"])
        pairs["kept"] += stats["pairs_kept"]
        eta = (time.time() - t_start) / max(trainer.round - r_start, 1) * (trainer.total_rounds - trainer.round)
        store.update(job_id, round=trainer.round, pairs_kept=pairs["kept"], loss=stats["loss"],
                     clamp_share=stats["clamp_share"], kept_rate=stats["kept_rate"], eta_s=round(eta, 1),
                     last_round_s=round(stats["seconds"], 3), pairs_per_s=round(stats["pairs_per_s"], 3))

    def should_stop() -> bool:
        return stop_requested() or (d / "cancel").exists()

    try:
        trainer.train(should_stop=should_stop, on_round=on_round)
    except JobCancelled:
        if not main:
            return 0
        if (d / "cancel").exists():
            store.update(job_id, state="canceled", finished_at=time.time(), round=trainer.round)
        else:
            store.update(job_id, state="interrupted", round=trainer.round, interruptions=store.read(job_id).get("interruptions", 0) + 1)
        return 0
    if main:
        out = trainer.export(adapter_dir, store.read(job_id)["output_adapter"])
        summary = _summary(d / "run" / "metrics.jsonl")
        store.update(job_id, state="completed", finished_at=time.time(), round=trainer.round, result=out, metrics=summary)
    return 0


def _summary(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    return {
        "rounds": len(rows),
        "pairs_kept": sum(r["pairs_kept"] for r in rows),
        "kept_rate": sum(r["kept_rate"] for r in rows) / len(rows) if rows else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "mean_round_s": sum(r["seconds"] for r in rows) / len(rows) if rows else None,
    }
