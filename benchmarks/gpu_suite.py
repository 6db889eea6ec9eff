"""The GPU suite: the card's ceilings, diffusers baselines and spo_runtime on full-size SDXL, the floor.

    python benchmarks/gpu_suite.py [--only ceilings,baselines,ours,compile,train] [--json out.json]
    python benchmarks/gpu_suite.py --smoke      # same code paths on CPU with the tiny preset, seconds

Writes benchmarks/results/gpu_suite.json by default (--smoke: benchmarks/out/gpu_suite_smoke.json);
the goals the figures are held against are in benchmarks/RESULTS.md.

On a GPU: `sdxl-random` (full SDXL architecture, random weights, rank-64 LoRA on SPO's 560 layers)
at 1024x1024, CFG 5, 20 DDIM steps, bf16. Baseline A: diffusers' StableDiffusionXLPipeline with the
LoRA loaded unfused (peft); B: the same after fuse_lora(). Ours: batch 1/2/4/8 at the fused scale,
and batch 8 with mixed per-sample scales. The floor: an SDXL UNet forward at 1024 is about 6.76 TFLOP
per sample, so a guided step is about 13.5 TFLOP per image; divided by the measured bf16 matmul rate.
Prints one table at the end and writes it as JSON (after each section, so a crash keeps what was done).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

GUIDED_STEP_TFLOP = 13.5  # per image at 1024x1024 (2 x 6.76 TFLOP UNet forwards)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def release_memory() -> None:
    """Give back the memory of what the caller no longer references: collect reference cycles (model
    hooks keep some), then return the allocator's cached blocks to the device. Only useful after the
    last reference is gone (`x = None`), e.g. between sections."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------


