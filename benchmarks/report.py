"""Summaries of benchmark runs: latency percentiles, throughput and errors from per-request records,
the text table, the ratios that benchmarks/RESULTS.md compares with its goals, and the plot.

Records are dicts with loadgen.Record's fields (dataclasses.asdict), as the raw output holds them.
A run's result is one dict (see benchmarks/bench_serving.py): raw, it keeps every request
(`records`, written to benchmarks/out/); `summary()` drops the per-request data, the host name and
needless digits, which is the few-KB form committed under benchmarks/results/.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Iterable

PER_REQUEST_KEYS = ("records", "window_requests", "window_latencies", "engine_latencies")
DISCARDED_KEYS = ("img_per_s", "p50_s", "p95_s", "ratio_mean", "errors_total", "other_cpu_s", "other_cpu_share")
MAX_ERROR_SAMPLES = 3


def timings(fn, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def pct(values: list[float], q: float) -> float | None:
    """Percentile with linear interpolation (numpy's default), None when empty."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def errors_by_kind(records: Iterable) -> tuple[dict[str, int], dict[str, list[str]]]:
    """({kind: count}, {kind: up to 3 distinct details}) of the failed requests."""
    counts: dict[str, int] = {}
    samples: dict[str, list[str]] = {}
    for r in records:
        if not r["ok"]:
            kind = r["error"]
            counts[kind] = counts.get(kind, 0) + 1
            s = samples.setdefault(kind, [])
            detail = r.get("detail")
            if len(s) < MAX_ERROR_SAMPLES and detail not in s:
                s.append(detail)
    return counts, samples


def latency_stats(lat: list[float]) -> dict:
    return {"p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95), "mean_s": statistics.fmean(lat) if lat else None,
            "max_s": max(lat) if lat else None}


def in_window(records: Iterable, warmup: float, duration: float) -> list:
    """The requests of a closed-loop level that were sent inside its measured window."""
    return [r for r in records if warmup <= r["t0"] <= warmup + duration]


def closed_summary(records: list, clients: int, warmup: float, duration: float, steps: Iterable[int]) -> dict:
    """A closed-loop level. images/s: successes completed inside the window / its duration; latencies:
    successes sent inside the window; errors: the whole level, warm-up and drain included."""
    w0, w1 = warmup, warmup + duration
    window = in_window(records, warmup, duration)
    lat = [r["latency"] for r in window if r["ok"]]
    done = sum(1 for r in records if r["ok"] and w0 <= r["t1"] <= w1)
    errors, samples = errors_by_kind(records)
    by_steps = {}
    for s in steps:
        ls = [r["latency"] for r in window if r["ok"] and r["steps"] == s]
        by_steps[str(s)] = {"n": len(ls), "mean_s": statistics.fmean(ls) if ls else None, "p50_s": pct(ls, 0.5)}
    t_done = max((r["t1"] for r in records), default=w1)
    return {
        "clients": clients, "duration_s": duration, "warmup_s": warmup, "drain_s": max(0.0, t_done - w1),
        "img_per_s": done / duration, "images_in_window": done, **latency_stats(lat),
        "requests_total": len(records), "requests_in_window": len(window), "ok_in_window": len(lat),
        "errors_total": sum(errors.values()), "errors": errors, "error_samples": samples, "latency_by_steps": by_steps,
    }


def open_summary(records: list, duration: float) -> dict:
    """An open-loop run: latency from each request's scheduled arrival to its response."""
    lat = [r["latency"] for r in records if r["ok"]]
    errors, samples = errors_by_kind(records)
    return {
        "requests": len(records), "duration_s": duration,
        "finished_after_s": max((r["t1"] for r in records), default=0.0),
        "offered_req_per_s": len(records) / duration, **latency_stats(lat), "ok": len(lat),
        "errors_total": sum(errors.values()), "errors": errors, "error_samples": samples,
    }


def replay_summary(http: list[float], engine: list[float]) -> dict:
    """The same requests over HTTP and through the engine in process, one at a time, pairwise."""
    return {
        "n": len(engine), "http_mean_s": statistics.fmean(http), "engine_mean_s": statistics.fmean(engine),
        "http_p50_s": pct(http, 0.5), "engine_p50_s": pct(engine, 0.5),
        "ratio_mean": statistics.fmean(http) / statistics.fmean(engine), "ratio_p50": pct(http, 0.5) / pct(engine, 0.5),
        "per_request_ratio_median": statistics.median(h / e for h, e in zip(http, engine)),
    }


def machine(packages: Iterable[str] = ("torch", "diffusers", "bentoml")) -> dict:
    """CPU model, cores, memory and package versions (no host name)."""
    cpu = platform.processor() or platform.machine()
    mem = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem, "python": platform.python_version()}
    for p in packages:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def rounded(obj, digits: int = 4):
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def summary(res: dict) -> dict:
    """The committed form of a result: no per-request data, no host name, no load averages (the CPU
    accountant's figures say more), discarded attempts cut to why they were discarded, 4 decimals."""

    def strip(obj):
        if isinstance(obj, dict):
            out = {}
            for k, v in obj.items():
                if k in PER_REQUEST_KEYS or k == "hostname" or k.startswith("loadavg"):
                    continue
                if k == "discarded_attempts":
                    v = [{f: a[f] for f in DISCARDED_KEYS if f in a} for a in v]
                out[k] = strip(v)
            return out
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    out = strip(res)
    out["ratios"] = ratios(res)
    return rounded(out)


