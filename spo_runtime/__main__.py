"""Command line: `python -m spo_runtime {generate,info,save-tiny}`. Settings come from SPO_* variables."""

from __future__ import annotations

import argparse
import json
import logging
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
