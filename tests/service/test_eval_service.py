"""Adapter evaluation over HTTP against the real `bentoml serve` (tests/server.py's standard server): the
door's refusals naming the field, a job run by the server's job process, its report checked against what
/generate answers for the same requests (images within 1/255, every pair's outcome), the contact sheet,
cancel and resume. The adapter it loads is unloaded after it."""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import darkening_adapter, max_pixel_diff
from server import ADMIN_AUTH, API_AUTH

pytestmark = pytest.mark.server
PROMPTS = ["a fox", "a castle at dusk"]
SEEDS = [11, 12, 13]
REQUEST = {"num_inference_steps": 2, "width": 32, "height": 32}
DARK = "eval_dark.safetensors"  # a file no other test uses, in the standard server's adapter directory


def submit(s, **body):
    return httpx.post(s.url + "/eval/submit", json={"prompts": PROMPTS, "seeds": SEEDS, **REQUEST, **body},
                      headers=ADMIN_AUTH, timeout=60)


def refused(r, field: str, status: int = 400) -> str:
    assert r.status_code == status and r.json()["detail"][0]["loc"] == [field], r.text
    return r.json()["error"]


def wait_for(s, job_id, states, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        rec = httpx.get(s.url + "/eval/status", params={"job_id": job_id}, headers=ADMIN_AUTH, timeout=30).json()
        if rec["state"] in states:
            return rec
        assert rec["state"] != "failed", rec
        time.sleep(0.2)
    raise TimeoutError(rec)


def darkness(png: bytes) -> float:
    """The darkness scorer on a delivered image: minus the mean of its [-1, 1] pixels."""
    return -float((np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64) / 127.5 - 1).mean())


def test_an_evaluation_job_reports_what_generate_gives(standard_server):
    s = standard_server
    darkening_adapter(Path(s.env["SPO_ADAPTER_DIR"]) / DARK)
    r = httpx.post(s.url + "/admin/adapters/load", json={"name": "evaldark", "file": DARK}, headers=ADMIN_AUTH, timeout=60)
    assert r.status_code == 200, r.text
    try:
        _run(s)
    finally:
        httpx.post(s.url + "/admin/adapters/unload", json={"name": "evaldark"}, headers=ADMIN_AUTH, timeout=60)


