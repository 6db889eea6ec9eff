"""Serving benchmark: spo-serve against two BentoML baselines over HTTP, same model, same requests.

    python benchmarks/bench_serving.py [--systems a,b,c,d] [--clients 1,4,16] [--duration 40]
        [--open-duration 60] [--json out.json] [--plot out.png]

Systems, each started as a real `bentoml serve` subprocess on a free loopback port, all on the same
tiny model saved with `save_tiny` (to a temporary directory unless --model-dir is given):
  a  spo-serve (`service.service:SPOService`), SPO_BATCHING=step (step-level batching)
  b  spo-serve, SPO_BATCHING=request (a batch forms only when the running group is empty)
  c  benchmarks/baselines/diffusers_service.py: diffusers' StableDiffusionXLPipeline, one request at
     a time in a sync @bentoml.api (the official BentoML SDXL example pattern)
  d  benchmarks/baselines/adaptive_service.py: BentoML adaptive batching (async front service that
     depends on a batchable=True worker; the worker runs each batch as one pipeline call per step count)

Workload: every request draws num_inference_steps from 10/20/30, a random seed and a prompt from
benchmarks/prompts.txt (seeded RNGs, so every system sees the same requests); guidance 5, 64x64.

Measurements, per system:
  - closed loop at each --clients level: N clients, each issuing one request at a time. Clients run
    for --warmup + --duration seconds; only the last --duration seconds count: images/s = successful
    responses completed in the window / duration; latency percentiles over successful requests
    issued in the window. Requests in flight at the end are awaited (their latency and errors count,
    not their images). Errors of the whole level (warm-up included) are reported by kind.
  - open loop: Poisson arrivals at 70% of (c)'s best closed-loop images/s (or --open-rate) for
    --open-duration seconds; the arrival times and requests come from a seeded RNG, so every system
    sees the same schedule. Latency from the scheduled arrival to the response.
  - for (a) at 1 client: the same request sequence replayed one at a time through
    spo_runtime.engine.Engine.generate_sync in a plain script (a subprocess of this one), to give the
    cost of the HTTP layer.

Every server is stopped on the way out, error and Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _server import Server  # noqa: E402

STEPS = (10, 20, 30)
GUIDANCE = 5.0
SIZE = 64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REQUEST_TIMEOUT_S = 300.0
MAX_REQUESTS_PER_CLIENT = 5000  # a bound on every loop, whatever the durations
OPEN_FRACTION = 0.7

SYSTEMS = {
    "a": dict(label="(a) spo-serve, step batching", target="service.service:SPOService", kind="spo", batching="step"),
    "b": dict(label="(b) spo-serve, request batching", target="service.service:SPOService", kind="spo", batching="request"),
    "c": dict(label="(c) BentoML + diffusers, per request", target="benchmarks.baselines.diffusers_service:DiffusersService",
              kind="baseline"),
    "d": dict(label="(d) BentoML adaptive batching", target="benchmarks.baselines.adaptive_service:AdaptiveFront",
              kind="baseline"),
}


def load_prompts() -> list[str]:
    lines = [ln.strip() for ln in (HERE / "prompts.txt").read_text().splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise SystemExit("benchmarks/prompts.txt holds no prompts")
    return prompts


def make_request(rng: random.Random, prompts: list[str]) -> dict:
    return {
        "prompt": rng.choice(prompts),
        "num_inference_steps": rng.choice(STEPS),
        "seed": rng.randrange(2**32),
        "guidance_scale": GUIDANCE,
        "width": SIZE,
        "height": SIZE,
    }


def pct(values: list[float], q: float) -> float | None:
    """Percentile with linear interpolation (numpy's default), None when empty."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------------
# CPU used by other processes (the machine is shared: this says how much a figure was disturbed)


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_snapshot() -> dict:
    """{(pid, start): (cpu ticks, ppid, ticks of waited-for children)} of every process (Linux /proc)."""
    out = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
            out[(int(e), f[19])] = (int(f[11]) + int(f[12]), int(f[1]), int(f[13]) + int(f[14]))
        except (OSError, IndexError, ValueError):
            continue
    return out


def system_ticks() -> tuple[int, int]:
    """(busy ticks, steal ticks) of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


class ForeignCpu:
    """CPU used since construction by the whole machine minus this benchmark's own process tree
    ("other": other users' tests, short-lived processes included) and by our tree ("ours")."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.sys0 = system_ticks()
        self.snap0 = cpu_snapshot()

    def measure(self) -> tuple[float, float, float, float]:
        """(other CPU s, our CPU s, steal s, elapsed s)."""
        snap1 = cpu_snapshot()
        sys1 = system_ticks()
        elapsed = time.perf_counter() - self.t0
        ppid = {pid: pp for (pid, _), (_, pp, _) in snap1.items()}
        mine = {os.getpid()}
        changed = True
        while changed:  # descendants (circus workers keep their parent even after setsid)
            changed = False
            for pid, pp in ppid.items():
                if pp in mine and pid not in mine:
                    mine.add(pid)
                    changed = True
        ours = 0
        for key, (t1, _, c1) in snap1.items():
            if key[0] in mine:
                t0, _, c0 = self.snap0.get(key, (0, 0, 0))
                ours += t1 - t0
                if key[0] == os.getpid():
                    ours += c1 - c0  # children we waited for (the in-process engine script)
        busy = sys1[0] - self.sys0[0]
        other = max(0, busy - ours)
        return other / _TICK, ours / _TICK, (sys1[1] - self.sys0[1]) / _TICK, elapsed

    def share(self) -> dict:
        other, ours, steal, elapsed = self.measure()
        cores = os.cpu_count() or 1
        return {"other_cpu_s": round(other, 1), "other_cpu_share": round(other / (elapsed * cores), 3),
                "our_cpu_share": round(ours / (elapsed * cores), 3), "steal_share": round(steal / (elapsed * cores), 3)}


def quiet_gate(max_wait: float, threshold: float, sample_s: float = 2.0) -> dict:
    """Wait (at most max_wait s) until, over one sample, other processes use under `threshold` of the
    cores and our own servers are idle (no request of a previous level still running)."""
    t0 = time.perf_counter()
    cores = os.cpu_count() or 1
    while True:
        f = ForeignCpu()
        time.sleep(sample_s)
        other, ours, _, elapsed = f.measure()
        other_share, our_share = other / (elapsed * cores), ours / (elapsed * cores)
        waited = time.perf_counter() - t0
        if (other_share < threshold and our_share < 0.05) or waited >= max_wait:
            return {"waited_s": round(waited, 1), "other_share": round(other_share, 3), "ours_share": round(our_share, 3),
                    "quiet": other_share < threshold and our_share < 0.05}


# ---------------------------------------------------------------------------------------------
# HTTP measurement


async def one_request(http: httpx.AsyncClient, url: str, req: dict) -> tuple[bool, str | None, str | None]:
    """POST /generate -> (ok, error kind, error detail)."""
    try:
        r = await http.post(url, json=req)
    except httpx.HTTPError as e:
        return False, type(e).__name__, str(e)[:300]
    except Exception as e:  # anything else the client raises is an error of the system under test too
        return False, type(e).__name__, str(e)[:300]
    if r.status_code != 200:
        return False, f"http_{r.status_code}", r.text[:300]
    if not r.content.startswith(PNG_MAGIC):
        return False, "not_png", r.content[:100].decode("latin-1")
    return True, None, None


def new_client(n: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0),
                             limits=httpx.Limits(max_connections=max(64, 4 * n), max_keepalive_connections=max(64, 4 * n)))


async def closed_loop(url: str, clients: int, warmup: float, duration: float, seed: int, prompts: list[str]) -> dict:
    records: list[dict] = []
    t_begin = time.perf_counter()
    w1 = t_begin + warmup + duration

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(f"closed-{seed}-{clients}-{i}")
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if time.perf_counter() >= w1:
                return
            req = make_request(rng, prompts)
            t0 = time.perf_counter()
            ok, kind, detail = await one_request(http, url, req)
            t1 = time.perf_counter()
            records.append({"client": i, "t0": t0 - t_begin, "t1": t1 - t_begin, "latency": t1 - t0, "ok": ok,
                            "error": kind, "detail": detail, "steps": req["num_inference_steps"], "request": req})
            if not ok:
                await asyncio.sleep(0.1)  # no hot loop against a failing server

    load0 = os.getloadavg()
    foreign = ForeignCpu()
    async with new_client(clients) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    t_done = time.perf_counter() - t_begin
    return {**summarize_closed(records, clients, warmup, duration, t_done, load0), **foreign.share()}


def summarize_closed(records, clients, warmup, duration, t_done, load0) -> dict:
    w0, w1 = warmup, warmup + duration
    window = [r for r in records if w0 <= r["t0"] <= w1]
    lat = [r["latency"] for r in window if r["ok"]]
    done_in_window = sum(1 for r in records if r["ok"] and w0 <= r["t1"] <= w1)
    errors: dict[str, int] = {}
    samples: dict[str, list[str]] = {}
    for r in records:
        if not r["ok"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
            samples.setdefault(r["error"], [])
            if len(samples[r["error"]]) < 3:
                samples[r["error"]].append(r["detail"])
    by_steps = {}
    for s in STEPS:
        ls = [r["latency"] for r in window if r["ok"] and r["steps"] == s]
        by_steps[str(s)] = {"n": len(ls), "mean_s": statistics.fmean(ls) if ls else None, "p50_s": pct(ls, 0.5)}
    return {
        "clients": clients,
        "duration_s": duration,
        "warmup_s": warmup,
        "drain_s": max(0.0, t_done - w1),
        "img_per_s": done_in_window / duration,
        "images_in_window": done_in_window,
        "p50_s": pct(lat, 0.5),
        "p95_s": pct(lat, 0.95),
        "mean_s": statistics.fmean(lat) if lat else None,
        "max_s": max(lat) if lat else None,
        "requests_total": len(records),
        "requests_in_window": len(window),
        "ok_in_window": len(lat),
        "errors_total": sum(errors.values()),
        "errors": errors,
        "error_samples": samples,
        "latency_by_steps": by_steps,
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg(),
        "records": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k not in ("request", "detail")}
                    for r in records],
        "window_requests": [r["request"] for r in window],  # [steps, seed, prompt line] in the JSON
        "window_latencies": [round(r["latency"], 4) if r["ok"] else None for r in window],
    }


