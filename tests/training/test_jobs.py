"""The job store and the supervisor: records on disk, real trainer processes, no server."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import wait_until
from spo_runtime.errors import InvalidRequestError
from spo_runtime.training.jobs import FINAL, JobNotFoundError, JobStore, Supervisor

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path):
    return JobStore(tmp_path / "data", tmp_path / "adapters")


def alive(pid: int) -> bool:
    """Running (a zombie has exited: it only waits for its new parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _open_files() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def test_create_read_update_list(store):
    a = store.create(["a fox", "an owl"], {"max_rounds": 3}, None, None)
    time.sleep(0.01)
    b = store.create(["a castle"], {}, "start.safetensors", "mine")
    assert a["state"] == "queued" and a["output_adapter"] == f"spo-{a['job_id'][:8]}" and a["prompts"] == 2
    assert b["output_adapter"] == "mine" and b["start_adapter"] == "start.safetensors"
    d = store.dir(a["job_id"])
    assert (d / "prompts.txt").read_text() == "a fox\nan owl\n"
    assert store.read(a["job_id"]) == a
    rec = store.update(a["job_id"], state="running", round=1)
    assert rec["state"] == "running" and rec["round"] == 1 and "updated_at" in rec
    rec = store.update(a["job_id"], round=2)  # no state change: no history entry
    rec = store.update(a["job_id"], state="failed", error="boom")
    assert [(h["state"], h.get("error")) for h in rec["history"]] == [("queued", None), ("running", None), ("failed", "boom")]
    assert store.read(a["job_id"]) == rec
    assert [r["job_id"] for r in store.list()] == [a["job_id"], b["job_id"]]  # by creation time
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_unknown_and_malformed_ids(store):
    with pytest.raises(JobNotFoundError):
        store.read("0123456789abcdef")
    with pytest.raises(JobNotFoundError):
        store.update("0123456789abcdef", state="failed")
    for bad in ("", "../jobs", "a/b", "x" * 65):
        with pytest.raises(InvalidRequestError):
            store.read(bad)


def test_cancel(store):
    q = store.create(["a"], {}, None, None)
    rec = store.cancel(q["job_id"])
    assert rec["state"] == "canceled" and "finished_at" in rec and (store.dir(q["job_id"]) / "cancel").exists()
    assert store.cancel(q["job_id"]) == store.read(q["job_id"])  # final: unchanged
    r = store.create(["a"], {}, None, None)
    store.update(r["job_id"], state="running")
    rec = store.cancel(r["job_id"])  # a running job stops at its next round boundary, by itself
    assert rec["state"] == "running" and (store.dir(r["job_id"]) / "cancel").exists()
    assert "canceled" in FINAL


def test_locked_sees_a_trainer_holding_the_job_lock(store):
    rec = store.create(["a"], {}, None, None)
    assert not store.locked(rec["job_id"])
    with open(store.dir(rec["job_id"]) / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert store.locked(rec["job_id"])
    assert not store.locked(rec["job_id"])


def _supervise(store, command, env=None, **kw):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")} if env is None else env
    return Supervisor(store, env=env, poll_s=0.05, command=command, **kw).start()


def test_a_trainer_that_exits_non_zero_fails_the_job_with_the_reason(store, monkeypatch):
    monkeypatch.setenv("SPO_TRAIN_DEVICE", "cuda:9")  # the supervisor reads no environment of its own
    probe = ("import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'device': os.environ.get('SPO_DEVICE'), "
             "'train_device': os.environ.get('SPO_TRAIN_DEVICE'), "
             "'given': os.environ.get('GIVEN')}), flush=True); sys.exit(3)")
    rec = store.create(["a"], {}, None, None)
    sup = _supervise(store, [sys.executable, "-c", probe], env={"PATH": os.environ["PATH"], "GIVEN": "yes"}, train_device="cpu")
    try:
        done = wait_until(lambda: (r := store.read(rec["job_id"]))["state"] == "failed" and r)
        wait_until(lambda: sup.proc is None)
    finally:
        sup.stop(grace_s=5)
    assert done["error"] == "the trainer process exited with code 3"
    assert [h["state"] for h in done["history"]] == ["queued", "running", "failed"]
    d = store.dir(rec["job_id"])
    seen = json.loads((d / "trainer.log").read_text())
    assert seen == {"argv": [str(d), "--adapter-dir", str(store.adapter_dir), "--parent-pid", str(os.getpid())],
                    "device": "cpu", "train_device": None, "given": "yes"}
    # the parent closed its copy of the log's descriptor after starting the trainer
    assert str(d / "trainer.log") not in _open_files()
    assert sup.counts()["failed"] == 1


def test_a_trainer_that_cannot_start_fails_the_job(store, tmp_path):
    rec = store.create(["a"], {}, None, None)
    sup = _supervise(store, [str(tmp_path / "no-such-program")])
    try:
        done = wait_until(lambda: (r := store.read(rec["job_id"]))["state"] == "failed" and r)
    finally:
        sup.stop(grace_s=5)
    assert done["error"].startswith("the trainer process could not start")


def test_recovery_interrupts_running_jobs_without_a_trainer_and_resumes_them(store):
    orphan = store.create(["a"], {}, None, None)
    store.update(orphan["job_id"], state="running")  # a dead server's job: nobody holds its lock
    live = store.create(["b"], {}, None, None)
    store.update(live["job_id"], state="running")
    queued = store.create(["c"], {}, None, None)
    with open(store.dir(live["job_id"]) / ".lock", "a") as fh:  # a trainer that outlived its server
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        sup = _supervise(store, [sys.executable, "-c", "import sys; sys.exit(0)"])
        try:
            # the interrupted job starts first, then the queued one; both trainers exit without an outcome
            wait_until(lambda: all(store.read(j["job_id"])["state"] == "failed" for j in (orphan, queued)))
        finally:
            sup.stop(grace_s=5)
        rec = store.read(orphan["job_id"])
        assert [h["state"] for h in rec["history"]] == ["queued", "running", "interrupted", "running", "failed"]
        assert rec["interruptions"] == 1
        assert store.read(queued["job_id"])["started_at"] > rec["started_at"]
        assert store.read(live["job_id"])["state"] == "running"  # its trainer lives: left alone


def test_only_one_supervisor_supervises(store):
    rec = store.create(["a"], {}, None, None)
    cmd = [sys.executable, "-c", "import time; time.sleep(30)"]
    first, second = _supervise(store, cmd), _supervise(store, cmd)
    try:
        wait_until(lambda: store.read(rec["job_id"])["state"] == "running")
        time.sleep(0.3)
        assert first.owner != second.owner and (first.proc is None) != (second.proc is None)
    finally:
        first.stop(grace_s=5)
        second.stop(grace_s=5)


# -- the trainer dies with its server -------------------------------------------------------------

PARENT = textwrap.dedent("""
    import json, sys, time
    from spo_runtime.training.jobs import JobStore, Supervisor
    store = JobStore(sys.argv[1], sys.argv[2])
    sup = Supervisor(store, env=json.loads(sys.argv[3]), poll_s=0.05).start()
    while sup.proc is None:
        time.sleep(0.01)
    print(sup.proc.pid, flush=True)
    time.sleep(600)
""")


def _server_with_a_trainer(store, tmp_path, tiny_dir):
    """A stand-in server process: a Supervisor starting the real `train-job` on the tiny model."""
    env = {**os.environ, "SPO_MODEL": "tiny", "SPO_BASE_MODEL": str(tiny_dir), "SPO_DEVICE": "cpu",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    config = {"max_rounds": 1000, "num_inference_steps": 4, "width": 32, "height": 32, "scorer": "brightness",
              "rank": 2, "alpha": 2, "targets": ["to_q"], "prompts_per_round": 1, "chunk": 1, "train_t_max": 999}
    rec = store.create(["a fox"], config, None, None)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(store.root.parent), str(store.adapter_dir), json.dumps(env)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)
    trainer = int(parent.stdout.readline())
    return rec, parent, trainer


def _kill(parent):
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)


@pytest.mark.slow
def test_the_trainer_dies_when_its_server_is_killed(store, tmp_path, tiny_dir):
    rec, parent, trainer = _server_with_a_trainer(store, tmp_path, tiny_dir)
    try:
        # wait until the trainer is training (its pipeline is loaded: well past its death-signal set-up)
        wait_until(lambda: store.read(rec["job_id"]).get("total_rounds"), timeout=180, every=0.2)
        assert alive(trainer)
        _kill(parent)
        t0 = time.time()
        wait_until(lambda: not alive(trainer), timeout=5)
        print(f"trainer gone {time.time() - t0:.2f}s after its server was killed")
    finally:
        if parent.poll() is None:
            _kill(parent)
        if alive(trainer):
            os.kill(trainer, signal.SIGKILL)


@pytest.mark.slow
def test_a_trainer_whose_server_died_before_it_started_exits(store, tmp_path, tiny_dir):
    """The race: the server dies between starting the trainer and its death-signal request."""
    rec, parent, trainer = _server_with_a_trainer(store, tmp_path, tiny_dir)
    try:
        _kill(parent)  # the trainer is still importing torch at this point
        wait_until(lambda: not alive(trainer), timeout=120, every=0.2)
    finally:
        if alive(trainer):
            os.kill(trainer, signal.SIGKILL)
    log = (store.dir(rec["job_id"]) / "trainer.log").read_text()
    assert "is gone: not training" in log, log
    assert store.read(rec["job_id"]).get("total_rounds") is None  # it never started training
