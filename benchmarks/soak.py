"""Soak: an open-loop mix at a fixed share of the capacity measured first, for a long time, watching the
worker process for growth.

    python benchmarks/soak.py --duration 30m [--load 0.7] [--sample-s 10] [--tag soak_30m]
    make soak DURATION=30m

It starts `bentoml serve` (tests/server.py's Server: tiny preset, a fresh data directory, an admin token,
SPO_TORCH_THREADS=--threads) unless --url names a running server on this host (then --token is its admin
token), and
  1. warms up (one request per step count);
  2. measures capacity: --probe-clients closed-loop clients sending the mix's image requests for
     --probe-s seconds; capacity = images completed per second;
  3. runs the mix for --duration: Poisson arrivals of /generate (80%) and /generate_batch (20%, n = 2..4),
     steps 4/8/16, 64x64, at --load x capacity in images per second; a default LoRA scale change every
     --admin-every-s seconds; one small SPO training job submitted at the start (it must complete);
  4. samples the worker process (the pid /info reports) every --sample-s seconds: RSS, open file
     descriptors, threads, and the device memory the server's /metrics reports (GPU only).
After a warm-up (--warmup, default: 5 minutes, or a third of runs shorter than 15 minutes) it prints the
growth per 10 minutes of each (least-squares slope), the first and last values, and every error by kind.
Goals (benchmarks/RESULTS.md): zero errors, RSS growth under 1% per 10 minutes, fds and threads flat.

The summary (samples included, no per-request data) goes to benchmarks/results/<tag>.json with --tag.
Every request stays on loopback; arrivals are bounded by loadgen.MAX_ARRIVALS and the duration.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
import httpx  # noqa: E402
import psutil  # noqa: E402
from cpu import ForeignCpu  # noqa: E402
from loadgen import PNG_MAGIC, arrival_times, load_prompts, new_client  # noqa: E402
from report import dumps, latency_stats, machine, pct, rounded  # noqa: E402

RESULTS_DIR = HERE / "results"
TOKEN = "soak-admin-token"
STEPS = (4, 8, 16)
BATCH_SHARE = 0.2  # of arrivals: /generate_batch with n drawn from BATCH_N
BATCH_N = (2, 3, 4)
IMAGES_PER_ARRIVAL = (1 - BATCH_SHARE) + BATCH_SHARE * statistics.fmean(BATCH_N)
TRAIN_CONFIG = {"scorer": "brightness", "num_inference_steps": 2, "chunk": 2, "train_t_max": 999, "threshold": 0.0,
                "rank": 2, "alpha": 2, "targets": ["to_q"], "width": 32, "height": 32, "prompts_per_round": 1,
                "micro_batch": 8, "grad_accum": 1, "max_rounds": 4, "checkpoint_every": 2}
MB = 2**20


def parse_duration(text: str) -> float:
    """'30m', '60s', '1h', '90' (seconds) -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"a duration like 60s, 30m or 1h, got {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


# -- the requests -----------------------------------------------------------------------------------


def mix_request(rng: random.Random, prompts: list[str]) -> tuple[str, dict, int]:
    """(route, body, images) of one arrival of the mix."""
    body = {"prompt": rng.choice(prompts), "num_inference_steps": rng.choice(STEPS), "seed": rng.randrange(2**31),
            "guidance_scale": 5.0, "width": 64, "height": 64}
    if rng.random() < BATCH_SHARE:
        n = rng.choice(BATCH_N)
        return "/generate_batch", {**body, "n": n}, n
    return "/generate", body, 1


async def post(http: httpx.AsyncClient, url: str, route: str, body: dict, headers=None) -> tuple[bool, str | None, str | None]:
    try:
        r = await http.post(url + route, json=body, headers=headers)
    except Exception as e:  # the client's exception is an error of the system under test
        return False, type(e).__name__, str(e)[:300]
    if r.status_code != 200:
        return False, f"http_{r.status_code}", r.text[:300]
    if route == "/generate" and not r.content.startswith(PNG_MAGIC):
        return False, "not_png", r.content[:100].decode("latin-1")
    if route == "/generate_batch" and len(r.json().get("images", [])) != body["n"]:
        return False, "short_batch", r.text[:300]
    return True, None, None


