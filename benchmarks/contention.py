"""Contention: the same open-loop schedule with and without two busy processes on the machine's cores,
for each torch/OpenMP thread setting of the server; prints the p95 ratio (busy / quiet).

    python benchmarks/contention.py [--configs default,t1,t2-passive] [--load 0.35] [--duration 60] [--tag contention]

For each config a `bentoml serve` (tests/server.py's Server, tiny preset) starts with that setting, warms
up, and runs
  1. a capacity probe (first config only, unless --rate): 8 closed-loop clients for --probe-s seconds;
     the schedule's rate is --load x that capacity (images/s), so every config sees the same arrivals;
  2. the open loop (Poisson arrivals, steps 10/20/30, 64x64; benchmarks/loadgen.py) on the machine as it is;
  3. the same schedule again while --busy processes (`python -c "while True: pass"`, one per core by
     default) keep every core busy; they are stopped (by pid) right after.
Each run records the CPU that other processes used meanwhile (benchmarks/cpu.py; our busy processes
count as ours), so a figure measured on a shared machine says how shared it was.

Configs: default (torch's threads: one per core, OpenMP's default wait policy), t1 (SPO_TORCH_THREADS=1),
t2-passive (2 threads, OMP_WAIT_POLICY=PASSIVE: idle OpenMP workers sleep instead of spinning),
t<N>[-passive] in general. Goal (benchmarks/RESULTS.md): busy / quiet p95 <= 3 at 35% of quiet capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from cpu import ForeignCpu  # noqa: E402
from loadgen import Workload, closed_loop, load_prompts, open_loop, poisson_schedule, warm_up  # noqa: E402
from report import closed_summary, dumps, machine, open_summary, rounded  # noqa: E402
from server import Server  # noqa: E402

RESULTS_DIR = HERE / "results"
BUSY = "while True: pass"


def config_env(name: str) -> dict[str, str]:
    """A config's name -> the server's environment."""
    if name == "default":
        return {}
    m = re.fullmatch(r"t(\d+)(-passive)?", name)
    if not m:
        raise SystemExit(f"--configs: unknown {name!r} (default, t1, t2, t2-passive, ...)")
    env = {"SPO_TORCH_THREADS": m.group(1)}
    if m.group(2):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def start_busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait(10)


def run_open(url: str, schedule, duration: float) -> dict:
    foreign, load0 = ForeignCpu(), os.getloadavg()
    records = [dataclasses.asdict(r) for r in asyncio.run(open_loop(url + "/generate", schedule))]
    return {**open_summary(records, duration), **foreign.share(), "loadavg_before": load0, "loadavg_after": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="default,t1,t2-passive")
    ap.add_argument("--load", type=float, default=0.35, help="share of the first config's quiet capacity (images/s)")
    ap.add_argument("--rate", type=float, default=None, help="arrivals per second (default: from --load)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per run")
    ap.add_argument("--probe-s", type=float, default=20.0)
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy processes (default: one per core)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default=None, help="write the summary to <results-dir>/<tag>.json")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    envs = {c: config_env(c) for c in configs}
    workload = Workload(load_prompts())
    workdir = Path(tempfile.mkdtemp(prefix="spo-contention-"))
    res: dict = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(),
                 "command": " ".join(["benchmarks/contention.py", *sys.argv[1:]]),
                 "config": {"configs": configs, "load": args.load, "duration": args.duration, "busy": args.busy,
                            "steps": list(workload.steps), "size": workload.size, "seed": args.seed},
                 "runs": {}}
    print(f"server logs: {workdir}", flush=True)

    def on_term(signum, frame):  # a timeout's SIGTERM: stop the servers and busy processes on the way out
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)

    def write() -> None:  # after every config, so an interrupted run keeps what it measured
        if args.tag:
            path = Path(args.results_dir) / f"{args.tag}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dumps(rounded(res)) + "\n")

    schedule, rate = None, args.rate
    for c in configs:
        server = Server({"SPO_DATA_DIR": str(workdir / c), "SPO_MAX_QUEUE": "512", **envs[c]}, workdir / f"{c}.log")
        busy: list[subprocess.Popen] = []
        try:
            server.start(timeout=300)
            asyncio.run(warm_up(server.url + "/generate", workload))
            out = res["runs"][c] = {"env": envs[c]}
            if rate is None:
                recs = [dataclasses.asdict(r) for r in asyncio.run(closed_loop(server.url + "/generate", workload, 8, 5 + args.probe_s, args.seed))]
                probe = closed_summary(recs, 8, 5, args.probe_s, workload.steps)
                out["capacity_img_per_s"] = probe["img_per_s"]
                rate = args.load * probe["img_per_s"]
                print(f"{c}: quiet capacity {probe['img_per_s']:.2f} images/s -> {rate:.2f} arrivals/s", flush=True)
            if schedule is None:
                schedule = poisson_schedule(rate, args.duration, args.seed, workload)
                res["config"].update(rate=rate, requests=len(schedule))
            out["quiet"] = run_open(server.url, schedule, args.duration)
            busy = start_busy(args.busy)
            time.sleep(1.0)
            out["busy"] = run_open(server.url, schedule, args.duration)
            stop_busy(busy)
            q, b = out["quiet"], out["busy"]
            out["p95_ratio"] = b["p95_s"] / q["p95_s"] if q["p95_s"] and b["p95_s"] else None
            print(f"{c}: quiet p50/p95 {q['p50_s']:.2f}/{q['p95_s']:.2f} s ({q['errors_total']} errors, other "
                  f"processes {100 * q['other_cpu_share']:.0f}%); busy {b['p50_s']:.2f}/{b['p95_s']:.2f} s "
                  f"({b['errors_total']} errors, other {100 * b['other_cpu_share']:.0f}%); p95 ratio "
                  f"{out['p95_ratio']:.2f}", flush=True)
            write()
        finally:
            stop_busy(busy)
            server.stop()
    print("\nconfig       quiet p95   busy p95   ratio   (same schedule: %.2f arrivals/s, %d requests)" % (rate, len(schedule)))
    for c, out in res["runs"].items():
        if "busy" in out:
            print(f"{c:12s} {out['quiet']['p95_s']:8.2f} s {out['busy']['p95_s']:8.2f} s {out['p95_ratio']:7.2f}")
    if args.tag:
        write()
        print(f"wrote {Path(args.results_dir) / f'{args.tag}.json'}")


if __name__ == "__main__":
    main()