def _run(s):
    adapters = [{"adapter": "evaldark", "scale": 1.0}, {"adapter": DARK, "scale": 1.0}, {"adapter": "none"}, {"adapter": "spo"}]
    # the door: the admin token, then every bound named
    r = httpx.post(s.url + "/eval/submit", json={"prompts": PROMPTS, "adapters": adapters}, headers=API_AUTH)
    assert r.status_code == 401 and r.json()["detail"][0]["loc"] == ["authorization"]
    assert "no-such" in refused(submit(s, adapters=[{"adapter": "none"}, {"adapter": "no-such"}]), "adapters[1]")
    assert "-2..2" in refused(submit(s, adapters=[{"adapter": "spo", "scale": 2.5}]), "adapters[0].scale")
    refused(submit(s, adapters=[{"adapter": "../outside.safetensors"}]), "adapters[0]")
    assert "1..8" in refused(submit(s, adapters=[{"adapter": "none"}] * 9), "adapters")
    assert "1..16" in refused(submit(s, adapters=adapters, seeds=list(range(17))), "seeds")
    refused(submit(s, adapters=adapters, seeds=[1, -1]), "seeds[1]")
    r = httpx.post(s.url + "/eval/submit", json={"prompts": ["p"] * 257, "adapters": adapters}, headers=ADMIN_AUTH)
    assert "1..256" in refused(r, "prompts")
    refused(submit(s, adapters=adapters, scorer="aesthetic"), "scorer")
    refused(submit(s, adapters=adapters, width=4096), "width")
    r = httpx.post(s.url + "/eval/submit", json={"prompts_file": "../../etc/passwd", "adapters": adapters}, headers=ADMIN_AUTH)
    refused(r, "prompts_file")
    refused(httpx.get(s.url + "/eval/status", params={"job_id": "feedbeef"}, headers=ADMIN_AUTH), "job_id", 404)

    t0 = time.time()
    r = submit(s, adapters=adapters, scorer="darkness")
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["images"] == 24 and job["default_adapter"] == "spo" and job["default_entry"] == 3
    assert [e["scale"] for e in job["entries"]] == [1.0, 1.0, 0.0, 1.0]  # "spo": the server's default scale
    refused(httpx.get(s.url + "/eval/get", params={"job_id": job["job_id"]}, headers=ADMIN_AUTH), "job_id", 409)
    refused(httpx.get(s.url + "/train/status", params={"job_id": job["job_id"]}, headers=ADMIN_AUTH), "job_id", 404)
    rec = wait_for(s, job["job_id"], ("completed",))
    print(f"an evaluation of 24 images: {time.time() - t0:.1f} s from submit to completed")
    assert rec["kind"] == "eval" and rec["images_done"] == 24 and rec["beats_default"] == ["evaldark@1", f"{DARK}@1"]
    assert [h["state"] for h in rec["history"]] == ["queued", "running", "completed"]
    report = httpx.get(s.url + "/eval/get", params={"job_id": job["job_id"]}, headers=ADMIN_AUTH).json()
    dark, twin, none, spo = report["entries"]

    # the oracle: /generate's images of the same requests, scored here
    bodies = [{"adapter": "evaldark", "lora_scale": 1.0}, {"adapter": "evaldark", "lora_scale": 1.0}, {"lora_scale": 0},
              {"adapter": "spo", "lora_scale": 1.0}]
    served = [[httpx.post(s.url + "/generate", json={"prompt": p, "seed": seed, **REQUEST, **b}, headers=API_AUTH,
                          timeout=60).content for p in PROMPTS for seed in SEEDS] for b in bodies]
    want = [[darkness(png) for png in entry] for entry in served]
    for entry, expected in zip(report["entries"], want):
        assert entry["scores"] == pytest.approx(expected, abs=1 / 127.5)  # each pixel within 1/255
    for i, entry in enumerate(report["entries"]):  # every pair's outcome, against the first entry and the default
        for ref, got in ((0, entry), (3, entry["vs_default"])):
            if got is None:
                continue
            diffs = [a - b for a, b in zip(want[i], want[ref])]
            assert (got["wins"], got["losses"]) == (sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)), (i, ref)
    # by construction the darkening adapter (the first entry) wins all 6 pairs against the base and against the
    # default (p = 2 / 2^6), and its twin (the same file) ties all 6: win rate 1/2, p = 1
    assert (twin["ties"], twin["win_rate"], twin["win_rate_ci95"], twin["p_value"]) == (6, 0.5, [0.0, 1.0], 1.0)
    assert twin["scores"] == dark["scores"] and (dark["win_rate"], dark["p_value"]) == (0.5, 1.0)  # itself
    assert (none["wins"], none["losses"], none["win_rate"], none["p_value"]) == (0, 6, 0.0, 0.03125)
    assert (dark["vs_default"]["win_rate"], dark["vs_default"]["p_value"], dark["beats_default"]) == (1.0, 0.03125, True)
    assert none["beats_default"] is False and spo["vs_default"] is None and spo["beats_default"] is False

    # the contact sheet: the first seed's images, as /generate gives them
    sheet = report["sheet"]
    r = httpx.get(s.url + "/eval/sheet", params={"job_id": job["job_id"]}, headers=ADMIN_AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(r.content)).convert("RGB")
    (x0, y0), (w, h), pad = sheet["origin"], sheet["cell"], sheet["pad"]
    assert (sheet["rows"], sheet["columns"], sheet["seed"]) == (2, 4, SEEDS[0]) and (w, h) == (32, 32)
    for c in range(4):
        for p in range(2):
            cell = im.crop((x0 + c * (w + pad), y0 + p * (h + pad), x0 + c * (w + pad) + w, y0 + p * (h + pad) + h))
            assert max_pixel_diff(cell, served[c][p * len(SEEDS)]) <= 1, (c, p)

    # cancel and resume: the same job again, canceled before its first batch, resumed, the same report
    r = httpx.post(s.url + "/eval/resume", json={"job_id": job["job_id"]}, headers=ADMIN_AUTH)
    refused(r, "job_id", 409)  # completed
    again = submit(s, adapters=adapters, scorer="darkness").json()
    r = httpx.post(s.url + "/eval/cancel", json={"job_id": again["job_id"]}, headers=ADMIN_AUTH)
    assert r.status_code == 200 and r.json()["job_id"] == again["job_id"]
    wait_for(s, again["job_id"], ("canceled",))
    r = httpx.post(s.url + "/eval/resume", json={"job_id": again["job_id"]}, headers=ADMIN_AUTH)
    assert r.status_code == 200 and r.json()["state"] == "queued", r.text
    rec = wait_for(s, again["job_id"], ("completed",))
    assert [h["state"] for h in rec["history"]][-2:] == ["running", "completed"] and rec["resumes"] == 1
    second = httpx.get(s.url + "/eval/get", params={"job_id": again["job_id"]}, headers=ADMIN_AUTH).json()
    assert [e["scores"] for e in second["entries"]] == [e["scores"] for e in report["entries"]]
    listed = httpx.get(s.url + "/eval/list", headers=ADMIN_AUTH).json()
    assert {job["job_id"], again["job_id"]} <= {j["job_id"] for j in listed["jobs"]} and listed["counts"]["completed"] >= 2
    assert not {job["job_id"], again["job_id"]} & {j["job_id"] for j in httpx.get(s.url + "/train/list", headers=ADMIN_AUTH).json()["jobs"]}
