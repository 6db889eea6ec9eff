"""benchmarks/locustfile.py as a real client: locust headless against the real `bentoml serve` (tiny preset)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server import ROOT, Server

pytestmark = [pytest.mark.server, pytest.mark.serial]  # a timed load test: alone on the machine
TOKEN = "load-token-4567890"
USERS = 6
RUN_S = 20


def test_locust_mix_against_the_server(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    # one torch thread leaves a core to locust; two threads oversubscribe a shared 2-core machine and then run
    # several times slower (measured: 30 requests instead of 151 in 20 s beside a 2-thread torch job)
    env = {"SPO_DATA_DIR": str(data), "SPO_ADMIN_TOKEN": TOKEN, "SPO_MAX_QUEUE": "64", "SPO_MAX_BATCH": "8",
           "SPO_TORCH_THREADS": "1"}
    prefix = tmp_path / "load"
    with Server(env, tmp_path / "server.log") as server:
        cmd = [str(Path(sys.executable).with_name("locust")), "-f", str(ROOT / "benchmarks" / "locustfile.py"),
               "-H", server.url, "-u", str(USERS), "-r", str(USERS), "-t", f"{RUN_S}s", "--headless",
               "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING",
               "--stop-timeout", "5",  # lets in-flight requests end instead of cutting them
               "--steps", "4,8", "--batch-share", "0.2", "--batch-n", "2,3", "--wait", "0.1,0.4",
               "--admin-token", TOKEN, "--admin-share", "0.15", "--lora-max", "1.5", "--mix-seed", "7"]
        auth = {"Authorization": f"Bearer {TOKEN}"}
        before = httpx.get(server.url + "/admin/adapters", headers=auth, timeout=10).json()["default_lora_scale"]
        child_env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}  # 127.0.0.1 direct
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=RUN_S + 30, env=child_env)
        took = time.time() - t0
        log = proc.stdout[-3000:] + proc.stderr[-3000:]
        after = httpx.get(server.url + "/admin/adapters", headers=auth, timeout=10).json()["default_lora_scale"]

    assert took < RUN_S + 25, (took, log)  # stopped by itself (-t)
    assert Path(f"{prefix}_stats.csv").exists(), (proc.returncode, log)
    rows = {r["Name"]: r for r in csv.DictReader(open(f"{prefix}_stats.csv"))}
    failures = list(csv.DictReader(open(f"{prefix}_failures.csv")))
    agg = rows["Aggregated"]
    print(f"\nlocust: {agg['Request Count']} requests, {float(agg['Requests/s']):.2f} req/s, "
          f"{agg['Failure Count']} failures, median {agg['Median Response Time']} ms, "
          f"p95 {agg['95%']} ms; per route: "
          + ", ".join(f"{n} {r['Request Count']}" for n, r in rows.items() if n != "Aggregated"))
    assert failures == [] and int(agg["Failure Count"]) == 0, (failures, log)
    assert proc.returncode == 0, log  # locust exits 1 on any failure
    assert int(agg["Request Count"]) > 10 and float(agg["Requests/s"]) > 0, (agg, log)
    assert int(rows["/generate"]["Request Count"]) > 0 and int(rows["/generate_batch"]["Request Count"]) > 0, rows.keys()
    assert int(rows["/admin/lora_scale"]["Request Count"]) > 0, rows.keys()
    assert after == before, (before, after)  # the locustfile restored the default scale it found at the start