def open_schedule(rate: float, duration: float, seed: int, prompts: list[str]) -> list[tuple[float, dict]]:
    rng = random.Random(f"open-{seed}")
    out, t = [], 0.0
    while len(out) < 100_000:
        t += rng.expovariate(rate)
        if t > duration:
            break
        out.append((t, make_request(rng, prompts)))
    return out


async def open_loop(url: str, schedule: list[tuple[float, dict]], duration: float) -> dict:
    records: list[dict] = []
    load0 = os.getloadavg()
    foreign = ForeignCpu()

    async def fire(at: float, req: dict, http: httpx.AsyncClient, t_begin: float) -> None:
        await asyncio.sleep(max(0.0, t_begin + at - time.perf_counter()))
        t_sched = t_begin + at
        ok, kind, detail = await one_request(http, url, req)
        t1 = time.perf_counter()
        records.append({"t_sched": at, "t1": t1 - t_begin, "latency": t1 - t_sched, "ok": ok, "error": kind,
                        "detail": detail, "steps": req["num_inference_steps"]})

    async with new_client(64) as http:
        t_begin = time.perf_counter()
        await asyncio.gather(*(fire(at, req, http, t_begin) for at, req in schedule))
        t_done = time.perf_counter() - t_begin
    lat = [r["latency"] for r in records if r["ok"]]
    errors: dict[str, int] = {}
    samples: dict[str, list[str]] = {}
    for r in records:
        if not r["ok"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
            samples.setdefault(r["error"], [])
            if len(samples[r["error"]]) < 3:
                samples[r["error"]].append(r["detail"])
    return {
        "requests": len(records),
        "duration_s": duration,
        "finished_after_s": t_done,
        "offered_req_per_s": len(schedule) / duration,
        "p50_s": pct(lat, 0.5),
        "p95_s": pct(lat, 0.95),
        "mean_s": statistics.fmean(lat) if lat else None,
        "max_s": max(lat) if lat else None,
        "ok": len(lat),
        "errors_total": sum(errors.values()),
        "errors": errors,
        "error_samples": samples,
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg(),
        **foreign.share(),
        "records": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "detail"}
                    for r in sorted(records, key=lambda r: r["t_sched"])],
    }


