"""Command line: `python -m spo_runtime {generate,info,save-tiny,download,train}`; `spo-serve` starts the HTTP
server. Settings come from SPO_* variables."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import typing
from pathlib import Path

from spo_runtime.errors import SpoError
from spo_runtime.imaging import encode_image
from spo_runtime.requests import GenerationRequest

# CLI spellings kept from before the options were derived from the request model
_ALIASES = {"negative_prompt": ["--negative"], "num_inference_steps": ["--steps"], "guidance_scale": ["--guidance"]}


def add_request_options(parser: argparse.ArgumentParser) -> None:
    """One option per field of the request model (but the prompt), typed and described from it: the CLI
    and HTTP share one schema, and the request model's validation names any bad value."""
    for name, f in GenerationRequest.model_fields.items():
        if name == "prompt":
            continue
        if typing.get_origin(f.annotation) is typing.Literal:
            choices, kind = typing.get_args(f.annotation), str
        else:
            choices, kind = None, next(a for a in typing.get_args(f.annotation) or (f.annotation,) if a is not type(None))
        default = f.default if f.default is not None else None
        parser.add_argument("--" + name.replace("_", "-"), *_ALIASES.get(name, []), dest=name, type=kind,
                            choices=choices, default=default, help=f"{f.description} (default: {default})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spo_runtime", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate one image")
    g.add_argument("prompt")
    add_request_options(g)
    g.add_argument("-o", "--output", default="out.png", help="output file (.png, .jpg, .webp)")
    sub.add_parser("info", help="print the loaded model's description as JSON")
    s = sub.add_parser("save-tiny", help="write the tiny model as a diffusers pipeline directory + LoRA files")
    s.add_argument("directory")
    d = sub.add_parser("download", help="fetch the pinned weights a preset needs (spo_runtime/model/weights.py)")
    d.add_argument("--preset", choices=["sdxl-spo", "tiny", "sdxl-random"], default=None,
                   help="default: SPO_MODEL, and sdxl-spo when that is auto")
    d.add_argument("--train", action="store_true", help="also the step-aware preference model and its tokenizer")
    d.add_argument("--dir", default=None, help="plain directories under DIR (then point SPO_BASE_MODEL, SPO_VAE, "
                                               "SPO_LORA ... at them) instead of the Hugging Face cache (HF_HOME)")
    d.add_argument("--dry-run", action="store_true", help="print the plan (repository, files, revision per part) "
                                                          "and fetch nothing; no network")
    d.add_argument("--json", action="store_true", help="print the plan or the result as JSON")
    t = sub.add_parser("train", help="train an SPO LoRA on a prompt file (resumes from DIR's last checkpoint)")
    t.add_argument("--prompts", required=True, help="text file, one prompt per line")
    t.add_argument("--output", required=True, help="directory for checkpoints, metrics.jsonl and the final adapter")
    t.add_argument("--start-adapter", default=None, help="continue this LoRA file (.safetensors)")
    t.add_argument("--name", default="spo-trained", help="name of the exported adapter files")
    t.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig overrides (JSON values)")
    t.add_argument("--nproc", type=int, default=None,
                   help="data-parallel ranks (default: config nproc, SPO_TRAIN_NPROC, the training GPUs, 1 on CPU)")
    j = sub.add_parser("train-job", help=argparse.SUPPRESS)  # the server's trainer process
    j.add_argument("job_dir")
    j.add_argument("--adapter-dir", required=True)
    j.add_argument("--parent-pid", type=int, default=None, help="die with this process (the supervisor)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        if args.command == "save-tiny":
            from spo_runtime.model.tiny import save_tiny

            print(json.dumps(save_tiny(args.directory), indent=2))
            return 0
        if args.command == "train-job":
            from spo_runtime.training.job_process import run_job

            return run_job(args.job_dir, args.adapter_dir, parent_pid=args.parent_pid)
        if args.command == "train":
            return _train(args)
        if args.command == "download":
            return _download(args)
        from spo_runtime.model.loading import load_pipeline
        from spo_runtime.settings import Settings

        pipe = load_pipeline(Settings.from_env())
        if args.command == "info":
            print(json.dumps(pipe.info(show_paths=True), indent=2))
            return 0
        req = {name: getattr(args, name) for name in GenerationRequest.model_fields if name != "prompt"}
        req["prompt"] = args.prompt
        [result] = pipe.generate([{k: v for k, v in req.items() if v is not None or k == "negative_prompt"}])
        out = Path(args.output)
        fmt = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(out.suffix.lower(), "png")
        out.write_bytes(encode_image(result, fmt))
        print(json.dumps({"output": str(out), "seed": result.seed, "lora_scale": result.lora_scale,
                          "adapter": result.adapter, "prompt_truncated": result.prompt_truncated,
                          "timings_ms": {k: round(v, 1) for k, v in result.timings.items()}}))
        return 0
    except SpoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _download(args) -> int:
    """The pinned plan of a preset, then each part fetched (or found in the cache) with its size on disk."""
    from spo_runtime.model import weights
    from spo_runtime.settings import Settings

    settings = Settings.from_env()
    preset = args.preset or (settings.model if settings.model != "auto" else "sdxl-spo")
    items = weights.plan(settings, preset, train=args.train)
    rows = [{"part": i.part.key, "what": i.part.what, "repo": i.repo, "revision": i.revision, "revision_from": i.how,
             "files": list(i.part.files), "approx_bytes": i.part.approx_bytes,
             **({"dir": str(Path(args.dir) / _dir_name(i.part.key))} if args.dir else {})} for i in items]
    unpinned = [i for i in items if not i.pinned]
    if args.dry_run:
        if args.json:
            print(json.dumps({"preset": preset, "parts": rows}, indent=2))
        else:
            where = args.dir or "the Hugging Face cache (HF_HOME)"
            print(f"{preset}: {len(items)} part(s), about {_gb(sum(r['approx_bytes'] for r in rows))} into {where}")
            for r in rows:
                rev = r["revision"] or "NOT PINNED"
                print(f"  {r['part']:<14} {r['repo']}@{rev} ({r['revision_from']}), about {_gb(r['approx_bytes'])}: "
                      f"{', '.join(r['files'])}")
        for i in unpinned:
            print(f"error: {i.part.revision_variable}: {i.refusal()}", file=sys.stderr)
        return 2 if unpinned else 0
    for i in unpinned:
        i.require()  # ConfigError naming SPO_*_REVISION, before anything is fetched
    done = []
    for item, row in zip(items, rows):
        path = weights.download(item, local_dir=row.get("dir"))
        size = weights.local_size(path)
        done.append({**row, "path": str(path), "commit": weights.resolved_commit(path, item), "bytes": size})
        if not args.json:
            print(f"{item.part.key:<14} {item.repo}@{done[-1]['commit']}: {_gb(size)} in {path}", flush=True)
    total = sum(r["bytes"] for r in done)
    if args.json:
        print(json.dumps({"preset": preset, "parts": done, "bytes": total}, indent=2))
    else:
        print(f"{preset}: {len(done)} part(s), {_gb(total)} on disk")
        if args.dir:
            for var, key in (("SPO_BASE_MODEL", "base"), ("SPO_BASE_MODEL_CONFIG", "base_config"), ("SPO_VAE", "vae"),
                             ("SPO_LORA", "lora"), ("SPO_SPM", "spm"), ("SPO_SPM_TOKENIZER", "spm_tokenizer")):
                for r in done:
                    if r["part"] == key:
                        print(f"export {var}={r['path']}")
    return 0


def _dir_name(key: str) -> str:
    """The directory of a part under --dir: the base's own VAE (SPO_VAE=base) goes into the base's pipeline directory."""
    return "base" if key == "base_vae" else key


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def serve_command(argv: list[str] | None = None) -> tuple[list[str], dict[str, str], Path]:
    """(command, environment, working directory) of `spo-serve`: `bentoml serve service.service:SPOService` with the
    defaults `make serve` uses. The BentoML service lives in the source tree's service/, beside spo_runtime/."""
    p = argparse.ArgumentParser(prog="spo-serve", description="Start the spo-serve HTTP server (BentoML).")
    p.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"),
                   help="address to bind (default 0.0.0.0: every interface; 127.0.0.1 keeps it on this machine)")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "3000")))
    args, extra = p.parse_known_args(argv)
    root = Path(__file__).resolve().parents[1]
    if not (root / "service" / "service.py").is_file():
        root = Path.cwd()
        if not (root / "service" / "service.py").is_file():
            raise SystemExit("spo-serve: service/service.py not found: run it from a checkout of the repository "
                             "(the BentoML service ships with the source tree, not inside the spo_runtime package)")
    bentoml = Path(sys.executable).with_name("bentoml")
    cmd = [str(bentoml) if bentoml.exists() else shutil.which("bentoml") or "bentoml", "serve",
           "service.service:SPOService", "--host", args.host, "--port", str(args.port), *extra]
    env = {**os.environ}
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    # one intra-op thread per worker kept the open-loop p95 within 1.14x with two busy processes on a 2-core
    # host, where torch's default (a thread per core) collapsed (benchmarks/RESULTS.md, Soak and contention)
    env.setdefault("SPO_TORCH_THREADS", "1")
    # idle OpenMP workers sleep instead of spinning on cores shared with other processes (RESULTS.md, contention)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return cmd, env, root


