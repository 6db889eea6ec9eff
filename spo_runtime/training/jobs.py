"""Durable training jobs, the server side: records in SPO_DATA_DIR/jobs/<id>/ (`JobStore`) and the one
supervisor that runs them (`Supervisor`); the trainer process itself is `job_process`.

- A job record (`job.json`, replaced atomically) holds the request, the state (queued, running,
  completed, failed, canceled, interrupted), progress and a history of state changes.
- The supervisor is whichever worker holds `jobs/.supervisor.lock`; it starts queued jobs, at most
  SPO_MAX_TRAIN_JOBS (default 1) at once, the rest waiting queued in FIFO order, each as
  `python -m spo_runtime train-job <dir>` (its own process, on the training device), notices
  trainers that died, and at start-up marks jobs left `running` by a dead server as `interrupted`
  and queues them again: they resume from their last checkpoint. It takes the trainer's environment
  and device from its caller; it reads no environment of its own.
- The trainer holds `<dir>/.lock` for its life (`JobStore.locked` tells whether a live one does) and
  checks for `<dir>/cancel` at round boundaries. `JobStore.resume` queues a failed, canceled or
  interrupted job again; it goes on from its last checkpoint.
- At most SPO_MAX_QUEUED_JOBS jobs wait, queued or interrupted: one more is refused
  (QueueFullError, HTTP 429 with Retry-After). A job's `output_adapter` must be free when it is created
  (no such file in the adapter directory, no waiting or running job of that name: AdapterExistsError).
- A trainer's environment (`trainer_env`) is the server's without SPO_ADMIN_TOKEN and SPO_API_TOKEN, and
  without HF_TOKEN unless it may fetch from the hub; its ranks talk over loopback only.
- A job has a kind (`KINDS`): "train" (SPO training) or "eval" (adapter evaluation,
  `evaluation.run_eval`). Both kinds share the records, the queue, the slots and the job process;
  `list`, `read` and `counts` take the kind a caller wants (a record without one is a training job).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Mapping, Sequence

from spo_runtime.errors import InvalidRequestError, JobNotFoundError, JobStateError, QueueFullError
from spo_runtime.fsutil import atomic_write, write_json_atomic

log = logging.getLogger("spo_runtime.jobs")

STATES = ("queued", "running", "completed", "failed", "canceled", "interrupted")
FINAL = ("completed", "failed", "canceled")
WAITING = ("queued", "interrupted")  # what SPO_MAX_QUEUED_JOBS counts
HUB_TOKENS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # only when the trainer may fetch from the hub
KINDS = {"train": "training", "eval": "evaluation"}  # a job's kind -> its name in messages
TRAINER_COMMAND = (sys.executable, "-m", "spo_runtime", "train-job")  # + <dir> --adapter-dir <dir> --parent-pid <pid>


class JobStore:
    """The job records under `data_dir`/jobs/<id>/ (job.json, prompts.txt, the trainer's files) and the
    adapter directory a completed job exports to. Any process may read and update them; updates of one
    record are serialised by a file lock."""

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

    def create(self, prompts: list[str], config: dict, start_adapter: str | None = None,
               output_adapter: str | None = None, max_queued: int | None = None, kind: str = "train", **fields) -> dict:
        """A new queued job of `kind` (KINDS); `fields` are added to its record. QueueFullError when `max_queued`
        jobs of any kind (SPO_MAX_QUEUED_JOBS; None: no cap) wait already; for a training job,
        AdapterExistsError when `output_adapter` names a file of the adapter directory or the adapter of
        another waiting or running job. Both are checked under one lock, so two submissions racing cannot
        both pass."""
        from spo_runtime.training.checkpoint import AdapterExistsError, check_adapter_free

        if kind not in KINDS:
            raise ValueError(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")
        job_id = uuid.uuid4().hex[:16]
        name = output_adapter or f"spo-{job_id[:8]}"
        with _flock(self.root / ".create.lock"):
            jobs = self.list()
            _check_queue(jobs, max_queued)
            if kind == "train":
                check_adapter_free(self.adapter_dir, name)
                if any(r.get("output_adapter") == name and r["state"] not in FINAL for r in jobs):
                    raise AdapterExistsError(f"{name!r} is the output adapter of a job that is waiting or running; "
                                             "pick another name")
            d = self.root / job_id
            d.mkdir(parents=True)
            atomic_write(d / "prompts.txt", ("\n".join(prompts) + "\n").encode())
            rec = {
                "job_id": job_id, "kind": kind, "state": "queued", "created_at": time.time(), "config": config,
                "prompts": len(prompts), "eta_s": None, "error": None, "history": [{"state": "queued", "at": time.time()}],
            }
            if kind == "train":
                rec.update({"start_adapter": start_adapter, "output_adapter": name, "round": 0, "total_rounds": None,
                            "pairs_kept": 0, "loss": None, "clamp_share": None})
            rec.update(fields)
            write_json_atomic(d / "job.json", rec)
        return rec

    def read(self, job_id: str, kind: str | None = None) -> dict:
        """The job's record; with `kind`, a job of another kind is not found (404 naming the kind)."""
        rec = json.loads((self.dir(job_id) / "job.json").read_text())
        if kind is not None and rec.get("kind", "train") != kind:
            raise JobNotFoundError(job_id, KINDS[kind])
        return rec

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

    def list(self, kind: str | None = None) -> list[dict]:
        """Every job's record (of `kind` when given), oldest first."""
        out = []
        for f in sorted(self.root.glob("*/job.json")):
            with contextlib.suppress(OSError, json.JSONDecodeError):
                rec = json.loads(f.read_text())
                if kind is None or rec.get("kind", "train") == kind:
                    out.append(rec)
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

    def resume(self, job_id: str, max_queued: int | None = None) -> dict:
        """Queue a failed, canceled or interrupted job again; its trainer resumes from the last checkpoint
        (a job that failed before its first checkpoint starts over). Refused for a queued, running or
        completed job."""
        d = self.dir(job_id)
        with _flock(self.root / ".create.lock"), _flock(d / ".resume.lock"):
            rec = self.read(job_id)
            if rec["state"] not in ("failed", "canceled", "interrupted"):
                raise JobStateError(f"job_id: the job is {rec['state']}; only a failed, canceled or interrupted job resumes")
            if rec["state"] != "interrupted":  # an interrupted job is counted already
                _check_queue(self.list(), max_queued, but=job_id)
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


def _check_queue(jobs: list[dict], max_queued: int | None, but: str | None = None) -> None:
    """QueueFullError when `max_queued` of `jobs` (other than `but`) wait already. Retry-After: the soonest
    a running job expects to finish (its ETA, 1 s..1 h), else 60 s."""
    if max_queued is None:
        return
    waiting = [r for r in jobs if r["state"] in WAITING and r["job_id"] != but]
    if len(waiting) < max_queued:
        return
    etas = [r["eta_s"] for r in jobs if r["state"] == "running" and isinstance(r.get("eta_s"), (int, float))]
    retry = min(3600.0, max(1.0, min(etas))) if etas else 60.0
    raise QueueFullError(f"SPO_MAX_QUEUED_JOBS: {len(waiting)} jobs wait already (training and evaluation, at "
                         f"most {max_queued}); retry after {retry:.0f} s", retry_after=retry)


@contextlib.contextmanager
def _flock(path: Path):
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def trainer_env(env: Mapping[str, str], config: Mapping) -> dict[str, str]:
    """The environment of a job's trainer (and so of its ranks): the server's `env` without the tokens of
    our routes (a trainer answers no request), without the hub's (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, and
    no implicit token from HF_HOME) unless it may fetch from the hub, and with the collectives of its
    ranks on loopback (`distributed.loopback_env`)."""
    from spo_runtime.training.distributed import SECRETS, loopback_env

    out = {k: v for k, v in env.items() if k not in SECRETS}
    if not _may_fetch(out, config):
        for k in HUB_TOKENS:
            out.pop(k, None)
        out["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
    out.update(loopback_env())
    return out


def _may_fetch(env: Mapping[str, str], config: Mapping) -> bool:
    """Whether a trainer may download from the Hugging Face hub: unless offline (HF_HUB_OFFLINE), when the
    preset is not tiny (its base, VAE and LoRA come from the hub or its cache) or when the job scores with
    the SPM without both local copies (SPO_SPM or config.spm_path, and SPO_SPM_TOKENIZER)."""
    if env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    spm_local = bool((config.get("spm_path") or env.get("SPO_SPM")) and env.get("SPO_SPM_TOKENIZER"))
    return env.get("SPO_MODEL", "auto").strip().lower() != "tiny" or (config.get("scorer", "spm") == "spm" and not spm_local)


class Supervisor:
    """Starts queued jobs in their own processes, at most `max_jobs` at once. Only the lock holder supervises.

    `env` is the trainer process's whole environment (its SPO_* settings included) less what
    `trainer_env` removes; `train_device`, when set, becomes the trainer's SPO_DEVICE. `command` starts
    a trainer; the job directory and `--adapter-dir DIR` are appended. `max_jobs`: default SPO_MAX_TRAIN_JOBS as `env` gives it (1)."""

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
        env = trainer_env(self.env, self.store.read(job_id).get("config") or {})
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

    def counts(self, kind: str | None = "train") -> dict[str, int]:
        """Jobs by state: training jobs (what spo_train_jobs reports), those of another kind, or all (None)."""
        out = {s: 0 for s in STATES}
        for r in self.store.list(kind):
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