def ceilings(device, smoke: bool) -> dict:
    n = 1024 if smoke else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 3 if smoke else 10
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    tflops = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
    x = torch.empty(256 * 2**20 if smoke else 2 * 2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync(device)
    gbs = 2 * x.numel() * reps / (time.perf_counter() - t0) / 1e9  # bytes read + written
    return {"matmul_tflops": tflops, "matmul_dtype": str(dtype).removeprefix("torch."), "copy_gb_s": gbs}


def settings_for(args):
    from spo_runtime import Settings

    if args.smoke:
        return Settings(model="tiny", device="cpu")
    return Settings(model="sdxl-random", device="cuda", dtype=args.dtype)


def run_ours(pipe, batch: int, scales: list[float], steps: int, size: int, repeats: int) -> dict:
    """Time the denoising loop (per step) and the decode of `batch` requests; median over repeats."""
    device = pipe.device
    reqs = [dict(prompt=f"a photo of a fox, number {i}", seed=i, num_inference_steps=steps, width=size, height=size,
                 lora_scale=s) for i, s in enumerate(scales)]
    step_s, dec_s, total_s = [], [], []
    for r in range(repeats + 1):  # the first run warms up
        peak_reset(device)
        sync(device)
        t0 = time.perf_counter()
        states = pipe.prepare(reqs)
        sync(device)
        t1 = time.perf_counter()
        for _ in range(steps):
            pipe.denoise(states)
        sync(device)
        t2 = time.perf_counter()
        out = pipe.decode(states)
        sync(device)
        t3 = time.perf_counter()
        errors = [str(o) for o in out if isinstance(o, Exception)]  # random weights may overflow: count, don't stop
        if r or not repeats:  # repeats=0: time the single (cold) run
            step_s.append((t2 - t1) / steps)
            dec_s.append(t3 - t2)
            total_s.append(t3 - t0)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    total = med(total_s)
    return {"batch": batch, "ms_per_step": med(step_s) * 1e3, "s_per_image": total / batch, "images_s": batch / total,
            "decode_ms": med(dec_s) * 1e3, "peak_gib": peak_gib(device), "adapters_in_step": pipe.last_step.adapters,
            "non_finite": len(errors)}


def run_diffusers(parts, fuse: bool, steps: int, size: int, repeats: int, device) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from spo_runtime.lora_format import save_lora_file
    from spo_runtime.sampler import SDXL_SCHEDULER_CONFIG

    pipe = StableDiffusionXLPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
        tokenizer=parts["tokenizer"], tokenizer_2=parts["tokenizer_2"], unet=parts["unet"],
        scheduler=DDIMScheduler.from_config(SDXL_SCHEDULER_CONFIG), add_watermarker=False,
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as d:
        save_lora_file(Path(d) / "lora.safetensors", parts["lora"].modules, "diffusers")
        pipe.load_lora_weights(d, weight_name="lora.safetensors", adapter_name="spo")
    if fuse:
        pipe.fuse_lora(lora_scale=1.0)
    gen = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731
    step_s, dec_s = [], []
    for r in range(repeats + 1):
        peak_reset(device)
        sync(device)
        t0 = time.perf_counter()
        lat = pipe("a photo of a fox", num_inference_steps=steps, guidance_scale=5.0, height=size, width=size,
                   generator=gen(), output_type="latent").images
        sync(device)
        t1 = time.perf_counter()
        with torch.inference_mode():
            pipe.vae.decode(lat.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)
        sync(device)
        t2 = time.perf_counter()
        if r:
            step_s.append((t1 - t0) / steps)
            dec_s.append(t2 - t1)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    total = med(step_s) * steps + med(dec_s)
    out = {"batch": 1, "ms_per_step": med(step_s) * 1e3, "s_per_image": total, "images_s": 1 / total,
           "decode_ms": med(dec_s) * 1e3, "peak_gib": peak_gib(device)}
    pipe.unload_lora_weights()
    return out


def floor_share(row: dict, tflops: float | None, smoke: bool) -> float | None:
    """Share of the floor: the matmul rate this step's FLOPs ran at / the measured rate (None unmeasured)."""
    if smoke or not tflops or not row.get("ms_per_step"):
        return None
    achieved = GUIDED_STEP_TFLOP * row["batch"] / (row["ms_per_step"] / 1e3)
    return achieved / tflops


def compile_section(pipe, args, steps, size) -> dict:
    """torch.compile the UNet: compile time, steady state, and what a LoRA-scale change costs."""
    import torch._dynamo as dynamo

    from torch._dynamo.utils import counters

    out = {}
    if args.smoke:  # dynamo tracing only: the code path without minutes of CPU code generation
        pipe.unet = torch.compile(pipe.unet, backend="eager", dynamic=False)
    else:
        pipe.unet = torch.compile(pipe.unet, mode=args.compile_mode, dynamic=False)
    frames0 = counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    run_ours(pipe, 1, [pipe.default_lora_scale], 2, size, 0)
    out["compile_s"] = time.perf_counter() - t0
    out["b1"] = run_ours(pipe, 1, [pipe.default_lora_scale], steps, size, args.repeats)
    graphs_before = counters["stats"]["unique_graphs"]
    swap = pipe.set_default_lora_scale(0.5)
    out["scale_swap_ms"] = swap["swap_ms"]
    t1 = time.perf_counter()
    run_ours(pipe, 1, [0.5], 2, size, 0)
    out["first_call_after_swap_s"] = time.perf_counter() - t1
    out["graphs_compiled_by_swap"] = counters["stats"]["unique_graphs"] - graphs_before
    run_ours(pipe, 1, [0.7], 2, size, 0)
    out["graphs_compiled_by_second_swap"] = counters["stats"]["unique_graphs"] - graphs_before - out["graphs_compiled_by_swap"]
    pipe.set_default_lora_scale(1.0)
    out["graphs_total"] = counters["stats"]["unique_graphs"] - frames0
    pipe.unet = pipe.unet._orig_mod
    dynamo.reset()
    return out


def train_section(args, steps, size) -> dict:
    """Seconds per SPO round and peak memory, gradient checkpointing on, then off (OOM recorded)."""
    from spo_runtime import load_pipeline
    from spo_runtime.train import SPOTrainer, TrainConfig

    out = {}
    for ckpt in (True, False):
        pipe = tr = None
        try:
            s = settings_for(args)
            pipe = load_pipeline(s.model_copy(update={"lora_fuse": False}))
            cfg = TrainConfig(num_inference_steps=steps, width=size, height=size, prompts_per_round=1, max_rounds=2,
                              gradient_checkpointing=ckpt, scorer="spm", checkpoint_every=100,
                              threshold=0.0)  # keep every pair: the round then always trains (16 pairs)
            tr = SPOTrainer(pipe, cfg, ["a photo of a fox in the snow"], tempfile.mkdtemp())
            peak_reset(pipe.device)
            tr.run_round()  # warm-up round
            t0 = time.perf_counter()
            st = tr.run_round()
            out["checkpointing" if ckpt else "no_checkpointing"] = {
                "round_s": time.perf_counter() - t0, "peak_gib": peak_gib(pipe.device), "pairs": st["transitions"],
                "loss": st["loss"]}
        except torch.cuda.OutOfMemoryError as e:
            out["checkpointing" if ckpt else "no_checkpointing"] = {"oom": str(e).splitlines()[0]}
        finally:
            pipe = tr = None
            release_memory()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="ceilings,baselines,ours,compile,train")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset, 2 steps: the same code paths in seconds")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--json", default=None,
                    help="default: benchmarks/results/gpu_suite.json (--smoke: benchmarks/out/gpu_suite_smoke.json)")
    args = ap.parse_args()
    if args.json is None:
        args.json = str(HERE / "out" / "gpu_suite_smoke.json" if args.smoke else HERE / "results" / "gpu_suite.json")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    parts_wanted = set(args.only.split(","))
    steps, size = (2, 64) if args.smoke else (args.steps, args.size)
    if args.smoke:
        args.repeats, args.batches = 1, "1,2"
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on a CPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "steps": steps, "size": size, "dtype": "float32" if args.smoke else args.dtype,
              "smoke": args.smoke, "command": " ".join(sys.argv)}
    t_start = time.perf_counter()

    def section(name, fn):
        if name not in parts_wanted:
            return
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as e:  # record and go on: a later call can finish what this one could not
            report[name] = {"error": f"{type(e).__name__}: {e}"}
        release_memory()
        report.setdefault("section_s", {})[name] = time.perf_counter() - t0
        print(f"[{time.perf_counter() - t_start:6.1f}s] {name}: {json.dumps(report[name], default=str)[:400]}", flush=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))

    section("ceilings", lambda: ceilings(device, args.smoke))
    tflops = report.get("ceilings", {}).get("matmul_tflops")  # floor shares need it: None without ceilings

    from spo_runtime import load_pipeline
    from spo_runtime.models import _build_random_sdxl, _load_tiny

    def baselines():
        out = {}
        for fuse in (False, True):
            if args.smoke:
                parts = _load_tiny(settings_for(args))
                from spo_runtime.models import tiny_lora_file

                parts["lora"] = tiny_lora_file(parts["unet"])
            else:
                parts = _build_random_sdxl(device, getattr(torch, args.dtype))
            row = run_diffusers(parts, fuse, steps, size, args.repeats, device)
            row["floor_share"] = floor_share(row, tflops, args.smoke)
            out["B_fused" if fuse else "A_unfused"] = row
            parts = None
            release_memory()
        return out

    section("baselines", baselines)

    pipe = load_pipeline(settings_for(args)) if "ours" in parts_wanted else None

    def ours():
        out = {}
        for b in [int(x) for x in args.batches.split(",")]:
            row = run_ours(pipe, b, [pipe.default_lora_scale] * b, steps, size, args.repeats)
            row["floor_share"] = floor_share(row, tflops, args.smoke)
            out[f"b{b}"] = row
        b = max(int(x) for x in args.batches.split(","))
        mixed = [round(-1 + 2 * i / max(b - 1, 1), 3) for i in range(b)]
        row = run_ours(pipe, b, mixed, steps, size, args.repeats)
        row["floor_share"] = floor_share(row, tflops, args.smoke)
        row["scales"] = mixed
        out[f"b{b}_mixed"] = row
        swap = pipe.set_default_lora_scale(0.8)
        out["scale_swap_ms"] = swap["swap_ms"]
        pipe.set_default_lora_scale(1.0)
        out["refuse_s"] = pipe.registry.fuse("spo", 1.0)
        return out

    section("ours", ours)
    pipe = None  # before the next sections load their own
    release_memory()
    section("train", lambda: train_section(args, steps, size))
    section("compile", lambda: compile_section(load_pipeline(settings_for(args)), args, steps, size))
    report["total_s"] = time.perf_counter() - t_start
    Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    print_table(report)