def serve(argv: list[str] | None = None) -> int:
    """The `spo-serve` console script: `spo-serve --port 3000` is `make serve`."""
    cmd, env, root = serve_command(sys.argv[1:] if argv is None else argv)
    os.chdir(root)
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def _train(args) -> int:
    from spo_runtime.training.distributed import launch, resolve_world
    from spo_runtime.settings import Settings
    from spo_runtime.training.config import TrainConfig
    from spo_runtime.training.run import read_prompts, train_rank

    overrides = {}
    for kv in args.config:
        key, _, value = kv.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    if args.nproc is not None:
        overrides["nproc"] = args.nproc
    cfg = TrainConfig.parse(overrides)
    world, devices = resolve_world(cfg.nproc, Settings.from_env(), field="--nproc")
    cfg.check_world(world)
    read_prompts(args.prompts)  # a missing prompt file fails here, before any rank starts
    spec = (cfg.model_dump_json(exclude_unset=True), str(args.prompts), str(args.output), args.start_adapter, args.name)
    if world == 1:
        train_rank(0, 1, None, devices, *spec)
        return 0
    Path(args.output).mkdir(parents=True, exist_ok=True)
    result = launch(world, train_rank, (devices, *spec), Path(args.output) / ".rendezvous", error_dir=args.output)
    if not result.ok:
        print(f"error: training failed: {result.reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
