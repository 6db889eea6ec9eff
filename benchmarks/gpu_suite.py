"""The GPU suite: the card's ceilings, diffusers baselines and spo_runtime on full-size SDXL, the floor,
and every speed path (compile, CUDA graphs, compiled VAE, FP8, the SDPA pick) against bf16 eager.

    python benchmarks/gpu_suite.py [--only ours,compile,fp8,vae,cudagraphs,sdpa,ceilings,baselines,train]
                                   [--budget-s 600] [--cap-s 300] [--json out.json]
    python benchmarks/gpu_suite.py --smoke      # same code paths on CPU with the tiny preset, seconds

Sections run in the order given (the default order is their priority), each under a time cap (`--cap-s`, and
never past what is left of `--budget-s`; a section that would start with under `--min-left-s` left is
skipped): a cut-off section is recorded as such and the JSON is written after every section, so a run the
machine's time limit cuts short still reports what it did. The speed-path sections compare the images of
8 fixed requests (`fixed_requests`) with those of bf16 eager (`ours`): PSNR over all pixels, the worst
request's PSNR and the largest pixel difference. `compile` also times a cold start (empty cache) and a
warm start (the cache that run left) in fresh processes (`--start-probe`).

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
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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


def settings_for(args, dtype: str | None = None):
    from spo_runtime import Settings

    if args.smoke:
        return Settings(model="tiny", device="cpu", dtype=dtype)
    return Settings(model="sdxl-random", device="cuda", dtype=dtype or args.dtype)


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

    from spo_runtime.lora.format import save_lora_file
    from spo_runtime.sampling.sampler import SDXL_SCHEDULER_CONFIG

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


def fixed_requests(n: int, steps: int, size: int) -> list[dict]:
    """The suite's fixed requests: the same prompts, seeds and default scale in every section."""
    return [dict(prompt=f"a photo of a fox in the snow, number {i}", seed=100 + i, num_inference_steps=steps,
                 width=size, height=size, guidance_scale=5.0) for i in range(n)]


def images_of(pipe, reqs: list[dict]) -> np.ndarray:
    """(n, H, W, 3) uint8 images of `reqs`, generated in one batch."""
    return np.stack([np.asarray(r.image) for r in pipe.generate(reqs)])


def fidelity(ref: np.ndarray, got: np.ndarray) -> dict:
    """PSNR over every pixel of every image, the worst image's PSNR, the largest pixel difference."""
    d = ref.astype(np.float64) - got.astype(np.float64)

    def psnr(mse):
        return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)

    per = [psnr(float((x**2).mean())) for x in d]
    return {"psnr_db": round(psnr(float((d**2).mean())), 2), "psnr_min_db": round(min(per), 2),
            "max_diff": int(np.abs(d).max()), "images": len(ref)}


class Refs:
    """bf16 (smoke: float32 or bf16) eager images of the fixed requests, by dtype, computed once."""

    def __init__(self, args, n, steps, size):
        self.args, self.n, self.steps, self.size, self.images = args, n, steps, size, {}

    def put(self, dtype: str, pipe) -> None:
        self.images[dtype] = images_of(pipe, fixed_requests(self.n, self.steps, self.size))

    def get(self, dtype: str) -> np.ndarray:
        if dtype not in self.images:
            from spo_runtime import load_pipeline

            pipe = load_pipeline(settings_for(self.args, dtype=dtype))
            self.put(dtype, pipe)
            pipe = None
            release_memory()
        return self.images[dtype]


def speed_settings(args, data_dir: str, **kw):
    """Settings of a speed path: the suite's model, compile with the CPU backend in smoke."""
    s = settings_for(args, **({"dtype": kw.pop("dtype")} if "dtype" in kw else {}))
    if args.smoke:
        kw.setdefault("compile_backend", "eager")  # dynamo tracing only: no minutes of CPU code generation
    return s.model_copy(update={"data_dir": Path(data_dir), "max_batch": args.max_batch, **kw})


def start_probe(spec_json: str) -> dict:
    """A server's start in this (fresh) process: load, warm the compiled graphs of `unet_rows` and `vae_rows`
    (the service warms every bucket; the suite the ones its rows use), one image; seconds."""
    from spo_runtime import Settings, load_pipeline

    spec = json.loads(spec_json)
    t0 = time.perf_counter()
    pipe = load_pipeline(Settings(**spec["settings"]))
    load_s = time.perf_counter() - t0
    warm = pipe.warm_up(unet_rows=tuple(spec["unet_rows"]), vae_rows=tuple(spec["vae_rows"]))
    pipe.generate([{"prompt": "warm-up", "seed": 0, "num_inference_steps": 2}])
    return {"load_s": round(load_s, 2), "warm_up": warm, "ready_s": round(time.perf_counter() - t0, 2),
            "compiled": pipe.compiled, "cache": pipe.compile_cache.info() if pipe.compile_cache else None}


