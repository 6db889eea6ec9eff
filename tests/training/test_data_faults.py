"""Damaged data never stops the server: a damaged admin_state.json, an adapter file changed under a loaded
adapter, a full disk while a checkpoint is written, a damaged checkpoint on resume; and
SPO_MAX_TRAIN_JOBS. Files, the tiny trainer and a stand-in trainer command; no server."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time

import pytest

from spo_runtime import Settings, load_pipeline
from spo_runtime.faults import Faults
from spo_runtime.training.job_process import run_job
from spo_runtime.training.jobs import JobStore, Supervisor
from spo_runtime.fsutil import file_sha256
from spo_runtime.state import EMPTY, AdminStore, AdminSync, file_state
from spo_runtime.training.checkpoint import CheckpointCorruptError, CheckpointWriteError
from spo_runtime.training.config import TrainConfig
from spo_runtime.training.trainer import JobCancelled, SPOTrainer

# a tiny job: 32x32, 2 DDIM steps in one chunk, rank 2 on to_q: a round takes about 0.4 s on one core
SMALL = dict(rank=2, alpha=2, num_inference_steps=2, chunk=2, train_t_max=999, threshold=0.0, targets=["to_q"],
             prompts_per_round=1, micro_batch=8, grad_accum=1, checkpoint_every=1, width=32, height=32,
             scorer="brightness")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for the module


# -- admin_state.json -----------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'{"version": "x"}',
                                     b'{"adapters": {"a": 3}}', b'{"default_lora_scale": 9}'])
def test_a_damaged_admin_state_at_start_is_kept_aside_and_defaults_apply(tmp_path, caplog, content):
    data = tmp_path / "data"
    data.mkdir()
    (data / "admin_state.json").write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="spo_runtime.state"):
        store = AdminStore(data, tmp_path / "adapters")
    assert store.quarantined == data / "admin_state.json.corrupt"
    assert store.quarantined.read_bytes() == content and not store.path.exists()
    assert store.read() == EMPTY and store.version() == 0
    assert "damaged" in caplog.text and "admin_state.json.corrupt" in caplog.text
    # a second damaged file never overwrites the first one kept
    store.path.write_bytes(b"{also bad")
    assert AdminStore(data, tmp_path / "adapters").quarantined == data / "admin_state.json.corrupt.1"
    assert store.quarantined.read_bytes() == content
    assert store.mutate(lambda s: s.update(default_lora_scale=0.5))["version"] == 1


def test_a_valid_admin_state_is_left_alone(tmp_path):
    store = AdminStore(tmp_path / "d", tmp_path / "a")
    store.mutate(lambda s: s.update(default_lora_scale=0.25))
    again = AdminStore(tmp_path / "d", tmp_path / "a")
    assert again.quarantined is None and again.read()["default_lora_scale"] == 0.25


def test_damage_while_running_keeps_the_applied_settings(tmp_path, tiny_dir):
    pipe = load_pipeline(Settings(model="tiny", base_model=str(tiny_dir)))
    store = AdminStore(tmp_path / "d", tmp_path / "a")
    sync = AdminSync(pipe, store)
    store.mutate(lambda s: s.update(default_lora_scale=0.5))
    sync.poll()
    assert pipe.default_lora_scale == 0.5 and list(pipe.registry.adapters) == ["spo"]
    time.sleep(0.01)
    store.path.write_text('{"version": 7, "adapters": []}')  # damaged by hand while the server runs
    sync.poll()
    assert pipe.default_lora_scale == 0.5 and list(pipe.registry.adapters) == ["spo"]
    assert "adapters" in sync.errors["admin_state"]
    store.mutate(lambda s: s.update(default_lora_scale=0.75))  # the next change moves the bad file aside
    sync.poll()
    assert pipe.default_lora_scale == 0.75 and "admin_state" not in sync.errors
    assert (store.data_dir / "admin_state.json.corrupt").exists()


def test_file_state_of_a_loaded_adapter(tmp_path):
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"one")
    sha = file_sha256(f)
    assert file_state(str(f), sha) == "unchanged"
    f.write_bytes(b"two!")
    assert file_state(str(f), sha) == "changed"
    f.unlink()
    assert file_state(str(f), sha) == "missing"
    assert file_state("built-in", sha) is None and file_state(None, None) is None


# -- training checkpoints -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tpipe(tiny_dir):
    """One unfused pipeline for every trainer of this module (each trainer replaces its adapters)."""
    return load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora_fuse=False))


def _trainer(pipe, out, faults=None, **cfg):
    return SPOTrainer(pipe, TrainConfig(**{**SMALL, **cfg}), ["a fox", "an owl"], out, faults=Faults.parse(faults))


@pytest.fixture(scope="module")
def one_round(tpipe, tmp_path_factory):
    """A run directory holding the checkpoint of round 1."""
    out = tmp_path_factory.mktemp("one-round") / "run"
    _trainer(tpipe, out, max_rounds=1).train()
    return out


def test_enospc_while_checkpointing_keeps_the_previous_checkpoint(tpipe, tmp_path):
    tr = _trainer(tpipe, tmp_path / "run", "enospc_checkpoint:round=2", max_rounds=3)
    with pytest.raises(CheckpointWriteError, match=r"round 2 failed \(No space left on device.*previous checkpoint \(round-000001\) is intact"):
        tr.train()
    ckpts = tmp_path / "run" / "checkpoints"
    latest = json.loads((ckpts / "latest.json").read_text())
    assert latest["round"] == 1 and latest["dir"] == "round-000001"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest.json", "round-000001"]  # no half-written dir
    d = ckpts / "round-000001"
    for key, name in (("diffusers", "lora_diffusers.safetensors"), ("webui", "lora_webui.safetensors"), ("checkpoint", "checkpoint.pt")):
        assert file_sha256(d / name) == latest["hashes"][key]
    again = _trainer(tpipe, tmp_path / "run", max_rounds=3)
    assert again.load_checkpoint() and again.round == 1  # and it resumes from it


@pytest.mark.parametrize("damage", ["truncate_state", "flip_lora", "latest_json", "missing_dir"])
def test_a_damaged_checkpoint_refuses_to_resume_with_a_clear_error(tpipe, one_round, tmp_path, damage):
    shutil.copytree(one_round, tmp_path / "run")
    assert _trainer(tpipe, tmp_path / "run", max_rounds=2).load_checkpoint()  # whole, it resumes
    ckpts = tmp_path / "run" / "checkpoints"
    d = ckpts / "round-000001"
    if damage == "truncate_state":
        (d / "checkpoint.pt").write_bytes((d / "checkpoint.pt").read_bytes()[:100])
        where = "checkpoint.pt"
    elif damage == "flip_lora":
        raw = bytearray((d / "lora_diffusers.safetensors").read_bytes())
        raw[-1] ^= 0xFF
        (d / "lora_diffusers.safetensors").write_bytes(bytes(raw))
        where = "lora_diffusers.safetensors is damaged: its sha256 differs"
    elif damage == "latest_json":
        (ckpts / "latest.json").write_text('{"round": 1,')
        where = "latest.json is damaged"
    else:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
        where = "lora_diffusers.safetensors"
    with pytest.raises(CheckpointCorruptError, match="cannot resume from the checkpoint") as e:
        _trainer(tpipe, tmp_path / "run", max_rounds=2).load_checkpoint()
    assert where in str(e.value) and "to train again from round 0" in str(e.value)


# a trainer in a process of its own, killed by SPO_FAULTS: argv = run dir, config JSON, tiny dir, faults
KILLED_TRAINER = """
import json, sys
from spo_runtime import Settings, load_pipeline
from spo_runtime.faults import Faults
from spo_runtime.training.config import TrainConfig
from spo_runtime.training.trainer import JobCancelled, SPOTrainer
pipe = load_pipeline(Settings(model="tiny", base_model=sys.argv[3], lora_fuse=False, torch_threads=1))
tr = SPOTrainer(pipe, TrainConfig(**json.loads(sys.argv[2])), ["a fox", "an owl"], sys.argv[1], faults=Faults.parse(sys.argv[4]))
tr.load_checkpoint()
tr.train(should_stop=lambda: tr.round == 2)  # a stop right after the periodic checkpoint of round 2
"""


def _rounds(run) -> list[int]:
    return [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_kill_while_saving_a_round_again_keeps_its_previous_checkpoint(tpipe, tmp_path, tiny_dir):
    """A stop right after a periodic checkpoint saves round 2 a second time; SIGKILL just before that second
    checkpoint is put in place: round 2's first one must still be there for the resume."""
    import subprocess

    run = tmp_path / "run"
    cfg = {**SMALL, "checkpoint_every": 2, "max_rounds": 4}
    proc = subprocess.run([sys.executable, "-c", KILLED_TRAINER, str(run), json.dumps(cfg), str(tiny_dir),
                           "kill_checkpoint:round=2:write=2"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert _rounds(run) == [1, 2]
    again = _trainer(tpipe, run, checkpoint_every=2, max_rounds=4)
    assert again.load_checkpoint() and again.round == 2 and again.position == 2
    # a stop right after the resume saves round 2 again; then only one copy of it is kept
    with pytest.raises(JobCancelled):
        again.train(should_stop=lambda: True)
    ckpts = run / "checkpoints"
    assert json.loads((ckpts / "latest.json").read_text())["round"] == 2
    assert len([p for p in ckpts.iterdir() if p.name.startswith("round-")]) == 1
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # no temp left
    final = _trainer(tpipe, run, checkpoint_every=2, max_rounds=4)
    assert final.load_checkpoint() and final.round == 2
    final.train()
    assert final.round == 4 and _rounds(run) == [1, 2, 3, 4]


def test_resume_falls_back_to_the_newest_complete_checkpoint(tpipe, one_round, tmp_path):
    """latest.json naming a directory a crash took away: the newest whole checkpoint is resumed from."""
    run = tmp_path / "run"
    shutil.copytree(one_round, run)
    tr = _trainer(tpipe, run, max_rounds=2)
    assert tr.load_checkpoint() and tr.round == 1
    tr.train()
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest.json", "round-000001", "round-000002"]
    shutil.rmtree(ckpts / "round-000002")  # what a kill between removing and renaming left
    again = _trainer(tpipe, run, max_rounds=2)
    assert again.load_checkpoint() and again.round == 1 and again.position == 1
    # and a directory whose latest.json was never written (a kill after its rename) is the newest one
    again.train()
    (ckpts / "latest.json").write_text(json.dumps({"round": 1, "dir": "round-000001", "hashes": {}}))
    third = _trainer(tpipe, run, max_rounds=3)
    assert third.load_checkpoint() and third.round == 2


def test_metrics_rounds_re_run_after_a_resume_are_counted_once(tpipe, tmp_path):
    run = tmp_path / "run"

    def crash(stats):  # the trainer dies after round 3 was logged, before it was checkpointed
        if stats["round"] == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        _trainer(tpipe, run, checkpoint_every=2, max_rounds=4).train(on_round=crash)
    assert _rounds(run) == [1, 2, 3]
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 4, "pairs_ke')  # and a line torn by the kill
    again = _trainer(tpipe, run, checkpoint_every=2, max_rounds=4)
    assert again.load_checkpoint() and again.round == 2
    again.train()
    assert _rounds(run) == [1, 2, 3, 4]


def _job(tmp_path, tiny_dir, monkeypatch, config, faults=None):
    """A job record and its trainer's environment; run_job runs in this process (signals restored)."""
    for k, v in {"SPO_MODEL": "tiny", "SPO_BASE_MODEL": str(tiny_dir), "SPO_DEVICE": "cpu", "SPO_TORCH_THREADS": "1"}.items():
        monkeypatch.setenv(k, v)
    if faults:
        monkeypatch.setenv("SPO_FAULTS", faults)
    store = JobStore(tmp_path / "data", tmp_path / "adapters")
    rec = store.create(["a fox", "an owl"], config, None, "mine")
    return store, rec


@pytest.fixture
def keep_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_a_job_fails_with_the_reason_on_enospc_and_on_a_damaged_checkpoint(tmp_path, tiny_dir, monkeypatch, keep_signals):
    cfg = {**SMALL, "max_rounds": 2}
    store, rec = _job(tmp_path, tiny_dir, monkeypatch, cfg, "enospc_checkpoint:round=2")
    d = store.dir(rec["job_id"])
    assert run_job(d, store.adapter_dir) == 1
    done = store.read(rec["job_id"])
    assert done["state"] == "failed" and done["error"].startswith("CheckpointWriteError: writing the checkpoint of round 2 failed")
    assert "No space left on device" in done["error"] and "(round-000001) is intact" in done["error"]
    # the server restarts; the job is queued again and resumes from round 1 -- whose state is now damaged
    monkeypatch.delenv("SPO_FAULTS")
    (d / "run" / "checkpoints" / "round-000001" / "checkpoint.pt").write_bytes(b"garbage")
    store.update(rec["job_id"], state="running")
    assert run_job(d, store.adapter_dir) == 1
    again = store.read(rec["job_id"])
    assert again["state"] == "failed" and again["error"].startswith("CheckpointCorruptError: cannot resume from the checkpoint")
    assert "checkpoint.pt is damaged" in again["error"]


# -- SPO_MAX_TRAIN_JOBS ---------------------------------------------------------------------------


def test_max_train_jobs_run_at_once_and_the_rest_wait_queued(tmp_path):
    store = JobStore(tmp_path / "data", tmp_path / "adapters")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SPO_MAX_TRAIN_JOBS": "2"}
    assert Supervisor(store, env={}).max_jobs == 1  # the default
    jobs = [store.create([f"p{i}"], {}, None, None) for i in range(3)]
    # a stand-in trainer that runs until its job directory holds a `go` file, then exits 0 with an outcome,
    # replacing job.json atomically as the real trainer does (a reader never sees it half-written)
    trainer = ("import json, os, pathlib, sys, time; d = pathlib.Path(sys.argv[1])\n"
               "while not (d / 'go').exists(): time.sleep(0.02)\n"
               "r = json.loads((d / 'job.json').read_text()); r['state'] = 'completed'\n"
               "(d / 'job.json.tmp').write_text(json.dumps(r)); os.replace(d / 'job.json.tmp', d / 'job.json')")
    sup = Supervisor(store, env=env, poll_s=0.05, command=[sys.executable, "-c", trainer]).start()
    try:
        assert sup.max_jobs == 2
        states = lambda: [store.read(j["job_id"])["state"] for j in jobs]  # noqa: E731
        _wait(lambda: states() == ["running", "running", "queued"])
        time.sleep(0.3)
        assert states() == ["running", "running", "queued"] and len(sup.running) == 2  # the third waits
        (store.dir(jobs[0]["job_id"]) / "go").touch()
        _wait(lambda: states() == ["completed", "running", "running"])
        for j in jobs[1:]:
            (store.dir(j["job_id"]) / "go").touch()
        _wait(lambda: states() == ["completed"] * 3 and not sup.running)
    finally:
        sup.stop(grace_s=5)


def _wait(cond, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("not true in time")