async def probe_capacity(url: str, prompts: list[str], clients: int, seconds: float, seed: int) -> dict:
    """Closed loop over the mix: images completed per second, and the errors."""
    images, errors, lat = 0, {}, []
    t_end = time.perf_counter() + seconds

    async def client(i: int, http) -> None:
        nonlocal images
        rng = random.Random(f"probe-{seed}-{i}")
        while time.perf_counter() < t_end:
            route, body, n = mix_request(rng, prompts)
            t0 = time.perf_counter()
            ok, kind, _ = await post(http, url, route, body)
            if ok and time.perf_counter() <= t_end:
                images += n
                lat.append(time.perf_counter() - t0)
            elif not ok:
                errors[kind] = errors.get(kind, 0) + 1
                await asyncio.sleep(0.1)

    t0 = time.perf_counter()
    async with new_client(clients) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    return {"clients": clients, "seconds": seconds, "images": images, "img_per_s": images / seconds,
            "p50_s": pct(lat, 0.5), "errors": errors, "wall_s": time.perf_counter() - t0}


# -- sampling ------------------------------------------------------------------------------------------


def metrics_values(url: str, prefix: str) -> dict[str, float]:
    out = {}
    try:
        for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(prefix):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
    except (httpx.HTTPError, ValueError):
        pass
    return out


def sample(proc: psutil.Process, url: str, t: float) -> dict:
    with proc.oneshot():
        rss, fds, threads = proc.memory_info().rss, proc.num_fds(), proc.num_threads()
    m = metrics_values(url, "spo_")
    dev = sum(v for k, v in m.items() if k.startswith("spo_device_memory_allocated_bytes"))
    return {"t": round(t, 1), "rss_mb": round(rss / MB, 2), "fds": fds, "threads": threads,
            "device_mb": round(dev / MB, 1) if any(k.startswith("spo_device_memory_allocated_bytes") for k in m) else None,
            "queue": m.get("spo_queue_depth"), "running": m.get("spo_running_images")}


def slope_per_10min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) pairs, per 600 s."""
    if len(points) < 3:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return None if sxx == 0 else 600 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def growth(samples: list[dict], warmup: float) -> dict:
    """Per quantity, after the warm-up: first, last, min, max, slope per 10 minutes over the whole window
    and over its last 10 minutes (when the window is at least 20 minutes long: a quantity that grows and
    then levels off shows it there), and for RSS each slope as a % of the window's first value."""
    after = [s for s in samples if s["t"] >= warmup]
    out = {"samples_after_warmup": len(after)}
    for key in ("rss_mb", "fds", "threads", "device_mb"):
        pts = [(s["t"], s[key]) for s in after if s.get(key) is not None]
        if not pts:
            out[key] = None
            continue
        vals = [v for _, v in pts]
        g = {"first": vals[0], "last": vals[-1], "min": min(vals), "max": max(vals), "per_10min": slope_per_10min(pts)}
        if pts[-1][0] - pts[0][0] >= 1200:
            g["per_10min_last10"] = slope_per_10min([p for p in pts if p[0] >= pts[-1][0] - 600])
        if key == "rss_mb":
            for k in ("per_10min", "per_10min_last10"):
                if g.get(k) is not None:
                    g[k + "_pct"] = 100 * g[k] / vals[0]
        out[key] = g
    return out


# -- the soak ------------------------------------------------------------------------------------------


