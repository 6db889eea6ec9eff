"""Runtime throughput: spo_runtime vs diffusers' StableDiffusionXLPipeline (LoRA unfused), same model,
same requests, both called from the main thread of this process.

    python benchmarks/bench_runtime.py [--steps 20] [--repeats 3] [--tag runtime]

Prints images/s at batch 1, 4 and 8 for both, the ratios, and the cost of mixed per-sample LoRA scales
against one uniform (fused) scale at batch 8, and writes them to benchmarks/results/<tag>.json (the
goals they are held against are in benchmarks/RESULTS.md). Uses the tiny preset saved to a temporary
directory unless --model-dir is given.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import dumps, machine, rounded, timings  # noqa: E402


def timed(fn, repeats: int) -> float:
    return statistics.median(timings(fn, repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--model-dir", default=None, help="a save-tiny directory (default: write one to a temp dir)")
    ap.add_argument("--tag", default="runtime", help="write <results-dir>/<tag>.json")
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from diffusers import StableDiffusionXLPipeline

    from spo_runtime import Settings, load_pipeline, save_tiny

    model_dir = args.model_dir or tempfile.mkdtemp(prefix="spo-bench-")
    if not args.model_dir:
        save_tiny(model_dir)
    ours = load_pipeline(Settings(model="tiny", base_model=model_dir))
    ref = StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False)
    ref.load_lora_weights(model_dir, weight_name="spo_tiny_lora_diffusers.safetensors", adapter_name="spo")
    ref.set_progress_bar_config(disable=True)
    prompt, steps = "a watercolor fox in a snowy forest", args.steps

    def run_ours(n: int, scales=None):
        scales = scales or [1.0] * n
        return lambda: ours.generate([dict(prompt=prompt, seed=i, num_inference_steps=steps, lora_scale=s) for i, s in enumerate(scales)])

    def run_ref(n: int):
        return lambda: ref([prompt] * n, num_inference_steps=steps, guidance_scale=5.0, height=64, width=64,
                           generator=[torch.Generator().manual_seed(i) for i in range(n)])

    rows = []
    ref1 = None
    for n in [int(b) for b in args.batches.split(",")]:
        t_ref = timed(run_ref(n), args.repeats)
        t_ours = timed(run_ours(n), args.repeats)
        ref1 = ref1 or n / t_ref
        rows.append({"batch": n, "diffusers_img_s": n / t_ref, "ours_img_s": n / t_ours,
                     "ours_vs_diffusers_same_batch": t_ref / t_ours, "ours_vs_diffusers_batch1": (n / t_ours) / ref1})
    n = max(int(b) for b in args.batches.split(","))
    mixed = [round(-1 + 2 * i / (n - 1), 3) for i in range(n)] if n > 1 else [0.5]
    t_uniform = timed(run_ours(n), args.repeats)
    t_mixed = timed(run_ours(n, mixed), args.repeats)

    print(f"\nspo_runtime vs diffusers StableDiffusionXLPipeline (unfused LoRA), tiny preset, {steps} steps, CFG 5, "
          f"64x64, torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'batch':>5} {'diffusers img/s':>16} {'ours img/s':>11} {'ours/diffusers':>15} {'ours/diffusers b1':>18}")
    for r in rows:
        print(f"{r['batch']:>5} {r['diffusers_img_s']:>16.2f} {r['ours_img_s']:>11.2f} {r['ours_vs_diffusers_same_batch']:>14.2f}x "
              f"{r['ours_vs_diffusers_batch1']:>17.2f}x")
    overhead = t_mixed / t_uniform - 1
    print(f"batch {n}: uniform fused scale {n / t_uniform:.2f} img/s, mixed per-sample scales {mixed} "
          f"{n / t_mixed:.2f} img/s: overhead {overhead * 100:+.1f}%")
    out = Path(args.results_dir) / f"{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(("torch", "diffusers")),
           "command": " ".join(["benchmarks/bench_runtime.py", *sys.argv[1:]]), "rows": rows, "batch": n,
           "uniform_img_s": n / t_uniform, "mixed_img_s": n / t_mixed, "mixed_overhead": overhead, "steps": steps,
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    out.write_text(dumps(rounded(res)) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