def run_probe(settings, unet_rows, vae_rows, timeout: float) -> dict:
    """`start_probe` in a fresh process (a restart: nothing compiled in memory; the disk caches as left)."""
    env = dict(os.environ)
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    spec = json.dumps({"settings": json.loads(settings.model_dump_json()), "unet_rows": list(unet_rows), "vae_rows": list(vae_rows)})
    try:
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--start-probe", spec], capture_output=True,
                           text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"no answer within {timeout:.0f}s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or not lines:
        return {"error": (r.stderr or r.stdout)[-800:]}
    return json.loads(lines[-1])


def graphs_now() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def path_rows(pipe, refs, ref_dtype, args, steps, size) -> dict:
    """A speed path's rows: batch 1 and batch-max timing, mixed scales, fidelity against bf16 eager."""
    b = args.max_batch
    out = {"b1": run_ours(pipe, 1, [pipe.default_lora_scale], steps, size, args.repeats),
           f"b{b}": run_ours(pipe, b, [pipe.default_lora_scale] * b, steps, size, args.repeats)}
    mixed = [round(-1 + 2 * i / max(b - 1, 1), 3) for i in range(b)]
    out[f"b{b}_mixed"] = {**run_ours(pipe, b, mixed, steps, size, args.repeats), "scales": mixed}
    g0 = graphs_now()
    out["fidelity"] = fidelity(refs.get(ref_dtype), images_of(pipe, fixed_requests(refs.n, steps, size)))
    out["graphs_compiled_by_fixed_requests"] = graphs_now() - g0
    return out


def compile_section(args, refs, steps, size, cap_s, out: dict, mode="default") -> None:
    """SPO_COMPILE, filling `out` as it goes (a cut-off run keeps the parts done): a cold start in this process
    (fresh cache under a new SPO_DATA_DIR; nothing compiled here before), the rows (b1, b-max, mixed, fidelity),
    what scale changes compile after the warm-up, then a warm start in a fresh process on the cache left."""
    import torch._dynamo as dynamo

    from spo_runtime import load_pipeline

    b = args.max_batch
    unet_rows, vae_rows = tuple(sorted({2, 2 * b})), tuple(sorted({1, b}))  # what b1 and b-max with CFG use
    s = speed_settings(args, tempfile.mkdtemp(prefix="spo-compile-"), compile=True, compile_mode=mode)
    t0 = time.perf_counter()
    pipe = load_pipeline(s)
    out["warm_up"] = {}
    pipe.warm_up(unet_rows=unet_rows, vae_rows=vae_rows, into=out["warm_up"])  # filled graph by graph
    out["cold_start_s"] = round(time.perf_counter() - t0, 2)
    g0 = graphs_now()
    out.update(path_rows(pipe, refs, args.dtype if not args.smoke else "float32", args, steps, size))
    out["graphs_after_warm_up"] = graphs_now() - g0  # every call above used a warmed graph: 0
    swap = pipe.set_default_lora_scale(0.5)
    out["scale_swap_ms"] = swap["swap_ms"]
    g1 = graphs_now()
    run_ours(pipe, 1, [0.5], 2, size, 0)
    run_ours(pipe, 1, [0.7], 2, size, 0)
    out["graphs_compiled_by_scale_changes"] = graphs_now() - g1
    out["info"] = pipe.info()["speed"]
    pipe = None
    dynamo.reset()
    release_memory()
    # a restart on the cache just written; on CPU the eager backend writes no kernels, so the smoke's probe
    # starts uncompiled: the same fresh-process code path in seconds
    probe = s if not args.smoke else s.model_copy(update={"compile": False})
    out["warm_start"] = run_probe(probe, unet_rows, vae_rows, max(cap_s - (time.perf_counter() - t0), 10.0))