async def warm_up(url: str, prompts: list[str]) -> list[str]:
    """One request per step count, sequentially; returns error kinds (reported, not fatal)."""
    errs = []
    async with new_client(1) as http:
        for s in STEPS:
            ok, kind, detail = await one_request(http, url, {**make_request(random.Random(s), prompts), "num_inference_steps": s})
            if not ok:
                errs.append(f"{kind}: {detail}")
    return errs


# ---------------------------------------------------------------------------------------------
# In-process engine (a plain script: this file with --inprocess)


def inprocess(model_dir: str, requests_path: str) -> None:
    """Replay requests one at a time through Engine.generate_sync; print JSON latencies."""
    from spo_runtime import Settings, load_pipeline
    from spo_runtime.engine import Engine, EngineConfig

    requests = json.loads(Path(requests_path).read_text())
    pipe = load_pipeline(Settings(model="tiny", base_model=model_dir))
    engine = Engine(pipe, EngineConfig(max_queue=256, batching="step")).start()
    try:
        engine.generate_sync([{"prompt": "warm-up", "seed": 0, "num_inference_steps": 2}])
        for s in STEPS:  # same warm-up as the servers get
            engine.generate_sync([{**make_request(random.Random(s), load_prompts()), "num_inference_steps": s}])
        lat = []
        for req in requests:
            t0 = time.perf_counter()
            engine.generate_sync([req])
            lat.append(time.perf_counter() - t0)
    finally:
        engine.stop()
    print(json.dumps({"latencies": lat, "torch_threads": __import__("torch").get_num_threads()}))