def dumps(obj, width: int = 120, indent: str = "") -> str:
    """JSON that stays small and diffs line by line: a value that fits in `width` columns takes one
    line; a longer dict or list packs its short members several to a line, the others nested."""
    flat = json.dumps(obj)
    if not isinstance(obj, (dict, list)) or not obj or len(indent) + len(flat) <= width:
        return flat
    inner = indent + " "
    if isinstance(obj, dict):
        parts = [f"{json.dumps(k)}: {dumps(v, width, inner)}" for k, v in obj.items()]
    else:
        parts = [dumps(v, width, inner) for v in obj]
    lines, line = [], ""
    for part in parts:
        if line and ("\n" in part or len(inner) + len(line) + len(part) + 2 > width):
            lines.append(line)
            line = ""
        line = f"{line} {part}," if line else f"{part},"
        if "\n" in part:
            lines.append(line)
            line = ""
    if line:
        lines.append(line)
    lines[-1] = lines[-1][:-1]
    opening, closing = "{}" if isinstance(obj, dict) else "[]"
    return opening + "\n" + "\n".join(inner + ln for ln in lines) + "\n" + indent + closing


# ---------------------------------------------------------------------------------------------
# Serving: the ratios RESULTS.md holds against its goals, the table, the plot


def _closed(res: dict, key: str, clients: int | None) -> dict | None:
    for lv in res["systems"].get(key, {}).get("closed", []):
        if lv["clients"] == clients:
            return lv
    return None


def ratios(res: dict) -> list[dict]:
    """(a) against the others, as benchmarks/RESULTS.md states its serving goals; values only."""
    s = res["systems"]
    out = []
    top = max(res["config"]["clients"], default=None)
    a, c = _closed(res, "a", top), _closed(res, "c", top)
    value = a["img_per_s"] / c["img_per_s"] if a and c and c["img_per_s"] else None
    notes = [f"(a) errors: {a['errors_total']}"] if a else []
    if a and c and not c["img_per_s"]:
        notes.append("(c) completed no image in the window")
    if (a and a.get("disturbed")) or (c and c.get("disturbed")):
        notes.append("DISTURBED by other processes")
    out.append({"name": f"closed loop {top} clients, (a) / (c) images/s", "value": value, "note": "; ".join(notes)})

    others = [(k, s[k]["open"]["p95_s"]) for k in ("b", "c", "d") if s.get(k, {}).get("open") and s[k]["open"]["p95_s"] is not None]
    a_open = s.get("a", {}).get("open")
    best = min(others, key=lambda kv: kv[1]) if others else None
    value = a_open["p95_s"] / best[1] if a_open and a_open["p95_s"] is not None and best else None
    notes = [f"best: ({best[0]}) {best[1]:.2f} s"] if best else []
    disturbed = [k for k in sorted(s) if s[k].get("open", {}).get("disturbed")]
    if disturbed:
        notes.append("DISTURBED: " + ",".join(disturbed))
    out.append({"name": "open loop p95, (a) / best of (b), (c), (d)", "value": value, "note": "; ".join(notes)})

    ip = res.get("inprocess")
    a1 = _closed(res, "a", 1)
    note = ""
    if ip:
        note = f"ratio of medians {ip['ratio_p50']:.2f}"
        if ip.get("disturbed") or (a1 and a1.get("disturbed")):
            note += "; DISTURBED"
    out.append({"name": "1 client, (a) HTTP latency / in-process engine latency (means, same requests)",
                "value": ip["ratio_mean"] if ip else None, "note": note})
    return out


def fmt(x, spec=".2f", none="-") -> str:
    return none if x is None else format(x, spec)


def err_str(errors: dict) -> str:
    return "0" if not errors else ", ".join(f"{k} x{v}" for k, v in sorted(errors.items()))


def _other(lv: dict) -> str:
    return fmt(lv.get("other_cpu_s"), ".1f") + "s" + ("*" if lv.get("disturbed") else " ")