def vae_section(args, steps, size) -> dict:
    """The VAE decode at batch max, eager then channels-last and compiled: ms per batch, fidelity."""
    import torch._dynamo as dynamo

    from spo_runtime import load_pipeline

    pipe = load_pipeline(speed_settings(args, tempfile.mkdtemp(prefix="spo-vae-")))
    states = pipe.prepare(fixed_requests(args.max_batch, steps, size))
    for _ in range(steps):
        pipe.denoise(states)
    lat = [s.latents for s in states]

    def decode():
        for s, z in zip(states, lat):
            s.latents = z
        sync(pipe.device)
        t0 = time.perf_counter()
        imgs = pipe.decode(states)
        sync(pipe.device)
        return time.perf_counter() - t0, np.stack([np.asarray(i.image) for i in imgs])

    decode()
    eager_s, eager = min((decode() for _ in range(args.repeats + 1)), key=lambda r: r[0])
    t0 = time.perf_counter()
    pipe.compile_vae(pipe.settings.compile_backend if not args.smoke else "eager", args.compile_mode)
    decode()
    compile_s = time.perf_counter() - t0
    comp_s, comp = min((decode() for _ in range(args.repeats + 1)), key=lambda r: r[0])
    dynamo.reset()
    return {"batch": args.max_batch, "eager_ms": eager_s * 1e3, "compiled_ms": comp_s * 1e3, "compile_s": compile_s,
            "ms_per_image_eager": eager_s * 1e3 / args.max_batch, "ms_per_image_compiled": comp_s * 1e3 / args.max_batch,
            "fidelity": fidelity(eager, comp)}


def fp8_section(args, refs, steps, size) -> dict:
    """SPO_QUANT=fp8 against bf16 eager on the fixed requests (PSNR, max difference), and its speed.
    Smoke: the tiny model in bf16 on CPU with torchao's hardware check passed over (torchao's float8
    kernels run on CPU, slowly): the same quantization, layer choice and LoRA branch; no speed meaning."""
    from spo_runtime import load_pipeline
    from spo_runtime.speed import fp8

    s = speed_settings(args, tempfile.mkdtemp(prefix="spo-fp8-"), quant="fp8", dtype="bfloat16")
    if args.smoke:
        import torchao.quantization.quant_api as qa

        fp8.check_supported = lambda device, dtype: None
        qa._check_hardware_support = lambda granularity: None
    pipe = load_pipeline(s)
    out = path_rows(pipe, refs, "bfloat16", args, steps, size)
    out["quant"] = pipe.quant
    out["non_finite_rows"] = sum(r.get("non_finite", 0) for r in out.values() if isinstance(r, dict))
    return out


def sdpa_section(args, refs, steps, size) -> dict:
    """SPO_SDPA_BACKEND=auto: what it measured and picked, and the images against torch's default."""
    from spo_runtime import load_pipeline

    pipe = load_pipeline(speed_settings(args, tempfile.mkdtemp(prefix="spo-sdpa-"), sdpa_backend="auto"))
    b = args.max_batch
    return {"pick": pipe.sdpa, f"b{b}": run_ours(pipe, b, [pipe.default_lora_scale] * b, steps, size, args.repeats),
            "fidelity": fidelity(refs.get(args.dtype if not args.smoke else "float32"),
                                 images_of(pipe, fixed_requests(refs.n, steps, size)))}


def train_section(args, steps, size) -> dict:
    """SPO training at the paper's effective batch: seconds per round, pairs per second and peak memory for
    1 rank (gradient checkpointing on, then off; OOM recorded) and N ranks when N > 1 GPUs
    (benchmarks/train_throughput.py)."""
    from train_throughput import train_section as rows

    return rows(args, steps, size, settings_for, peak_reset, peak_gib, release_memory)


class SectionTimeout(Exception):
    """A section ran past its cap (SIGALRM)."""


def _alarm(signum, frame):
    raise SectionTimeout()