def run_inprocess(model_dir: str, requests: list[dict], workdir: Path) -> dict:
    path = workdir / "inprocess_requests.json"
    path.write_text(json.dumps(requests))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "--inprocess", str(path), "--model-dir", model_dir],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60 + 30 * len(requests))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    if proc.returncode != 0:
        raise RuntimeError(f"in-process engine run failed ({proc.returncode}): {err.decode()[-2000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Orchestration


def server_env(key: str, model_dir: str, workdir: Path) -> dict[str, str]:
    spec = SYSTEMS[key]
    if spec["kind"] == "spo":
        data = workdir / f"data-{key}"
        return {"SPO_MODEL": "tiny", "SPO_BASE_MODEL": model_dir, "SPO_BATCHING": spec["batching"],
                "SPO_MAX_QUEUE": "256", "SPO_DATA_DIR": str(data), "SPO_ADAPTER_DIR": str(data / "adapters")}
    return {"SPO_BENCH_MODEL_DIR": model_dir}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import bentoml
    import diffusers
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem, "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "diffusers": diffusers.__version__,
            "bentoml": bentoml.__version__, "hostname": platform.node()}


def fmt(x, spec=".2f", none="-") -> str:
    return none if x is None else format(x, spec)


def err_str(errors: dict) -> str:
    return "0" if not errors else ", ".join(f"{k} x{v}" for k, v in sorted(errors.items()))


