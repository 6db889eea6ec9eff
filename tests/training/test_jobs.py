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
from spo_runtime.training.jobs import FINAL, JobNotFoundError, JobStore, Supervisor, trainer_env

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


def test_queued_jobs_are_capped_and_an_output_adapter_is_never_taken_twice(store):
    from spo_runtime.errors import QueueFullError
    from spo_runtime.training.checkpoint import AdapterExistsError

    store.adapter_dir.mkdir(parents=True)
    (store.adapter_dir / "taken.safetensors").write_bytes(b"x")
    (store.adapter_dir / "old_webui.safetensors").write_bytes(b"x")
    for name in ("taken", "old"):
        with pytest.raises(AdapterExistsError, match=f"'{name}' is taken"):
            store.create(["a"], {}, None, name)
    first = store.create(["a"], {}, None, "mine", max_queued=2)
    with pytest.raises(AdapterExistsError, match="a job that is waiting or running"):
        store.create(["a"], {}, None, "mine", max_queued=2)
    running = store.create(["b"], {}, None, None, max_queued=2)
    store.update(running["job_id"], state="running", eta_s=42.4)
    store.create(["c"], {}, None, None, max_queued=2)
    with pytest.raises(QueueFullError, match="SPO_MAX_QUEUED_JOBS: 2 jobs wait already") as e:
        store.create(["d"], {}, None, None, max_queued=2)
    assert e.value.retry_after == 42.4  # the running job's ETA
    store.update(first["job_id"], state="interrupted")  # waiting too: it resumes at the next start
    with pytest.raises(QueueFullError):
        store.create(["d"], {}, None, None, max_queued=2)
    store.update(first["job_id"], state="canceled")
    assert store.create(["d"], {}, None, "mine", max_queued=2)["output_adapter"] == "mine"  # canceled: free again
    with pytest.raises(QueueFullError):  # resuming is queueing too
        store.resume(first["job_id"], max_queued=2)
    assert len(store.list()) == 4 and store.create(["e"], {}, None, None)["state"] == "queued"  # no cap given


def test_exports_never_replace_a_file_even_when_two_jobs_race(tmp_path):
    import threading

    import torch

    from spo_runtime.fsutil import file_sha256
    from spo_runtime.lora.format import LoraModuleWeights
    from spo_runtime.training.checkpoint import AdapterExistsError, export_adapter
    from spo_runtime.training.config import TrainConfig

    def modules(value):
        return {"down_blocks.0.attn.to_q": LoraModuleWeights("down_blocks.0.attn.to_q", torch.full((2, 8), value),
                                                              torch.full((8, 2), value), 2.0)}

    adapters = tmp_path / "adapters"
    out = export_adapter(adapters, "mine", modules(1.0), TrainConfig(), 3)
    assert out["files"] == {"diffusers": "mine_diffusers.safetensors", "webui": "mine_webui.safetensors"}
    before = {f: file_sha256(adapters / f) for f in out["files"].values()}
    assert export_adapter(adapters, "mine", modules(1.0), TrainConfig(), 3) == out  # the same bytes again: a no-op
    with pytest.raises(AdapterExistsError, match="'mine' is taken: mine_diffusers.safetensors, mine_webui.safetensors"):
        export_adapter(adapters, "mine", modules(2.0), TrainConfig(), 4)
    assert {f: file_sha256(adapters / f) for f in before} == before
    (adapters / "gone_diffusers.safetensors").symlink_to(tmp_path / "nowhere")  # even a dangling link is kept
    with pytest.raises(AdapterExistsError):
        export_adapter(adapters, "gone", modules(2.0), TrainConfig(), 4)
    assert not (adapters / "gone_webui.safetensors").exists()
    # two jobs exporting one name at once: one wins, whole; the other fails and leaves nothing of its own
    results, barrier = {}, threading.Barrier(2)

    def job(value):
        barrier.wait()
        try:
            results[value] = export_adapter(adapters, "race", modules(value), TrainConfig(), 5)
        except AdapterExistsError as e:
            results[value] = e

    threads = [threading.Thread(target=job, args=(v,)) for v in (5.0, 6.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [v for v, r in results.items() if isinstance(r, dict)]
    assert len(won) == 1 and isinstance(results[11.0 - won[0]], AdapterExistsError), results
    assert {layout: file_sha256(adapters / rel) for layout, rel in results[won[0]]["files"].items()} == results[won[0]]["sha256"]
    assert not [p.name for p in adapters.iterdir() if p.name.startswith(".")]  # no temp file left


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


def _environ(pid: int) -> dict[str, str]:
    """A process's environment as the kernel holds it (what it was started with)."""
    with open(f"/proc/{pid}/environ", "rb") as fh:
        return dict(kv.split("=", 1) for kv in fh.read().decode().split("\0") if "=" in kv)


def test_a_trainer_gets_no_tokens_and_loopback_collectives(store):
    """The trainer's real environment (/proc/<pid>/environ): no token of our routes ever; the hub's only
    for a job that may fetch from the hub (here: the SPM, not local, while the server is online)."""
    secrets = {"SPO_ADMIN_TOKEN": "admin-secret-0123456789", "SPO_API_TOKEN": "api-secret-0123456789",
               "HF_TOKEN": "hf_secret0123", "HUGGING_FACE_HUB_TOKEN": "hf_legacy0123"}
    env = {"PATH": os.environ["PATH"], "SPO_MODEL": "tiny", "GIVEN": "yes", "MASTER_ADDR": "10.1.2.3",
           "GLOO_SOCKET_IFNAME": "eth0", **secrets}
    offline = store.create(["a"], {"scorer": "brightness"}, None, None)
    fetches = store.create(["b"], {}, None, None)  # scorer spm, no SPO_SPM: its trainer downloads the SPM
    sup = _supervise(store, [sys.executable, "-c", "import time; time.sleep(60)"], env=env, max_jobs=2)
    try:
        wait_until(lambda: len(sup.running) == 2)
        seen = {job: _environ(proc.pid) for job, proc in sup.running.items()}
    finally:
        sup.stop(grace_s=5)
    for job, hub in ((offline["job_id"], False), (fetches["job_id"], True)):
        e = seen[job]
        assert e["GIVEN"] == "yes" and e["SPO_MODEL"] == "tiny"
        assert "SPO_ADMIN_TOKEN" not in e and "SPO_API_TOKEN" not in e
        assert not any(v in kv for kv in e.items() for v in (secrets["SPO_ADMIN_TOKEN"], secrets["SPO_API_TOKEN"]))
        assert (e.get("HF_TOKEN"), e.get("HUGGING_FACE_HUB_TOKEN")) == ((secrets["HF_TOKEN"], secrets["HUGGING_FACE_HUB_TOKEN"])
                                                                        if hub else (None, None))
        assert ("HF_HUB_DISABLE_IMPLICIT_TOKEN" in e) != hub  # nor the token a login left in HF_HOME
        assert e["MASTER_ADDR"] == "127.0.0.1" and e["GLOO_SOCKET_IFNAME"] == "lo" and e["NCCL_SOCKET_IFNAME"] == "lo"
    # offline, nothing is fetched: the hub's token stays behind too
    assert "HF_TOKEN" not in trainer_env({**env, "SPO_MODEL": "sdxl-spo", "HF_HUB_OFFLINE": "1"}, {})


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
