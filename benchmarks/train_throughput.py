"""SPO training throughput for the GPU suite's `train` section: seconds per round and kept pairs per
second at the paper's effective batch (16 pairs per optimiser step, micro-batch 2), the base in the
suite's dtype with the LoRA in fp32; 1 rank in process (gradient checkpointing on, then off), and N
ranks through `python -m spo_runtime train --nproc N` when the machine has N > 1 GPUs (`--smoke`: 2
gloo ranks on the CPU, the same code path).

Every pair is kept (threshold 0), so every round trains its full 16 transitions per prompt; a warm-up
round comes first, the second round is timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a photo of a fox in the snow", "a castle at dusk", "an owl on a branch", "a red car in the rain",
           "a portrait of an old sailor", "a city at night", "a bowl of ramen", "a lighthouse in a storm"]


def paper_config(steps: int, size: int, dtype: str, **kw) -> dict:
    return dict(num_inference_steps=steps, width=size, height=size, prompts_per_round=2, effective_batch=16, micro_batch=2,
                max_rounds=2, scorer="spm", threshold=0.0, checkpoint_every=100,
                mixed_precision={"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "no"), **kw)


def one_rank(settings, steps: int, size: int, dtype: str, checkpointing: bool, peak_reset, peak_gib, release) -> dict:
    from spo_runtime import load_pipeline
    from spo_runtime.training.config import TrainConfig
    from spo_runtime.training.trainer import SPOTrainer

    pipe = tr = None
    try:
        pipe = load_pipeline(settings.model_copy(update={"lora_fuse": False}))
        cfg = TrainConfig(**paper_config(steps, size, dtype, gradient_checkpointing=checkpointing))
        tr = SPOTrainer(pipe, cfg, PROMPTS, tempfile.mkdtemp())
        tr.run_round()  # warm-up
        peak_reset(pipe.device)
        st = tr.run_round()
        return {"ranks": 1, "round_s": st["seconds"], "pairs": st["transitions"], "pairs_per_s": st["pairs_per_s"],
                "pairs_per_step": st["pairs_per_step"], "optimizer_steps": st["optimizer_steps"], "loss": st["loss"],
                "peak_gib": peak_gib(pipe.device), "lora_dtype": str(tr.params[0].dtype).removeprefix("torch."),
                "base_dtype": str(pipe.dtype).removeprefix("torch."), "grad_scaler": tr.scaler.is_enabled()}
    except torch.cuda.OutOfMemoryError as e:
        return {"oom": str(e).splitlines()[0]}
    finally:
        pipe = tr = None
        release()


def n_ranks(env: dict, nproc: int, steps: int, size: int, dtype: str, timeout_s: float) -> dict:
    """`python -m spo_runtime train --nproc N` (the CLI's data-parallel path), 2 rounds; round 2 timed."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        cfg = paper_config(steps, size, dtype, gradient_checkpointing=True)
        cmd = [sys.executable, "-m", "spo_runtime", "train", "--prompts", f"{d}/prompts.txt", "--output", f"{d}/run",
               "--nproc", str(nproc), "--config", *[f"{k}={json.dumps(v)}" for k, v in cfg.items()]]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            return {"ranks": nproc, "error": (r.stderr or r.stdout).strip().splitlines()[-1][:500]}
        rounds = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{") and '"round"' in line]
        st = rounds[-1]
        return {"ranks": nproc, "round_s": st["seconds"], "pairs": st["transitions"], "pairs_per_s": st["pairs_per_s"],
                "pairs_per_step": st["pairs_per_step"], "world_size": st["world_size"], "optimizer_steps": st["optimizer_steps"],
                "loss": st["loss"], "wall_s_with_start": wall}


def train_section(args, steps: int, size: int, settings_for, peak_reset, peak_gib, release) -> dict:
    """The GPU suite's rows: 1 rank (checkpointing on/off) and N ranks when there are N > 1 GPUs."""
    dtype = "float32" if args.smoke else args.dtype
    out = {}
    for ckpt in (True, False):
        out["checkpointing" if ckpt else "no_checkpointing"] = one_rank(settings_for(args), steps, size, dtype, ckpt,
                                                                        peak_reset, peak_gib, release)
    n = 2 if args.smoke else torch.cuda.device_count()
    if n > 1:
        env = {**os.environ, "SPO_MODEL": "tiny" if args.smoke else "sdxl-random"}
        if args.smoke:
            env.update(SPO_DEVICE="cpu")
        else:
            env.update(SPO_DTYPE=dtype)
        out[f"ranks_{n}"] = n_ranks(env, n, steps, size, dtype, timeout_s=getattr(args, "cap_s", 600) or 600)
        one = out["checkpointing"]
        if "pairs_per_s" in one and "pairs_per_s" in out[f"ranks_{n}"]:
            out[f"ranks_{n}"]["scaling_vs_1"] = out[f"ranks_{n}"]["pairs_per_s"] / one["pairs_per_s"]
    return out