def report(res: dict) -> str:
    lines = []
    sysres = res["systems"]
    lines.append(f"\nServing benchmark, {res['date']}, {res['machine']['cpu']}, {res['machine']['cores']} cores, "
                 f"torch {res['machine']['torch']}, diffusers {res['machine']['diffusers']}, bentoml {res['machine']['bentoml']}")
    lines.append(f"tiny preset, 64x64, guidance 5, steps 10/20/30 mixed, closed loop {res['config']['duration']} s "
                 f"(+{res['config']['warmup']} s warm-up) per level, open loop {res['config']['open_duration']} s")
    lines.append("\nClosed loop")
    lines.append(f"{'system':<40} {'clients':>7} {'img/s':>7} {'p50 s':>7} {'p95 s':>7} {'mean s':>7} {'reqs':>5} {'other':>8}  errors")
    for key, r in sorted(sysres.items()):
        for lv in r.get("closed", []):
            lines.append(f"{SYSTEMS[key]['label']:<40} {lv['clients']:>7} {fmt(lv['img_per_s']):>7} {fmt(lv['p50_s']):>7} "
                         f"{fmt(lv['p95_s']):>7} {fmt(lv['mean_s']):>7} {lv['requests_total']:>5} "
                         f"{fmt(lv['other_cpu_s'], '.1f') + 's' + ('*' if lv.get('disturbed') else ' '):>9} "
                         f"{err_str(lv['errors'])}")
        if r.get("failure"):
            lines.append(f"{SYSTEMS[key]['label']:<40} FAILED: {r['failure']}")
    if res.get("open_rate"):
        lines.append(f"\nOpen loop, Poisson {res['open_rate']:.3f} req/s ({res['open_rate_source']}), "
                     f"{res.get('open_requests')} requests, same schedule for every system")
        lines.append(f"{'system':<40} {'p50 s':>7} {'p95 s':>7} {'mean s':>7} {'max s':>7} {'ok':>5} {'other':>8}  errors")
        for key, r in sorted(sysres.items()):
            o = r.get("open")
            if o:
                lines.append(f"{SYSTEMS[key]['label']:<40} {fmt(o['p50_s']):>7} {fmt(o['p95_s']):>7} {fmt(o['mean_s']):>7} "
                             f"{fmt(o['max_s']):>7} {o['ok']:>5} "
                             f"{fmt(o['other_cpu_s'], '.1f') + 's' + ('*' if o.get('disturbed') else ' '):>9} "
                             f"{err_str(o['errors'])}")
    ip = res.get("inprocess")
    if ip:
        lines.append(f"\n(a) at 1 client vs the engine in-process (same {ip['n']} requests, one at a time): "
                     f"HTTP mean {ip['http_mean_s']:.3f} s, in-process mean {ip['engine_mean_s']:.3f} s; "
                     f"p50 {ip['http_p50_s']:.3f} vs {ip['engine_p50_s']:.3f} s; median per-request ratio "
                     f"{ip['per_request_ratio_median']:.2f}; other processes {ip['other_cpu_s']:.1f} CPU s during the "
                     f"in-process run, {res['systems']['a']['closed'][0]['other_cpu_s']:.1f} CPU s during (a) at 1 client")
    lines.append("'other': CPU seconds used by processes outside this benchmark during the level (the machine is shared); "
                 "* = disturbed (over --disturbed-cpu-s or --disturbed share) even after the retries")
    lines.append("\nGoals")
    for g in res["goals"]:
        val = "n/a" if g["value"] is None else f"{g['value']:.2f}"
        met = "n/a" if g["met"] is None else ("met" if g["met"] else "NOT met")
        lines.append(f"  {g['name']}: {val} (goal {g['goal']}) {met}{' - ' + g['note'] if g.get('note') else ''}")
    return "\n".join(lines)


def goals(res: dict) -> list[dict]:
    s = res["systems"]
    out = []

    def closed(key, n):
        for lv in s.get(key, {}).get("closed", []):
            if lv["clients"] == n:
                return lv
        return None

    top = max(res["config"]["clients"], default=None)
    a, c = closed("a", top), closed("c", top)
    ratio = a["img_per_s"] / c["img_per_s"] if a and c and c["img_per_s"] else None
    a_err = a["errors_total"] if a else None
    note = f"(a) errors: {a_err}"
    if a and c and not c["img_per_s"]:
        note += "; (c) completed no image in the window"
    if (a and a.get("disturbed")) or (c and c.get("disturbed")):
        note += "; DISTURBED by other processes"
    out.append({"name": f"closed loop {top} clients, (a)/(c) images/s", "value": ratio, "goal": ">= 1.3 with zero errors for (a)",
                "met": None if ratio is None else (ratio >= 1.3 and a_err == 0), "note": note})
    others = [(k, s[k]["open"]["p95_s"]) for k in ("b", "c", "d") if s.get(k, {}).get("open") and s[k]["open"]["p95_s"] is not None]
    a_open = s.get("a", {}).get("open")
    best = min(others, key=lambda kv: kv[1]) if others else None
    ratio = a_open["p95_s"] / best[1] if a_open and a_open["p95_s"] is not None and best else None
    note = f"best: ({best[0]}) {best[1]:.2f} s" if best else ""
    if any(s.get(k, {}).get("open", {}).get("disturbed") for k in "abcd"):
        note += "; DISTURBED: " + ",".join(k for k in "abcd" if s.get(k, {}).get("open", {}).get("disturbed"))
    out.append({"name": "open loop p95, (a) / best of (b), (c), (d)", "value": ratio, "goal": "<= 0.7",
                "met": None if ratio is None else ratio <= 0.7, "note": note})
    ip = res.get("inprocess")
    ratio = ip["ratio_mean"] if ip else None
    out.append({"name": "1 client, (a) HTTP latency / in-process engine latency (means, same requests)", "value": ratio,
                "goal": "<= 1.1", "met": None if ratio is None else ratio <= 1.1,
                "note": (f"ratio of medians {ip['ratio_p50']:.2f}" + ("; DISTURBED" if ip.get("disturbed") or
                         s["a"]["closed"][0].get("disturbed") else "")) if ip else ""})
    return out