ORDER = "ceilings,ours,compile,fp8,vae,cudagraphs,sdpa,baselines,train"  # by priority


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=ORDER, help=f"sections, run in this order (default {ORDER})")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset, 2 steps: the same code paths in seconds")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--max-batch", type=int, default=8, help="batch of the speed-path rows and fixed requests (smoke: 1)")
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--budget-s", type=float, default=3600.0, help="the whole run's time; sections stop at it")
    ap.add_argument("--cap-s", type=float, default=420.0, help="longest one section may run")
    ap.add_argument("--min-left-s", type=float, default=30.0, help="skip a section that would start with less left")
    ap.add_argument("--start-probe", metavar="SETTINGS_JSON", help=argparse.SUPPRESS)  # compile's fresh-process start
    ap.add_argument("--json", default=None,
                    help="default: benchmarks/results/gpu_suite.json (--smoke: benchmarks/out/gpu_suite_smoke.json)")
    args = ap.parse_args()
    if args.start_probe:
        print(json.dumps(start_probe(args.start_probe), default=str), flush=True)
        return
    if args.json is None:
        args.json = str(HERE / "out" / "gpu_suite_smoke.json" if args.smoke else HERE / "results" / "gpu_suite.json")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    wanted = [w for w in args.only.split(",") if w]
    steps, size = (2, 64) if args.smoke else (args.steps, args.size)
    if args.smoke:
        args.repeats, args.batches, args.max_batch = 1, "1,2", 1
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on a CPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "steps": steps, "size": size, "dtype": "float32" if args.smoke else args.dtype,
              "smoke": args.smoke, "command": " ".join(sys.argv), "budget_s": args.budget_s, "cap_s": args.cap_s}
    t_start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)

    def section(name, fn):
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < args.min_left_s:
            report[name] = {"skipped": f"{left:.0f}s of the budget left (< --min-left-s {args.min_left_s:.0f})"}
        else:
            cap = min(args.cap_s, left)
            t0 = time.perf_counter()
            out: dict = {}  # what a section filled before a cut-off or an error stays in the report
            report[name] = out
            signal.setitimer(signal.ITIMER_REAL, cap)
            try:
                got = fn(cap, out)
                if got is not None:
                    out.update(got)
            except SectionTimeout:
                out["error"] = f"cut off at its cap of {cap:.0f}s"
            except Exception as e:  # record and go on: a later call can finish what this one could not
                out["error"] = f"{type(e).__name__}: {e}"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            release_memory()
            report.setdefault("section_s", {})[name] = time.perf_counter() - t0
        print(f"[{time.perf_counter() - t_start:6.1f}s] {name}: {json.dumps(report[name], default=str)[:400]}", flush=True)
        report["total_s"] = time.perf_counter() - t_start
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))

    from spo_runtime import load_pipeline
    from spo_runtime.model.loading import _build_random_sdxl, _load_tiny

    refs = Refs(args, args.max_batch, steps, size)

    def baselines(cap, out):
        for fuse in (False, True):
            if args.smoke:
                parts = _load_tiny(settings_for(args))
                from spo_runtime.model.tiny import tiny_lora_file

                parts["lora"] = tiny_lora_file(parts["unet"])
            else:
                parts = _build_random_sdxl(device, getattr(torch, args.dtype))
            row = run_diffusers(parts, fuse, steps, size, args.repeats, device)
            row["floor_share"] = floor_share(row, report.get("ceilings", {}).get("matmul_tflops"), args.smoke)
            out["B_fused" if fuse else "A_unfused"] = row
            parts = None
            release_memory()

    def ours(cap, out):
        tflops = report.get("ceilings", {}).get("matmul_tflops")  # floor shares need it: None without ceilings
        pipe = load_pipeline(settings_for(args))
        refs.put(str(pipe.dtype).removeprefix("torch."), pipe)  # the images every speed path is held against
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
        # one row of b at another scale: the branch on every row (default), then on that row alone
        # (SPO_LORA_ROW_SUBSET=0.5: index_select / index_copy_ of its activations instead of b - 1 rows' branch)
        one_off = [pipe.default_lora_scale] * (b - 1) + [0.5]
        out[f"b{b}_one_off_scale"] = {**run_ours(pipe, b, one_off, steps, size, args.repeats), "scales": one_off}
        pipe.registry.row_subset_share = 0.5
        out[f"b{b}_one_off_scale_row_subset"] = {**run_ours(pipe, b, one_off, steps, size, args.repeats), "scales": one_off}
        pipe.registry.row_subset_share = pipe.settings.lora_row_subset
        swap = pipe.set_default_lora_scale(0.8)
        out["scale_swap_ms"] = swap["swap_ms"]
        pipe.set_default_lora_scale(1.0)
        out["refuse_s"] = pipe.registry.fuse("spo", 1.0)
        out["sdpa"] = pipe.sdpa

    def cudagraphs(cap, out):
        if args.smoke:
            return {"skipped": "CUDA graphs need CUDA; the code path is compile's with mode=reduce-overhead"}
        compile_section(args, refs, steps, size, cap, out, mode="reduce-overhead")

    sections = {
        "ceilings": lambda cap, out: ceilings(device, args.smoke),
        "ours": ours,
        "compile": lambda cap, out: compile_section(args, refs, steps, size, cap, out, mode=args.compile_mode),
        "fp8": lambda cap, out: fp8_section(args, refs, steps, size),
        "vae": lambda cap, out: vae_section(args, steps, size),
        "cudagraphs": cudagraphs,
        "sdpa": lambda cap, out: sdpa_section(args, refs, steps, size),
        "baselines": baselines,
        "train": lambda cap, out: train_section(args, steps, size),
    }
    for name in wanted:
        if name not in sections:
            sys.exit(f"--only: unknown section {name!r}; sections: {ORDER}")
        section(name, sections[name])
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
    for path in ("compile", "cudagraphs", "fp8"):
        for k, v in r.get(path, {}).items():
            if isinstance(v, dict) and "ms_per_step" in v:
                rows.append((f"{path} {k}", v))
    print(f"{'system':<34}{'batch':>6}{'ms/step':>10}{'s/img':>8}{'img/s':>8}{'decode ms':>11}{'peak GiB':>10}{'floor':>8}")
    for name, v in rows:
        fs = f"{v['floor_share'] * 100:.0f}%" if v.get("floor_share") else "-"
        pk = f"{v['peak_gib']:.1f}" if v.get("peak_gib") else "-"
        print(f"{name:<34}{v['batch']:>6}{v['ms_per_step']:>10.1f}{v['s_per_image']:>8.3f}{v['images_s']:>8.2f}{v['decode_ms']:>11.1f}{pk:>10}{fs:>8}")
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
    one_off = [k for k in o if k.endswith("_one_off_scale")]
    if one_off and f"{one_off[0]}_row_subset" in o:
        k = one_off[0]
        print(f"one row off the fused scale at {k.split('_')[0]}: {o[k]['ms_per_step']:.1f} ms/step with the branch on every row, "
              f"{o[k + '_row_subset']['ms_per_step']:.1f} on that row alone (SPO_LORA_ROW_SUBSET)")
    for path in ("compile", "cudagraphs", "fp8"):
        sec = r.get(path, {})
        mixed = [k for k in sec if k.endswith("_mixed")]
        if mixed and mixed[0].removesuffix("_mixed") in sec and "ms_per_step" in sec[mixed[0]]:
            uni = sec[mixed[0].removesuffix("_mixed")]
            print(f"{path}: mixed per-sample scales vs uniform at {mixed[0]}: "
                  f"{sec[mixed[0]]['ms_per_step'] / uni['ms_per_step'] - 1:+.1%} per step")
    for path in ("compile", "cudagraphs", "fp8", "sdpa"):
        f = r.get(path, {}).get("fidelity")
        if f:
            print(f"{path} vs {'float32' if r['smoke'] and path != 'fp8' else 'bf16'} eager on {f['images']} fixed requests: PSNR {f['psnr_db']} dB (worst image "
                  f"{f['psnr_min_db']} dB), max pixel difference {f['max_diff']}/255")
    for path in ("compile", "cudagraphs"):
        c = r.get(path, {})
        if "cold_start_s" in c:
            print(f"{path} cold start (empty cache, in process): {c['cold_start_s']:.1f}s to load and warm "
                  f"{len(c['warm_up']['unet'])} UNet and {len(c['warm_up']['vae'])} VAE graphs")
        w = c.get("warm_start", {})
        if "ready_s" in w:
            print(f"{path} warm start (fresh process, cache left by the cold one): ready in {w['ready_s']:.1f}s "
                  f"(warm-up {w['warm_up']['total_s']:.1f}s, compiled: {w['compiled']})")
        if "warm_up" in c:
            print(f"{path}: warm-up {c['warm_up']['total_s']:.1f}s in process; graphs compiled after it: "
                  f"{c.get('graphs_after_warm_up')}, by two scale changes: {c.get('graphs_compiled_by_scale_changes')}")
    v = r.get("vae", {})
    if "eager_ms" in v:
        print(f"VAE decode batch {v['batch']}: eager {v['ms_per_image_eager']:.1f} ms/image, channels-last compiled "
              f"{v['ms_per_image_compiled']:.1f} ms/image (PSNR {v['fidelity']['psnr_db']} dB)")
    sd = r.get("sdpa", {}).get("pick")
    if sd:
        print(f"SDPA backend picked: {sd['backend']} ({sd['how']}; ms {sd['ms']})")
    tr = r.get("train", {})
    for k, v in tr.items():
        if not isinstance(v, dict):
            continue
        if "round_s" in v:
            peak = f", peak {v['peak_gib']:.1f} GiB" if v.get("peak_gib") else ""
            scaling = f", {v['scaling_vs_1']:.2f}x one rank" if "scaling_vs_1" in v else ""
            print(f"SPO round ({k.replace('_', ' ')}, {v['ranks']} rank(s), {v['pairs_per_step']} pairs/step): "
                  f"{v['round_s']:.2f}s, {v['pairs']} pairs, {v['pairs_per_s']:.2f} pairs/s{peak}{scaling}")
        else:
            print(f"SPO round ({k.replace('_', ' ')}): {json.dumps(v)[:200]}")


if __name__ == "__main__":
    main()
