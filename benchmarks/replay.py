"""Replay requests one at a time through spo_runtime's Engine in a plain process: the cost of no HTTP.

    python benchmarks/replay.py --model-dir SAVE_TINY_DIR REQUESTS.json

REQUESTS.json: {"warmup": [request, ...], "requests": [request, ...]} (the bodies of POST /generate).
Prints one JSON line: {"latencies": [s, ...], "torch_threads": n}. bench_serving.py runs it through
run_replay() on the requests (a) served at 1 client, so both sides see the same requests after the
same warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def replay(model_dir: str, warmup: list[dict], requests: list[dict]) -> dict:
    import torch

    from spo_runtime import Settings, load_pipeline
    from spo_runtime.engine import Engine, EngineConfig

    pipe = load_pipeline(Settings(model="tiny", base_model=model_dir))
    engine = Engine(pipe, EngineConfig(max_queue=256, batching="step")).start()
    try:
        engine.generate_sync([{"prompt": "warm-up", "seed": 0, "num_inference_steps": 2}])
        for req in warmup:
            engine.generate_sync([req])
        lat = []
        for req in requests:
            t0 = time.perf_counter()
            engine.generate_sync([req])
            lat.append(time.perf_counter() - t0)
    finally:
        engine.stop()
    return {"latencies": lat, "torch_threads": torch.get_num_threads()}


def run_replay(model_dir: str, warmup: list[dict], requests: list[dict], workdir: Path) -> dict:
    """This file as a subprocess (its own session, killed with its children on the way out)."""
    path = Path(workdir) / "replay_requests.json"
    path.write_text(json.dumps({"warmup": warmup, "requests": requests}))
    proc = subprocess.Popen([sys.executable, __file__, "--model-dir", model_dir, str(path)], cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60 + 30 * len(requests))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    if proc.returncode != 0:
        raise RuntimeError(f"in-process replay failed ({proc.returncode}): {err.decode()[-2000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="a save-tiny directory")
    ap.add_argument("requests", help="JSON file: {'warmup': [...], 'requests': [...]}")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = json.loads(Path(args.requests).read_text())
    print(json.dumps(replay(args.model_dir, spec.get("warmup", []), spec["requests"])))


if __name__ == "__main__":
    main()