def compact(res: dict) -> dict:
    """The JSON form: each measured request's inputs as [steps, seed, prompt line] instead of the full dict."""
    out = json.loads(json.dumps(res))
    prompts = {p: i for i, p in enumerate(load_prompts())}
    for r in out["systems"].values():
        for lv in r.get("closed", []):
            if lv.get("window_requests") and isinstance(lv["window_requests"][0], dict):
                lv["window_requests"] = [[q["num_inference_steps"], q["seed"], prompts.get(q["prompt"])] for q in lv["window_requests"]]
    return out


def plot(res: dict, path: str) -> None:
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
        line, = ax1.plot(x, y1, marker="o", label=SYSTEMS[key]["label"])
        ax2.plot(x, y2, marker="o", label=SYSTEMS[key]["label"], color=line.get_color())
        bad = [i for i, v in enumerate(lv) if v.get("disturbed")]
        if bad:
            any_disturbed = True
            for ax, y in ((ax1, y1), (ax2, y2)):
                ax.scatter([x[i] for i in bad], [y[i] for i in bad], s=160, facecolors="none", edgecolors="black",
                           linewidths=1.2, zorder=5)
    for ax, ylabel in ((ax1, "throughput (images/s)"), (ax2, "p95 latency (s)")):
        ax.set_xscale("log", base=2)
        if res["config"]["clients"]:
            ax.set_xticks(res["config"]["clients"])
            ax.set_xticklabels([str(c) for c in res["config"]["clients"]])
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax1.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    if any_disturbed:
        ax1.scatter([], [], s=160, facecolors="none", edgecolors="black", label="disturbed by other processes")
    ax1.legend(fontsize=8)
    m = res["machine"]
    fig.suptitle(f"SDXL-shaped tiny model, 64x64, steps 10/20/30 mixed - {m['cpu']}, {m['cores']} cores "
                 f"(shared) - {res['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="a,b,c,d")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--duration", type=float, default=40.0, help="measured seconds per closed-loop level")
    ap.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each closed-loop level")
    ap.add_argument("--open-duration", type=float, default=60.0, help="seconds of Poisson arrivals (0: no open loop)")
    ap.add_argument("--open-rate", type=float, default=None,
                    help="arrivals per second (default: 70%% of (c)'s best closed-loop images/s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--disturbed", type=float, default=0.10,
                    help="a level during which other processes used more than this share of all cores is disturbed")
    ap.add_argument("--disturbed-cpu-s", type=float, default=3.0,
                    help="... or more than this many CPU seconds in all (a short burst stalls a 2-thread OpenMP team)")
    ap.add_argument("--retries", type=int, default=1, help="re-runs of a disturbed level (the least disturbed is kept)")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="before each level wait up to this many seconds for other processes to quiet down (0: no wait)")
    ap.add_argument("--model-dir", default=None, help="a save-tiny directory (default: write one to a temp dir)")
    ap.add_argument("--log-dir", default=None, help="server logs (default: a temp dir, printed)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--from-json", default=None,
                    help="measure nothing: recompute the disturbed flags, table, goals and plot of a saved run")
    ap.add_argument("--inprocess", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.inprocess:
        inprocess(args.model_dir, args.inprocess)
        return

    def disturbed(o: dict) -> bool:
        return o["other_cpu_share"] > args.disturbed or o["other_cpu_s"] > args.disturbed_cpu_s

    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        for r in res["systems"].values():
            for o in r.get("closed", []) + ([r["open"]] if r.get("open") else []):
                o["disturbed"] = disturbed(o)
        if res.get("inprocess"):
            res["inprocess"]["disturbed"] = disturbed(res["inprocess"])
        res["config"].update(disturbed_share=args.disturbed, disturbed_cpu_s=args.disturbed_cpu_s)
        res["goals"] = goals(res)
        print(report(res), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(compact(res), indent=1))
        if args.plot:
            plot(res, args.plot)
        return

    keys = [k.strip() for k in args.systems.split(",") if k.strip()]
    bad = [k for k in keys if k not in SYSTEMS]
    if bad or not keys:
        raise SystemExit(f"--systems: unknown {bad}; choose from {','.join(SYSTEMS)}")
    keys = sorted(set(keys), key=lambda k: (k != "c", keys.index(k)))  # (c) first: it sets the open-loop rate
    clients = [] if args.clients.strip().lower() in ("", "none") else sorted({int(c) for c in args.clients.split(",")})
    prompts = load_prompts()

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)

    workdir = Path(tempfile.mkdtemp(prefix="spo-bench-serving-"))
    log_dir = Path(args.log_dir) if args.log_dir else workdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir
    if not model_dir:
        from spo_runtime import save_tiny

        model_dir = str(workdir / "tiny-model")
        save_tiny(model_dir)
    print(f"model: {model_dir}; server logs: {log_dir}", flush=True)

    res: dict = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "config": {"systems": keys, "clients": clients, "duration": args.duration, "warmup": args.warmup,
                   "open_duration": args.open_duration, "open_fraction": OPEN_FRACTION, "seed": args.seed,
                   "steps": list(STEPS), "guidance_scale": GUIDANCE, "size": SIZE, "prompts": len(prompts),
                   "request_timeout_s": REQUEST_TIMEOUT_S, "spo_max_queue": 256, "disturbed_share": args.disturbed,
                   "disturbed_cpu_s": args.disturbed_cpu_s, "retries": args.retries, "quiet_wait": args.quiet_wait,
                   "adaptive_max_batch_size": int(os.environ.get("SPO_BENCH_MAX_BATCH", "8")),
                   "adaptive_max_latency_ms": int(os.environ.get("SPO_BENCH_MAX_LATENCY_MS", "60000"))},
        "systems": {},
        "loadavg_start": os.getloadavg(),
    }
    schedule = None
    server: Server | None = None

    def measured(run, what: str) -> dict:
        """Run a level after the quiet gate; repeat it while disturbed (bounded); keep the least disturbed."""
        attempts = []
        for i in range(args.retries + 1):
            gate = quiet_gate(args.quiet_wait, args.disturbed) if args.quiet_wait > 0 else None
            if gate and not gate["quiet"]:
                print(f"   {what}: machine still busy after {gate['waited_s']} s (other processes "
                      f"{100 * gate['other_share']:.0f}%, ours {100 * gate['ours_share']:.0f}%); measuring anyway", flush=True)
            out = run()
            out["quiet_gate"] = gate
            attempts.append(out)
            if not disturbed(out) or i == args.retries:
                break
            print(f"   {what}: disturbed (other processes used {out['other_cpu_s']:.1f} CPU s, "
                  f"{100 * out['other_cpu_share']:.0f}% of the CPU); repeating", flush=True)
        best = min(attempts, key=lambda o: o["other_cpu_s"])
        best["disturbed"] = disturbed(best)
        best["discarded_attempts"] = [{k: v for k, v in o.items() if k not in ("records", "window_requests", "window_latencies")}
                                      for o in attempts if o is not best]
        return best

    try:
        for key in keys:
            spec = SYSTEMS[key]
            r = res["systems"][key] = {"label": spec["label"], "target": spec["target"], "closed": []}
            print(f"\n== {spec['label']}: starting {spec['target']}", flush=True)
            server = Server(spec["target"], server_env(key, model_dir, workdir), log_dir / f"{key}.log")
            t0 = time.perf_counter()
            try:
                server.start()
            except Exception as e:
                r["failure"] = f"start: {type(e).__name__}: {e}"
                print(f"   {r['failure']}", flush=True)
                server.stop()
                server = None
                continue
            r["startup_s"] = time.perf_counter() - t0
            url = server.url + "/generate"
            r["warmup_errors"] = asyncio.run(warm_up(url, prompts))
            print(f"   ready in {r['startup_s']:.1f} s; warm-up errors: {r['warmup_errors'] or 0}", flush=True)
            for n in clients:
                lv = measured(lambda: asyncio.run(closed_loop(url, n, args.warmup, args.duration, args.seed, prompts)),
                              f"closed {n} clients")
                r["closed"].append(lv)
                print(f"   closed {n:>2} clients: {lv['img_per_s']:.2f} img/s, p50 {fmt(lv['p50_s'])} s, "
                      f"p95 {fmt(lv['p95_s'])} s, {lv['requests_total']} requests, errors {err_str(lv['errors'])}, "
                      f"other processes {100 * lv['other_cpu_share']:.0f}% CPU", flush=True)
            if args.open_duration > 0:
                if schedule is None:
                    if args.open_rate:
                        rate, source = args.open_rate, "--open-rate"
                    elif res["systems"].get("c", {}).get("closed"):
                        best = max(lv["img_per_s"] for lv in res["systems"]["c"]["closed"])
                        rate, source = OPEN_FRACTION * best, f"70% of (c)'s best closed-loop {best:.3f} img/s"
                    else:
                        rate, source = 0.6, "fallback 0.6 req/s: (c) not measured in this run"
                    if rate <= 0:
                        rate, source = 0.6, "fallback 0.6 req/s: (c) completed no image"
                    schedule = open_schedule(rate, args.open_duration, args.seed, prompts)
                    res.update(open_rate=rate, open_rate_source=source, open_requests=len(schedule))
                    print(f"   open loop: {rate:.3f} req/s ({source}), {len(schedule)} arrivals", flush=True)
                o = r["open"] = measured(lambda: asyncio.run(open_loop(url, schedule, args.open_duration)), "open loop")
                print(f"   open loop: p50 {fmt(o['p50_s'])} s, p95 {fmt(o['p95_s'])} s, {o['ok']}/{o['requests']} ok, "
                      f"errors {err_str(o['errors'])}, other processes {100 * o['other_cpu_share']:.0f}% CPU", flush=True)
            server.stop()
            server = None
            if key == "a" and 1 in clients:
                lv = r["closed"][clients.index(1)]
                pairs = [(q, l) for q, l in zip(lv["window_requests"], lv["window_latencies"]) if l is not None]
                if pairs:
                    print("   in-process engine, same 1-client request sequence ...", flush=True)
                    http = [l for _, l in pairs]

                    def engine_run() -> dict:
                        foreign = ForeignCpu()
                        ip = run_inprocess(model_dir, [q for q, _ in pairs], workdir)
                        eng = ip["latencies"]
                        return {
                            "n": len(eng), "http_mean_s": statistics.fmean(http), "engine_mean_s": statistics.fmean(eng),
                            "http_p50_s": pct(http, 0.5), "engine_p50_s": pct(eng, 0.5),
                            "ratio_mean": statistics.fmean(http) / statistics.fmean(eng),
                            "ratio_p50": pct(http, 0.5) / pct(eng, 0.5),
                            "per_request_ratio_median": statistics.median(h / e for h, e in zip(http, eng)),
                            "engine_latencies": [round(x, 4) for x in eng], "engine_torch_threads": ip["torch_threads"],
                            **foreign.share(),
                        }

                    res["inprocess"] = measured(engine_run, "in-process engine")
                    print(f"   in-process mean {res['inprocess']['engine_mean_s']:.3f} s vs HTTP "
                          f"{res['inprocess']['http_mean_s']:.3f} s: ratio {res['inprocess']['ratio_mean']:.2f}", flush=True)
    except KeyboardInterrupt:
        res["interrupted"] = True
        print("\ninterrupted: stopping servers", flush=True)
    finally:
        if server is not None:
            server.stop()
    res["loadavg_end"] = os.getloadavg()
    res["goals"] = goals(res)
    print(report(res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(compact(res), indent=1))
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(res, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
