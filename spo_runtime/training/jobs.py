"""Durable training jobs: records in SPO_DATA_DIR/jobs/<id>/, one trainer process per job, one supervisor.

- A job record (`job.json`, replaced atomically) holds the request, the state (queued, running,
  completed, failed, canceled, interrupted), progress and a history of state changes.
- The supervisor is whichever worker holds `jobs/.supervisor.lock`; it starts queued jobs, at most
  SPO_MAX_TRAIN_JOBS (default 1) at once, the rest waiting queued in FIFO order, each as
  `python -m spo_runtime train-job <dir>` (its own process, on the training device), notices
  trainers that died, and at start-up marks jobs left `running` by a dead server as `interrupted`
  and queues them again: they resume from their last checkpoint. It takes the trainer's environment
  and device from its caller; it reads no environment of its own.
- The trainer dies with the server: first thing, it asks the kernel for SIGKILL when its parent
  dies (PR_SET_PDEATHSIG), then checks that its parent is still the supervisor's process
  (`--parent-pid`) and exits if not, as the server may have died before the request.
- The trainer holds `<dir>/.lock` for its life, so two trainers never write one job. It checks for
  `<dir>/cancel` and for SIGTERM at round boundaries and checkpoints before it stops.
- A job of N > 1 data-parallel ranks runs them as N processes under the trainer process
  (`distributed.launch`): it forwards SIGTERM to them, and when one dies it stops the others and
  fails the job with the rank and the reason. `JobStore.resume` queues a failed, canceled or
  interrupted job again; it goes on from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Mapping, Sequence

from spo_runtime.errors import InvalidRequestError, JobNotFoundError, JobStateError, failure_reason
from spo_runtime.fsutil import atomic_write, write_json_atomic

log = logging.getLogger("spo_runtime.jobs")

STATES = ("queued", "running", "completed", "failed", "canceled", "interrupted")
FINAL = ("completed", "failed", "canceled")
TRAINER_COMMAND = (sys.executable, "-m", "spo_runtime", "train-job")  # + <dir> --adapter-dir <dir> --parent-pid <pid>
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class JobStore:
    def __init__(self, data_dir: str | Path, adapter_dir: str | Path):
        self.root = Path(data_dir) / "jobs"
        self.adapter_dir = Path(adapter_dir)
        self.root.mkdir(parents=True, exist_ok=True)

    def dir(self, job_id: str) -> Path:
        if not job_id or not job_id.replace("-", "").isalnum() or len(job_id) > 64:
            raise InvalidRequestError("job_id", f"must be a job id as /train/submit returned it, got {job_id!r}")
        d = self.root / job_id
        if not (d / "job.json").exists():
            raise JobNotFoundError(job_id)
        return d

    def create(self, prompts: list[str], config: dict, start_adapter: str | None, output_adapter: str | None) -> dict:
        job_id = uuid.uuid4().hex[:16]
        d = self.root / job_id
        d.mkdir(parents=True)
        atomic_write(d / "prompts.txt", ("\n".join(prompts) + "\n").encode())
        rec = {
            "job_id": job_id, "state": "queued", "created_at": time.time(), "config": config,
            "start_adapter": start_adapter, "output_adapter": output_adapter or f"spo-{job_id[:8]}",
            "prompts": len(prompts), "round": 0, "total_rounds": None, "pairs_kept": 0, "loss": None,
            "clamp_share": None, "eta_s": None, "error": None, "history": [{"state": "queued", "at": time.time()}],
        }
        write_json_atomic(d / "job.json", rec)
        return rec

    def read(self, job_id: str) -> dict:
        return json.loads((self.dir(job_id) / "job.json").read_text())

    def update(self, job_id: str, **fields) -> dict:
        d = self.dir(job_id)
        with _flock(d / ".record.lock"):
            rec = json.loads((d / "job.json").read_text())
            if "state" in fields and fields["state"] != rec["state"]:
                rec["history"].append({"state": fields["state"], "at": time.time(), **({"error": fields["error"]} if fields.get("error") else {})})
            rec.update(fields)
            rec["updated_at"] = time.time()
            write_json_atomic(d / "job.json", rec)
            return rec

    def list(self) -> list[dict]:
        out = []
        for f in sorted(self.root.glob("*/job.json")):
            with contextlib.suppress(OSError, json.JSONDecodeError):
                out.append(json.loads(f.read_text()))
        return sorted(out, key=lambda r: r["created_at"])

    def cancel(self, job_id: str) -> dict:
        d = self.dir(job_id)
        rec = self.read(job_id)
        if rec["state"] in FINAL:
            return rec
        (d / "cancel").touch()
        if rec["state"] in ("queued", "interrupted"):
            return self.update(job_id, state="canceled", finished_at=time.time())
        return rec

    def resume(self, job_id: str) -> dict:
        """Queue a failed, canceled or interrupted job again; its trainer resumes from the last checkpoint
        (a job that failed before its first checkpoint starts over). Refused for a queued, running or
        completed job."""
        d = self.dir(job_id)
        with _flock(d / ".resume.lock"):
            rec = self.read(job_id)
            if rec["state"] not in ("failed", "canceled", "interrupted"):
                raise JobStateError(f"job_id: the job is {rec['state']}; only a failed, canceled or interrupted job resumes")
            (d / "cancel").unlink(missing_ok=True)
            return self.update(job_id, state="queued", error=None, finished_at=None, resumes=rec.get("resumes", 0) + 1)

    def locked(self, job_id: str) -> bool:
        """Whether a live trainer holds the job's lock."""
        try:
            fh = open(self.dir(job_id) / ".lock", "a")
        except OSError:
            return False
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False


