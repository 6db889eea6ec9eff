"""Prometheus for real: Debian's prometheus scrapes a live `bentoml serve` (tiny preset) with
deploy/prometheus/prometheus.yml (target and intervals rewritten) and its rules.yml, and answers PromQL
through its HTTP API. promtool checks the rules and the config. `make deps-system` installs prometheus."""

from __future__ import annotations

import json
import math
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import system_tool
from server import ROOT, Server, free_port

PROM_DIR = ROOT / "deploy" / "prometheus"
RULES = PROM_DIR / "rules.yml"
CONFIG = PROM_DIR / "prometheus.yml"
DASHBOARD = PROM_DIR / "grafana-dashboard.json"


def tool(name: str) -> str:
    return system_tool(name, "prometheus")


def spo_series() -> set[str]:
    """Every series name spo_runtime.metrics exposes (histograms as _bucket/_sum/_count)."""
    names = set()
    for family in _families():
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def _families():
    from prometheus_client import CollectorRegistry

    from spo_runtime.metrics import Metrics

    registry = CollectorRegistry()
    m = Metrics(registry)
    m.images.labels("64x64", "ddim").inc(0)
    m.rejected.labels("queue_full").inc(0)
    for g, label in [(m.adapter_bytes, "spo"), (m.mem_allocated, "cuda:0"), (m.mem_reserved, "cuda:0"), (m.train_jobs, "failed")]:
        g.labels(label).set(0)
    return registry.collect()


def test_rules_and_config_pass_promtool_and_the_rule_tests():
    promtool = tool("promtool")
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([promtool, "check", "config", str(CONFIG)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    # the recording rules' values and when each alert fires, on synthetic series
    out = subprocess.run([promtool, "test", "rules", str(PROM_DIR / "rules_test.yml")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rules_and_dashboard_name_only_real_series():
    """A misspelt series would make a rule or a panel silently empty: every spo_ name they use exists."""
    import re

    known = spo_series()
    texts = {"rules.yml": RULES.read_text(), "grafana-dashboard.json": DASHBOARD.read_text()}
    for name, text in texts.items():
        used = set(re.findall(r"\b(spo_[a-z_]+)", text))
        assert used, name
        assert used <= known, f"{name}: unknown series {sorted(used - known)}"
    dash = json.loads(texts["grafana-dashboard.json"])
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for topic in ["queue depth", "batch size", "step time p95", "images/s by size", "rejections by reason",
                  "device memory", "training jobs"]:
        assert topic in titles, topic
    for p in dash["panels"]:
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]


class Prometheus:
    def __init__(self, target: str, workdir: Path):
        cfg = yaml.safe_load(CONFIG.read_text())
        cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
        cfg["rule_files"] = [str(RULES)]
        job = cfg["scrape_configs"][0]
        job["scrape_timeout"] = "1s"
        job["static_configs"] = [{"targets": [target]}]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            assert self.proc.poll() is None, f"prometheus exited; see {workdir / 'prometheus.log'}"
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError("prometheus not ready in 30 s")

    def query(self, promql: str) -> list[dict]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        """The single sample's value (None when the result is empty)."""
        result = self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait(self, promql: str, ok, timeout: float = 30.0):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            last = self.value(promql)
            if last is not None and ok(last):
                return last
            time.sleep(0.25)
        pytest.fail(f"{promql} = {last} after {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.mark.server
def test_prometheus_scrapes_a_live_server_and_answers_promql(tmp_path):
    # Prometheus first: its scrape manager applies new targets only every 5 s, which then overlaps the model load
    port = free_port()
    prom = Prometheus(f"127.0.0.1:{port}", tmp_path)
    try:
        # its own BENTOML_HOME: `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir at start, so
        # another server started meanwhile on this machine would otherwise reset or mix into the counts
        env = {"SPO_DATA_DIR": str(tmp_path / "data"), "SPO_MAX_BATCH": "8", "BENTOML_HOME": str(tmp_path / "bentoml")}
        with Server(env, tmp_path / "server.log", port=port) as s:
            # a scrape with only the warm-up image, so that rate() sees the increase that follows
            prom.wait('up{job="spo-serve"}', lambda v: v == 1)
            before = prom.wait('sum(spo_images_total{job="spo-serve"})', lambda v: v >= 1)
            with ThreadPoolExecutor(5) as pool:
                # `size` is a pixel class: 56x64 and 32x128 have at most 64x64's pixels, so they count as 64x64
                bodies = [{"prompt": "a fox", "seed": i, "num_inference_steps": 4, "width": w, "height": h}
                          for i, (w, h) in enumerate([(64, 64), (56, 64), (32, 128), (32, 32), (32, 32)])]
                codes = list(pool.map(lambda b: httpx.post(s.url + "/generate", json=b, timeout=60).status_code, bodies))
            assert codes == [200] * 5
            total = prom.wait("sum(spo_images_total)", lambda v: v >= before + 5)
            assert total == before + 5
            by_size = {r["metric"]["size"]: float(r["value"][1]) for r in prom.query("sum by (size) (spo_images_total)")}
            assert by_size == {"64x64": before + 3, "32x32": 2.0}
            assert prom.wait("sum(rate(spo_images_total[1m]))", lambda v: v > 0) > 0
            p95 = prom.wait("histogram_quantile(0.95, sum by (le) (rate(spo_step_seconds_bucket[1m])))",
                            lambda v: not math.isnan(v))
            assert 0 < p95 <= 10.0  # within the histogram's buckets (a tiny 64x64 step takes milliseconds)
            # the recording rules of rules.yml evaluate on the live series, and no rule reports an error
            assert prom.wait("job:spo_images:rate1m", lambda v: v > 0) > 0
            assert not math.isnan(prom.wait("job:spo_step_seconds:p95_5m", lambda v: not math.isnan(v)))
            deadline = time.time() + 10
            while time.time() < deadline:
                groups = httpx.get(prom.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
                health = {r["name"]: (r["health"], r.get("lastError", "")) for g in groups for r in g["rules"]}
                if all(h != "unknown" for h, _ in health.values()):
                    break
                time.sleep(0.25)
            assert len(health) == 13 and all(h == "ok" for h, _ in health.values()), health
    finally:
        prom.stop()