def table(res: dict) -> str:
    m, cfg, sysres = res["machine"], res["config"], res["systems"]
    lines = [f"\nServing benchmark, {res['date']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
             f"diffusers {m['diffusers']}, bentoml {m['bentoml']}",
             f"tiny preset, {cfg['size']}x{cfg['size']}, guidance {cfg['guidance_scale']:g}, steps "
             f"{'/'.join(map(str, cfg['steps']))} mixed, closed loop {cfg['duration']} s (+{cfg['warmup']} s warm-up) "
             f"per level, open loop {cfg['open_duration']} s",
             "\nClosed loop",
             f"{'system':<40} {'clients':>7} {'img/s':>7} {'p50 s':>7} {'p95 s':>7} {'mean s':>7} {'reqs':>5} {'other':>8}  errors"]
    for key, r in sorted(sysres.items()):
        for lv in r.get("closed", []):
            lines.append(f"{r['label']:<40} {lv['clients']:>7} {fmt(lv['img_per_s']):>7} {fmt(lv['p50_s']):>7} "
                         f"{fmt(lv['p95_s']):>7} {fmt(lv['mean_s']):>7} {lv['requests_total']:>5} {_other(lv):>9} "
                         f"{err_str(lv['errors'])}")
        if r.get("failure"):
            lines.append(f"{r['label']:<40} FAILED: {r['failure']}")
    if res.get("open_rate"):
        lines.append(f"\nOpen loop, Poisson {res['open_rate']:.3f} req/s ({res['open_rate_source']}), "
                     f"{res.get('open_requests')} requests, same schedule for every system")
        lines.append(f"{'system':<40} {'p50 s':>7} {'p95 s':>7} {'mean s':>7} {'max s':>7} {'ok':>5} {'other':>8}  errors")
        for key, r in sorted(sysres.items()):
            o = r.get("open")
            if o:
                lines.append(f"{r['label']:<40} {fmt(o['p50_s']):>7} {fmt(o['p95_s']):>7} {fmt(o['mean_s']):>7} "
                             f"{fmt(o['max_s']):>7} {o['ok']:>5} {_other(o):>9} {err_str(o['errors'])}")
    ip = res.get("inprocess")
    if ip:
        a1 = _closed(res, "a", 1) or {}
        lines.append(f"\n(a) at 1 client vs the engine in-process (same {ip['n']} requests, one at a time): "
                     f"HTTP mean {ip['http_mean_s']:.3f} s, in-process mean {ip['engine_mean_s']:.3f} s; "
                     f"p50 {ip['http_p50_s']:.3f} vs {ip['engine_p50_s']:.3f} s; median per-request ratio "
                     f"{ip['per_request_ratio_median']:.2f}; other processes {fmt(ip.get('other_cpu_s'), '.1f')} CPU s "
                     f"during the in-process run, {fmt(a1.get('other_cpu_s'), '.1f')} CPU s during (a) at 1 client")
    lines.append("'other': CPU seconds used by processes outside this benchmark during the level (the machine is "
                 "shared); * = disturbed even after the retries")
    lines.append("\nRatios (the goals are in benchmarks/RESULTS.md)")
    for g in ratios(res):
        lines.append(f"  {g['name']}: {fmt(g['value'], '.2f', 'n/a')}{' - ' + g['note'] if g['note'] else ''}")
    return "\n".join(lines)


def plot(res: dict, path: str | Path) -> None:
    """Closed-loop images/s and p95 latency against clients, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    any_disturbed = False
    for key, r in sorted(res["systems"].items()):
        lv = r.get("closed", [])
        if not lv:
            continue
        x = [v["clients"] for v in lv]
        y1 = [v["img_per_s"] for v in lv]
        y2 = [v["p95_s"] if v["p95_s"] is not None else float("nan") for v in lv]
        line, = ax1.plot(x, y1, marker="o", label=r["label"])
        ax2.plot(x, y2, marker="o", label=r["label"], color=line.get_color())
        bad = [i for i, v in enumerate(lv) if v.get("disturbed")]
        if bad:
            any_disturbed = True
            for ax, y in ((ax1, y1), (ax2, y2)):
                ax.scatter([x[i] for i in bad], [y[i] for i in bad], s=160, facecolors="none", edgecolors="black",
                           linewidths=1.2, zorder=5)
    clients = res["config"]["clients"]
    for ax, ylabel in ((ax1, "throughput (images/s)"), (ax2, "p95 latency (s)")):
        ax.set_xscale("log", base=2)
        if clients:
            ax.set_xlim(min(clients) / 1.25, max(clients) * 1.25)
            ax.set_xticks(clients)
            ax.set_xticklabels([str(c) for c in clients])
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax1.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    if any_disturbed:
        ax1.scatter([], [], s=160, facecolors="none", edgecolors="black", label="disturbed by other processes")
    ax1.legend(fontsize=8)
    m, cfg = res["machine"], res["config"]
    fig.suptitle(f"SDXL-shaped tiny model, {cfg['size']}x{cfg['size']}, steps {'/'.join(map(str, cfg['steps']))} mixed - "
                 f"{m['cpu']}, {m['cores']} cores (shared) - {res['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
