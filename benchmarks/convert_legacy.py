"""One-off: the committed per-request dumps (benchmarks/serving_cpu*.json, runtime_cpu.json) to summaries
under benchmarks/results/, with benchmarks/report.py.

Every number written is one the old files hold (summary fields of the run, rounded to 4 decimals); the
ratios are recomputed from them. As a check of report.py, each level's summary is also recomputed from
its per-request records (stored to 1e-4 s) and must agree with the stored one.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import closed_summary, dumps, open_summary, replay_summary, summary  # noqa: E402

CHECKED = ("img_per_s", "images_in_window", "p50_s", "p95_s", "mean_s", "max_s", "requests_total", "requests_in_window",
           "ok_in_window", "errors_total", "errors", "latency_by_steps", "requests", "ok", "offered_req_per_s",
           "http_mean_s", "engine_mean_s", "engine_p50_s", "ratio_mean", "per_request_ratio_median", "n")


def close(a, b, tol=2e-3) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=tol, abs_tol=tol)
    return a == b


def check(where: str, stored: dict, recomputed: dict) -> None:
    for k in CHECKED:
        if k in recomputed and k in stored and not close(stored[k], recomputed[k]):
            raise SystemExit(f"{where}: {k} stored {stored[k]} recomputed {recomputed[k]}")


def dedupe(level: dict) -> None:
    level["error_samples"] = {k: list(dict.fromkeys(v)) for k, v in level.get("error_samples", {}).items()}
    for o in level.get("discarded_attempts", []):
        dedupe(o)


def serving(src: Path, dst: Path) -> None:
    res = json.loads(src.read_text())
    cfg = res["config"]
    for key, r in res["systems"].items():
        for lv in r.get("closed", []):
            check(f"{key} closed {lv['clients']}", lv,
                  closed_summary(lv["records"], lv["clients"], lv["warmup_s"], lv["duration_s"], cfg["steps"]))
            dedupe(lv)
        if r.get("open"):
            o = r["open"]
            recs = [{**q, "t0": q["t_sched"]} for q in o["records"]]
            check(f"{key} open", o, open_summary(recs, o["duration_s"]))
            dedupe(o)
    ip = res.get("inprocess")
    if ip:
        http = [x for x in next(lv for lv in res["systems"]["a"]["closed"] if lv["clients"] == 1)["window_latencies"]
                if x is not None]
        check("inprocess", ip, replay_summary(http, ip["engine_latencies"]))
    old_goals = res.pop("goals")
    out = summary(res)
    for g, r in zip(old_goals, out["ratios"]):
        assert close(g["value"], r["value"], 1e-4), (g, r)
    out["source"] = f"converted from benchmarks/{src.name} (per-request dump, since removed) by benchmarks/convert_legacy.py"
    dst.write_text(dumps(out) + "\n")
    print(f"{dst}: {dst.stat().st_size} bytes")


def runtime(src: Path, dst: Path) -> None:
    out = {**json.loads(src.read_text()), "source": f"benchmarks/{src.name} (already a summary)"}
    dst.write_text(dumps(out) + "\n")
    print(f"{dst}: {dst.stat().st_size} bytes")


if __name__ == "__main__":
    results = HERE / "results"
    serving(HERE / "serving_cpu.json", results / "serving_cpu.json")
    serving(HERE / "serving_cpu_rerun.json", results / "serving_cpu_rerun.json")
    runtime(HERE / "runtime_cpu.json", results / "runtime_cpu.json")
