"""Training over HTTP against the real `bentoml serve`: submit, poll, get, load, generate, cancel,
kill and restart the server mid-job, and /generate answering while a job runs. The first test runs on
tests/server.py's standard server (the adapter it trains is unloaded after it); the second stops, kills
and restarts servers of its own."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from server import ADMIN_AUTH, ADMIN_TOKEN, API_AUTH, Server

pytestmark = pytest.mark.server
TOKEN = ADMIN_TOKEN  # the standard server's, and this module's own servers'
AUTH = ADMIN_AUTH
CONFIG = {"scorer": "brightness", "num_inference_steps": 6, "chunk": 1, "train_t_max": 999, "threshold": 0.0, "rank": 4,
          "alpha": 4, "lr": 0.003, "width": 32, "height": 32, "prompts_per_round": 2, "micro_batch": 8, "grad_accum": 1,
          "targets": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "conv1"], "checkpoint_every": 1}
PROMPTS = ["a fox", "a castle", "an owl", "a red car"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-srv")
    return {"SPO_DATA_DIR": str(root / "data"), "SPO_ADAPTER_DIR": str(root / "adapters"), "SPO_ADMIN_TOKEN": TOKEN,
            "SPO_TORCH_THREADS": "1"}


def submit(s, **kw):
    return httpx.post(s.url + "/train/submit", json={"prompts": PROMPTS, **kw}, headers=AUTH, timeout=30)


def status(s, job_id):
    r = httpx.get(s.url + "/train/status", params={"job_id": job_id}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(s, job_id, cond, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        rec = status(s, job_id)
        if cond(rec):
            return rec
        if rec["state"] == "failed":
            raise AssertionError(rec)
        time.sleep(0.3)
    raise TimeoutError(status(s, job_id))


@contextlib.contextmanager
def borrowed(server):
    """The shared standard server for one test, given back as found: the adapter "mine" unloaded."""
    try:
        yield server
    finally:
        httpx.post(server.url + "/admin/adapters/unload", json={"name": "mine"}, headers=AUTH, timeout=60)


def png(resp):
    assert resp.status_code == 200, resp.text
    return np.asarray(Image.open(io.BytesIO(resp.content)), dtype=np.int16)


def test_submit_poll_get_load_generate_and_cancel(standard_server):
    with borrowed(standard_server) as s:
        counts = httpx.get(s.url + "/train/list", headers=AUTH).json()["counts"]  # the jobs other tests left
        # validation and protection first
        assert httpx.post(s.url + "/train/submit", json={"prompts": PROMPTS}).status_code == 401
        r = httpx.post(s.url + "/train/submit", json={"prompts": []}, headers=AUTH)
        assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["prompts"]
        r = submit(s, config={"lr": -1})
        assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["config.lr"]
        r = httpx.post(s.url + "/train/submit", json={"prompts": ["ok", "  "]}, headers=AUTH)
        assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["prompts[1]"]
        r = httpx.post(s.url + "/train/submit", json={"prompts_file": "../../etc/passwd"}, headers=AUTH)
        assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["prompts_file"]
        assert httpx.get(s.url + "/train/status", params={"job_id": "feedbeef"}, headers=AUTH).status_code == 404

        job = submit(s, config={**CONFIG, "max_rounds": 3}, output_adapter="mine").json()
        # its data-parallel shape: one rank on CPU, 8 pairs per step (micro-batch 8 x accumulation 1)
        assert (job["world_size"], job["pairs_per_step"], job["micro_batch"], job["grad_accum"]) == (1, 8, 8, 1)
        latencies = []
        stop = threading.Event()

        def keep_generating():  # /generate keeps answering while the trainer runs
            while not stop.is_set():
                t = time.time()
                r = httpx.post(s.url + "/generate", json={"prompt": "a lighthouse", "seed": 1, "num_inference_steps": 4},
                               headers=API_AUTH, timeout=60)
                latencies.append((r.status_code, time.time() - t))

        gen = threading.Thread(target=keep_generating)
        gen.start()
        try:
            rec = wait_for(s, job["job_id"], lambda r: r["state"] == "completed")
        finally:
            stop.set()
            gen.join()
        assert latencies and all(code == 200 for code, _ in latencies)
        lat = sorted(t for _, t in latencies)
        print(f"/generate during training: {len(lat)} requests, p50 {lat[len(lat) // 2] * 1e3:.0f} ms, max {lat[-1] * 1e3:.0f} ms")
        assert rec["round"] == 3 and rec["pairs_kept"] > 0 and rec["loss"] is not None
        assert rec["world_size"] == 1 and rec["pairs_per_step"] == 8 and rec["pairs_per_s"] > 0
        assert [h["state"] for h in rec["history"]] == ["queued", "running", "completed"]

        got = httpx.get(s.url + "/train/get", params={"job_id": job["job_id"]}, headers=AUTH).json()
        assert got["adapter"] == "mine" and set(got["files"]) == {"webui", "diffusers"} and got["metrics"]["rounds"] == 3
        r = httpx.post(s.url + "/admin/adapters/load", json={"name": "mine", "file": got["files"]["webui"]}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["sha256"] == got["sha256"]["webui"]
        body = {"prompt": "a fox", "seed": 7, "num_inference_steps": 4}
        ours = httpx.post(s.url + "/generate", json={**body, "adapter": "mine"}, headers=API_AUTH)
        base = httpx.post(s.url + "/generate", json={**body, "adapter": "spo"}, headers=API_AUTH)
        assert ours.headers["x-adapter"] == "mine" and ours.headers["x-adapter-sha256"] == got["sha256"]["webui"][:16]
        assert np.abs(png(ours) - png(base)).max() > 0

        # a job whose trainer fails (a broken starting adapter) is failed with its reason; serving goes on
        from pathlib import Path

        Path(s.env["SPO_ADAPTER_DIR"], "broken.safetensors").write_bytes(b"not a safetensors file")
        bad = submit(s, config={**CONFIG, "max_rounds": 2}, start_adapter="broken.safetensors").json()
        t0 = time.time()
        while status(s, bad["job_id"])["state"] not in ("failed", "completed") and time.time() - t0 < 120:
            time.sleep(0.3)
        rec = status(s, bad["job_id"])
        assert rec["state"] == "failed" and "LoraFormatError" in rec["error"], rec
        assert httpx.post(s.url + "/generate", json={"prompt": "still here", "num_inference_steps": 2},
                          headers=API_AUTH).status_code == 200

        # cancel a second job: it stops at a round boundary and keeps its last checkpoint
        second = submit(s, config={**CONFIG, "max_rounds": 200}).json()
        wait_for(s, second["job_id"], lambda r: r["state"] == "running" and r["round"] >= 1)
        assert httpx.post(s.url + "/train/cancel", json={"job_id": second["job_id"]}, headers=AUTH).status_code == 200
        rec = wait_for(s, second["job_id"], lambda r: r["state"] == "canceled")
        ckpt = json.loads(open(f"{s.env['SPO_DATA_DIR']}/jobs/{second['job_id']}/run/checkpoints/latest.json").read())
        assert ckpt["round"] >= 1 and rec["round"] >= 1
        listed = httpx.get(s.url + "/train/list", headers=AUTH).json()
        assert [listed["counts"][k] - counts[k] for k in ("completed", "canceled", "failed")] == [1, 1, 1], (counts, listed)
        m = s.metrics()
        assert m['spo_train_jobs{state="completed"}'] == counts["completed"] + 1 and m.get("spo_train_round_seconds_count", 0) >= 3

        # /train/resume: a canceled job is queued again and goes on from its checkpoint; a completed one cannot
        r = httpx.post(s.url + "/train/resume", json={"job_id": job["job_id"]}, headers=AUTH)
        assert r.status_code == 409 and r.json()["detail"][0]["loc"] == ["job_id"], r.text
        r = httpx.post(s.url + "/train/resume", json={"job_id": second["job_id"]}, headers=AUTH)
        assert r.status_code == 200 and r.json()["state"] == "queued", r.text
        rec = wait_for(s, second["job_id"], lambda r: r["state"] == "running" and r.get("resumed_from_round") == ckpt["round"])
        assert httpx.post(s.url + "/train/cancel", json={"job_id": second["job_id"]}, headers=AUTH).status_code == 200
        rec = wait_for(s, second["job_id"], lambda r: r["state"] == "canceled")
        assert rec["round"] >= ckpt["round"] and rec["resumes"] == 1


def test_stopped_and_killed_server_jobs_are_interrupted_and_resume(dirs, tmp_path):
    s = Server(dirs, tmp_path / "b.log").start()
    try:
        job = submit(s, config={**CONFIG, "max_rounds": 14}).json()
        wait_for(s, job["job_id"], lambda r: r["state"] == "running" and r["round"] >= 2)
    finally:
        s.stop(signal.SIGTERM)  # graceful: the trainer checkpoints at its round boundary
    d = f"{dirs['SPO_DATA_DIR']}/jobs/{job['job_id']}"
    rec = json.loads(open(f"{d}/job.json").read())
    ckpt = json.loads(open(f"{d}/run/checkpoints/latest.json").read())
    assert rec["state"] == "interrupted" and ckpt["round"] == rec["round"] >= 2  # nothing lost

    s2 = Server(dirs, tmp_path / "c.log").start()
    try:
        rec = wait_for(s2, job["job_id"], lambda r: r["state"] == "running" and r["round"] >= ckpt["round"] + 2)
        assert rec["resumed_from_round"] == ckpt["round"]
    finally:
        s2.stop(signal.SIGKILL)  # every process, trainer included: the current round is lost
    s3 = Server(dirs, tmp_path / "d.log").start()
    try:
        rec = wait_for(s3, job["job_id"], lambda r: r["state"] == "completed", timeout=240)
        states = [h["state"] for h in rec["history"]]
        assert states.count("interrupted") == 2 and states[-1] == "completed", states
        assert rec["resumed_from_round"] >= ckpt["round"] + 1 and rec["round"] == 14 and rec["interruptions"] == 2
    finally:
        s3.stop()