def print_table(r: dict) -> None:
    print(f"\nGPU suite: {r['device']}, torch {r['torch']}, {r['dtype']}, {r['size']}x{r['size']}, {r['steps']} DDIM steps, CFG 5"
          f" ({r['date']}; {r.get('total_s', 0):.0f}s)")
    c = r.get("ceilings", {})
    if "matmul_tflops" in c:
        print(f"ceilings: matmul {c['matmul_tflops']:.0f} TFLOP/s ({c['matmul_dtype']}), device copy {c['copy_gb_s']:.0f} GB/s")
    rows = []
    for name, sec in (("A diffusers unfused", r.get("baselines", {}).get("A_unfused")), ("B diffusers fused", r.get("baselines", {}).get("B_fused"))):
        if isinstance(sec, dict) and "ms_per_step" in sec:
            rows.append((name, sec))
    for k, v in r.get("ours", {}).items():
        if isinstance(v, dict) and "ms_per_step" in v:
            rows.append((f"ours {k}", v))
    comp = r.get("compile", {})
    for k in ("b1",):
        if isinstance(comp.get(k), dict):
            rows.append((f"ours compiled {k}", comp[k]))
    print(f"{'system':<24}{'batch':>6}{'ms/step':>10}{'s/img':>8}{'img/s':>8}{'decode ms':>11}{'peak GiB':>10}{'floor':>8}")
    for name, v in rows:
        fs = f"{v['floor_share'] * 100:.0f}%" if v.get("floor_share") else "-"
        pk = f"{v['peak_gib']:.1f}" if v.get("peak_gib") else "-"
        print(f"{name:<24}{v['batch']:>6}{v['ms_per_step']:>10.1f}{v['s_per_image']:>8.3f}{v['images_s']:>8.2f}{v['decode_ms']:>11.1f}{pk:>10}{fs:>8}")
    a = r.get("baselines", {}).get("A_unfused", {})
    o = r.get("ours", {})
    if "s_per_image" in a and "b1" in o:
        print(f"ours b1 / baseline A time per image: {o['b1']['s_per_image'] / a['s_per_image']:.2f}x")
    bmax = [k for k in o if k.endswith("_mixed")]
    if bmax:
        uni = o[bmax[0].removesuffix("_mixed")]
        print(f"mixed per-sample scales vs uniform at {bmax[0]}: {o[bmax[0]]['ms_per_step'] / uni['ms_per_step'] - 1:+.1%} per step")
    if "scale_swap_ms" in o:
        print(f"LoRA scale change: {o['scale_swap_ms']:.3f} ms; re-fuse at a new scale: {o['refuse_s'] * 1e3:.0f} ms")
    if comp and "compile_s" in comp:
        print(f"torch.compile: {comp['compile_s']:.0f}s to compile; scale change compiled {comp['graphs_compiled_by_swap']} new graph(s), "
              f"then {comp['graphs_compiled_by_second_swap']} on a second change")
    tr = r.get("train", {})
    for k, v in tr.items():
        print(f"SPO round ({k.replace('_', ' ')}): " + (f"{v['round_s']:.1f}s, peak {v['peak_gib']:.1f} GiB" if "round_s" in v and v.get("peak_gib") else json.dumps(v)[:200]))


if __name__ == "__main__":
    main()