async def soak(url: str, token: str, pid: int, duration: float, load: float, capacity: float, sample_s: float,
               admin_every_s: float, train: bool, prompts: list[str], seed: int, log=print, idle_wait_s: float = 3.0) -> dict:
    """The open-loop mix for `duration` seconds at `load` x `capacity` images/s, with samples."""
    auth = {"Authorization": f"Bearer {token}"}
    rate = load * capacity / IMAGES_PER_ARRIVAL  # arrivals per second
    rng = random.Random(f"soak-{seed}")
    schedule = [(t, *mix_request(rng, prompts)) for t in arrival_times(rng, rate, duration)]
    proc = psutil.Process(pid)
    records: list[dict] = []
    samples: list[dict] = []
    admin = {"ok": 0, "errors": {}}
    job: dict = {}
    t_begin = time.perf_counter()
    done = asyncio.Event()

    async def fire(at: float, route: str, body: dict, n: int, http) -> None:
        await asyncio.sleep(max(0.0, t_begin + at - time.perf_counter()))
        ok, kind, detail = await post(http, url, route, body)
        t1 = time.perf_counter() - t_begin
        records.append({"t0": at, "latency": t1 - at, "ok": ok, "error": kind, "detail": detail, "route": route, "n": n})

    async def sampler() -> None:
        while not done.is_set():
            samples.append(await asyncio.to_thread(sample, proc, url, time.perf_counter() - t_begin))
            s = samples[-1]
            if len(samples) % max(1, int(60 / sample_s)) == 0:
                log(f"   t={s['t']:7.0f}s rss {s['rss_mb']:.1f} MB, fds {s['fds']}, threads {s['threads']}, "
                    f"queue {s['queue']}, done {len(records)}/{len(schedule)}, errors {sum(not r['ok'] for r in records)}")
            try:
                await asyncio.wait_for(done.wait(), sample_s)
            except asyncio.TimeoutError:
                pass

    async def admin_changes(http) -> None:
        scales, i = (1.0, 0.8, 0.9), 0
        while not done.is_set() and time.perf_counter() - t_begin < duration:
            try:
                await asyncio.wait_for(done.wait(), admin_every_s)
                return
            except asyncio.TimeoutError:
                pass
            i += 1
            try:
                r = await http.post(url + "/admin/lora_scale", json={"scale": scales[i % len(scales)]}, headers=auth)
                kind = None if r.status_code == 200 else f"http_{r.status_code}"
            except Exception as e:
                kind = type(e).__name__
            if kind is None:
                admin["ok"] += 1
            else:
                admin["errors"][kind] = admin["errors"].get(kind, 0) + 1

    async def training(http) -> None:
        t0 = time.perf_counter()
        try:
            r = await http.post(url + "/train/submit", headers=auth,
                                json={"prompts": ["a fox", "a castle"], "output_adapter": "soak", "config": TRAIN_CONFIG})
            r.raise_for_status()
            job["job_id"] = r.json()["job_id"]
            while True:
                rec = (await http.get(url + "/train/status", params={"job_id": job["job_id"]}, headers=auth)).json()
                if rec["state"] in ("completed", "failed", "canceled"):
                    break
                if time.perf_counter() - t_begin > duration + 600:
                    rec = {**rec, "state": "timed_out"}
                    break
                await asyncio.sleep(1.0)
            job.update(state=rec["state"], error=rec.get("error"), rounds=rec.get("round"), seconds=time.perf_counter() - t0)
        except Exception as e:
            job.update(state="error", error=f"{type(e).__name__}: {e}")

    foreign = ForeignCpu()
    load0 = os.getloadavg()
    # open descriptors count the clients' connections, and idle workers come and go with the load: the
    # fair comparison is the idle worker before the mix against the idle worker after it
    idle_before = await asyncio.to_thread(sample, proc, url, 0.0)
    async with new_client(64) as http:
        side = [asyncio.create_task(sampler()), asyncio.create_task(admin_changes(http))]
        if train:
            side.append(asyncio.create_task(training(http)))
        await asyncio.gather(*(fire(at, route, body, n, http) for at, route, body, n in schedule))
        if train:
            await side[2]
        samples.append(await asyncio.to_thread(sample, proc, url, time.perf_counter() - t_begin))
        done.set()
        await asyncio.gather(*side[:2])
    await asyncio.sleep(idle_wait_s)  # the server closes the connections the client closed
    idle_after = await asyncio.to_thread(sample, proc, url, time.perf_counter() - t_begin)
    errors: dict[str, int] = {}
    details: dict[str, list[str]] = {}
    for r in records:
        if not r["ok"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
            d = details.setdefault(r["error"], [])
            if len(d) < 3 and r["detail"] not in d:
                d.append(r["detail"])
    for kind, n in admin["errors"].items():
        errors[f"admin_{kind}"] = errors.get(f"admin_{kind}", 0) + n
    if train and job.get("state") != "completed":
        errors["train_job"] = 1
        details["train_job"] = [str(job.get("error") or job.get("state"))]
    lat = [r["latency"] for r in records if r["ok"]]
    return {
        "duration_s": duration, "load": load, "capacity_img_per_s": capacity, "arrivals_per_s": rate,
        "requests": len(records), "images": sum(r["n"] for r in records if r["ok"]),
        "finished_after_s": time.perf_counter() - t_begin, **latency_stats(lat),
        "errors_total": sum(errors.values()), "errors": errors, "error_samples": details,
        "admin_changes_ok": admin["ok"], "train_job": job, "samples": samples,
        "idle_before": idle_before, "idle_after": idle_after,
        "loadavg_before": load0, "loadavg_after": os.getloadavg(), **foreign.share(),
    }


def start_server(workdir: Path, threads: int | None, extra_env: dict | None = None):
    from server import Server

    env = {"SPO_DATA_DIR": str(workdir / "data"), "SPO_ADMIN_TOKEN": TOKEN, "SPO_MAX_QUEUE": "512",
           **({"SPO_TORCH_THREADS": str(threads)} if threads else {}), **(extra_env or {})}
    return Server(env, workdir / "server.log").start(timeout=300)


def run(duration: float, load: float = 0.7, sample_s: float = 10.0, warmup: float | None = None, probe_s: float = 20.0,
        probe_clients: int = 8, admin_every_s: float = 10.0, train: bool = True, threads: int | None = 1,
        url: str | None = None, token: str | None = None, seed: int = 0, workdir: Path | None = None, log=print,
        server_env: dict | None = None, warm: bool = True, idle_wait_s: float = 3.0) -> dict:
    """The whole soak; returns its result (samples included). warm=False: no warm-up requests (the
    server has served already)."""
    from loadgen import Workload, warm_up

    if warmup is None:
        warmup = 300.0 if duration >= 900 else duration / 3
    prompts = load_prompts()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="spo-soak-"))
    server = None
    if url is None:
        server = start_server(workdir, threads, server_env)
        url, token = server.url, TOKEN
        log(f"server {url}; log {workdir / 'server.log'}")
    try:
        # the pid is for the admin token only (/info shows callers without it no pids)
        pid = httpx.get(url + "/info", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()["pid"]
        errs = asyncio.run(warm_up(url + "/generate", Workload(prompts, steps=STEPS))) if warm else []
        probe = asyncio.run(probe_capacity(url, prompts, probe_clients, probe_s, seed))
        log(f"capacity: {probe['img_per_s']:.2f} images/s ({probe_clients} clients, {probe_s:.0f} s); "
            f"mix at {load:.0%}: {load * probe['img_per_s'] / IMAGES_PER_ARRIVAL:.2f} arrivals/s for {duration:.0f} s")
        if probe["img_per_s"] <= 0:
            raise SystemExit(f"capacity probe completed no image: {probe}")
        res = asyncio.run(soak(url, token, pid, duration, load, probe["img_per_s"], sample_s, admin_every_s, train,
                               prompts, seed, log=log, idle_wait_s=idle_wait_s))
    finally:
        if server is not None:
            server.stop()
    res.update(warmup_s=warmup, probe=probe, warmup_errors=errs, growth=growth(res["samples"], warmup),
               worker_pid=pid, server_torch_threads=threads, server_env=server_env or {})
    return res


def report(res: dict) -> str:
    g = res["growth"]
    lines = [f"soak: {res['duration_s']:.0f} s at {res['load']:.0%} of {res['capacity_img_per_s']:.2f} images/s "
             f"({res['arrivals_per_s']:.2f} arrivals/s): {res['requests']} requests, {res['images']} images, "
             f"p50 {res['p50_s'] or 0:.2f} s, p95 {res['p95_s'] or 0:.2f} s, max {res['max_s'] or 0:.2f} s; "
             f"{res['admin_changes_ok']} scale changes; training job: {res['train_job'].get('state', 'none')} "
             f"({res['train_job'].get('seconds', 0):.0f} s)",
             f"errors: {res['errors_total']} {res['errors'] or ''} {res['error_samples'] or ''}".rstrip(),
             f"after the {res['warmup_s']:.0f} s warm-up ({g['samples_after_warmup']} samples):"]
    for key, unit in (("rss_mb", "MB"), ("fds", ""), ("threads", ""), ("device_mb", "MB")):
        v = g.get(key)
        if v is None:
            lines.append(f"  {key:9s} n/a")
            continue
        per, last = v["per_10min"], v.get("per_10min_last10")
        extra = f" ({v['per_10min_pct']:+.2f}%)" if "per_10min_pct" in v else ""
        if last is not None:
            extra += f"; over the last 10 min {last:+.2f}{unit}" + (f" ({v['per_10min_last10_pct']:+.2f}%)" if "per_10min_last10_pct" in v else "")
        lines.append(f"  {key:9s} first {v['first']:g}{unit}, last {v['last']:g}{unit}, min {v['min']:g}, max {v['max']:g}; "
                     f"per 10 min {'n/a' if per is None else f'{per:+.2f}{unit}'}{extra}")
    a, b = res["idle_before"], res["idle_after"]
    lines.append(f"  idle worker before -> after the mix: rss {a['rss_mb']:g} -> {b['rss_mb']:g} MB, fds {a['fds']} -> "
                 f"{b['fds']}, threads {a['threads']} -> {b['threads']}")
    lines.append(f"other processes used {res['other_cpu_s']:.0f} CPU-s ({100 * res['other_cpu_share']:.0f}% of the "
                 f"machine); load average {res['loadavg_before'][0]:.1f} -> {res['loadavg_after'][0]:.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=parse_duration, default=parse_duration("30m"), help="the mix's length (60s, 30m, 1h)")
    ap.add_argument("--load", type=float, default=0.7, help="share of the measured capacity (images/s)")
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--warmup", type=parse_duration, default=None, help="unmeasured start (default: 5m, or duration/3 under 15m)")
    ap.add_argument("--probe-s", type=float, default=20.0, help="seconds of the capacity probe")
    ap.add_argument("--probe-clients", type=int, default=8)
    ap.add_argument("--admin-every-s", type=float, default=10.0)
    ap.add_argument("--no-train", action="store_true", help="no training job")
    ap.add_argument("--threads", type=int, default=1, help="SPO_TORCH_THREADS of the server it starts (0: torch's default)")
    ap.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment of the server it starts (repeatable), e.g. MALLOC_ARENA_MAX=2")
    ap.add_argument("--url", default=None, help="a running server on this host (default: start one)")
    ap.add_argument("--token", default=os.environ.get("SPO_ADMIN_TOKEN"), help="its admin token (with --url)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default=None, help="write the summary to <results-dir>/<tag>.json")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    ap.add_argument("--resummarize", default=None, metavar="JSON",
                    help="measure nothing: recompute the growth figures of a written summary from its samples")
    args = ap.parse_args()
    if args.resummarize:
        path = Path(args.resummarize)
        res = json.loads(path.read_text())
        res["growth"] = growth(res["samples"], res["warmup_s"])
        path.write_text(dumps(rounded(res)) + "\n")
        print(report(res))
        return
    if args.url and not args.token:
        raise SystemExit("--url needs --token (or SPO_ADMIN_TOKEN)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def on_term(signum, frame):  # a timeout's SIGTERM: stop the server on the way out
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = datetime.datetime.now().astimezone()
    res = run(args.duration, args.load, args.sample_s, args.warmup, args.probe_s, args.probe_clients, args.admin_every_s,
              not args.no_train, args.threads or None, args.url, args.token, args.seed, log=lambda m: print(m, flush=True),
              server_env=dict(kv.split("=", 1) for kv in args.server_env))
    res = {"date": started.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(),
           "command": " ".join(["benchmarks/soak.py", *sys.argv[1:]]), **res}
    print(report(res))
    if args.tag:
        out = Path(args.results_dir) / f"{args.tag}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(dumps(rounded(res)) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