@contextlib.contextmanager
def _flock(path: Path):
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Supervisor:
    """Starts queued jobs in their own processes, at most `max_jobs` at once. Only the lock holder supervises.

    `env` is the trainer process's whole environment (its SPO_* settings included); `train_device`,
    when set, becomes the trainer's SPO_DEVICE. `command` starts a trainer; the job directory and
    `--adapter-dir DIR` are appended. `max_jobs`: default SPO_MAX_TRAIN_JOBS as `env` gives it (1)."""

    def __init__(self, store: JobStore, env: Mapping[str, str], train_device: str | None = None, poll_s: float = 0.5,
                 on_change=None, command: Sequence[str] = TRAINER_COMMAND, max_jobs: int | None = None):
        self.store = store
        self.env = dict(env)
        self.train_device = train_device
        self.command = list(command)
        self.poll_s = poll_s
        if max_jobs is None:
            from spo_runtime.settings import Settings

            max_jobs = Settings.from_env({k: v for k, v in self.env.items() if k == "SPO_MAX_TRAIN_JOBS"}).max_train_jobs
        if max_jobs < 1:
            raise ValueError(f"SPO_MAX_TRAIN_JOBS: must be >= 1, got {max_jobs}")
        self.max_jobs = max_jobs
        self.running: dict[str, subprocess.Popen] = {}  # job id -> its trainer, in start order
        self.owner = False
        self._lock_fh = None
        self._stop = threading.Event()
        self._stopping = False
        self.on_change = on_change
        self.thread = threading.Thread(target=self._loop, name="spo-jobs", daemon=True)

    def start(self) -> Supervisor:
        self.thread.start()
        return self

    def _try_own(self) -> bool:
        if self.owner:
            return True
        fh = open(self.store.root / ".supervisor.lock", "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return False
        self._lock_fh = fh
        self.owner = True
        self._recover()
        return True

    def _recover(self) -> None:
        """Jobs a dead server left `running` are interrupted; they and earlier interrupted ones resume."""
        for rec in self.store.list():
            if rec["state"] == "running" and not self.store.locked(rec["job_id"]):
                self.store.update(rec["job_id"], state="interrupted", interruptions=rec.get("interruptions", 0) + 1)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self._try_own():
                    self._tick()
            except Exception:
                log.exception("job supervisor tick failed")
            self._stop.wait(self.poll_s)

    @property
    def proc(self) -> subprocess.Popen | None:
        """The oldest running trainer (the only one with SPO_MAX_TRAIN_JOBS=1), or None."""
        return next(iter(self.running.values()), None)

    @property
    def current(self) -> str | None:
        return next(iter(self.running), None)

    def _tick(self) -> None:
        for job_id, proc in list(self.running.items()):
            code = proc.poll()
            if code is None:
                continue
            rec = self.store.read(job_id)
            if rec["state"] == "running":  # the trainer died without recording an outcome
                reason = f"the trainer process exited with {'signal ' + str(-code) if code < 0 else 'code ' + str(code)}"
                self.store.update(job_id, state="failed", error=reason, finished_at=time.time())
            del self.running[job_id]
            self._changed()
        if self._stopping or len(self.running) >= self.max_jobs:
            return
        pending = [r for r in self.store.list() if r["state"] in ("interrupted", "queued") and r["job_id"] not in self.running]
        # interrupted jobs first (they were running), then FIFO; the rest stay queued
        pending.sort(key=lambda r: (r["state"] != "interrupted", r["created_at"]))
        for rec in pending[: self.max_jobs - len(self.running)]:
            self._spawn(rec["job_id"])

    def _spawn(self, job_id: str) -> None:
        d = self.store.dir(job_id)
        env = dict(self.env)
        if self.train_device:
            env["SPO_DEVICE"] = self.train_device
        self.store.update(job_id, state="running", started_at=time.time(), error=None)
        try:
            with open(d / "trainer.log", "ab") as log_fh:  # the child has its own copy of the descriptor
                proc = subprocess.Popen(
                    # --parent-pid: the trainer checks it after asking for its death signal
                    [*self.command, str(d), "--adapter-dir", str(self.store.adapter_dir), "--parent-pid", str(os.getpid())],
                    env=env, stdout=log_fh, stderr=subprocess.STDOUT,
                    start_new_session=True,  # signals to the server's process group reach it only through stop()
                )
        except OSError as e:
            self.store.update(job_id, state="failed", error=f"the trainer process could not start: {e}", finished_at=time.time())
            self._changed()
            return
        self.running[job_id] = proc
        self._changed()

    def _changed(self) -> None:
        if self.on_change:
            with contextlib.suppress(Exception):
                self.on_change(self.counts())

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATES}
        for r in self.store.list():
            out[r["state"]] = out.get(r["state"], 0) + 1
        return out

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM every trainer (each checkpoints at its round boundary) and wait for them.

        The supervisor thread must outlive the trainers: PR_SET_PDEATHSIG fires when the thread that
        started the child ends, so the loop stops only after the trainers have exited.
        """
        self._stopping = True  # no new trainer from here on
        procs = [p for p in list(self.running.values()) if p.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        self._stop.set()


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


# ---------------------------------------------------------------------------------------------
# The trainer process


def run_job(job_dir: str | Path, adapter_dir: str | Path, parent_pid: int | None = None) -> int:
    """Body of `python -m spo_runtime train-job DIR`: train, checkpoint, export, record the outcome.

    `parent_pid`: the supervisor's pid (`--parent-pid`, which the supervisor passes); the trainer dies
    with that process. Started by hand without it, it does not. A job of N > 1 ranks (config `nproc`,
    SPO_TRAIN_NPROC, the training GPUs) runs them as N processes under this one, which forwards a stop
    to them and fails the job, naming the rank and why, when one of them dies."""
    if parent_pid is not None and not die_with_parent(parent_pid):
        print(f"the supervisor (pid {parent_pid}) is gone: not training", file=sys.stderr)
        return 4
    from spo_runtime.training.distributed import launch, resolve_world, run_rank
    from spo_runtime.settings import Settings
    from spo_runtime.training.trainer import TrainConfig

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
        try:
            cfg = TrainConfig.parse(store.read(job_id)["config"])
            world, devices = resolve_world(cfg.nproc, Settings.from_env())
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
    from spo_runtime.training.trainer import JobCancelled, TrainConfig, build_trainer, read_prompts

    store = JobStore(d.parent.parent, adapter_dir)
    job_id = d.name
    rec = store.read(job_id)
    main = group.main
    cfg = TrainConfig.parse(rec["config"])
    start = adapter_dir / rec["start_adapter"] if rec.get("start_adapter") else None
    trainer = build_trainer(cfg, read_prompts(d / "prompts.txt"), d / "run", start_adapter=start, group=group)
    resumed = trainer.resumed_from is not None
    if main:
        store.update(job_id, total_rounds=trainer.total_rounds, resumed_from_round=trainer.resumed_from)
    t_start, r_start = time.time(), trainer.round
    pairs = {"kept": rec.get("pairs_kept", 0) if resumed else 0}

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
