"""Setting up and running a trainer: `build_trainer`, the one set-up of the CLI (`python -m spo_runtime train`)
and of training jobs (`job_process`); `read_prompts`, their prompt file; `train_rank`, the CLI as one
data-parallel rank."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from spo_runtime.training.config import TrainConfig
from spo_runtime.training.distributed import LOCAL, Group, rank_threads, run_rank
from spo_runtime.training.trainer import SPOTrainer

__all__ = ["build_trainer", "read_prompts", "train_rank"]


def read_prompts(path: str | Path) -> list[str]:
    """A prompt file: one prompt per line, blank lines skipped."""
    return [p for p in Path(path).read_text().splitlines() if p.strip()]


def build_trainer(config: TrainConfig, prompts: list[str], out_dir: str | Path,
                  start_adapter: str | Path | None = None, resume: bool = True, group: Group = LOCAL) -> SPOTrainer:
    """The trainer of `python -m spo_runtime train` and of a training job (one per rank): a pipeline of
    its own from the SPO_* settings on the rank's device (unfused; base weights in the config's
    precision, LoRA parameters and branch in float32), resumed from `out_dir`'s last checkpoint when
    there is one (`trainer.resumed_from`)."""
    from spo_runtime.model.loading import load_pipeline
    from spo_runtime.settings import Settings

    dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(config.mixed_precision)  # "no": the preset's dtype
    device = str(group.device) if group.device is not None else None
    threads = None
    if group.distributed and group.device.type == "cpu" and not os.environ.get("SPO_TORCH_THREADS"):
        threads = rank_threads(group.world)  # the ranks share the cores
    # the trainer needs backward through the UNet: never the float8 base (no backward) nor a compiled serving graph
    settings = Settings.from_env(lora_fuse=False, dtype=dtype, device=device, torch_threads=threads, quant="none", compile=False)
    pipe = load_pipeline(settings)
    trainer = SPOTrainer(pipe, config, prompts, out_dir, start_adapter=start_adapter, faults=settings.fault_plan, group=group)
    if resume:
        trainer.load_checkpoint()
    return trainer


def train_rank(rank: int, world: int, rendezvous: str | None, devices: list[str], config_json: str, prompts_path: str,
               out_dir: str, start_adapter: str | None, name: str) -> None:
    """`python -m spo_runtime train` as rank `rank` of `world` (in its own process when world > 1): rank 0
    prints each round's statistics as a JSON line, writes the checkpoints and exports the adapter."""
    def body(group: Group) -> None:
        cfg = TrainConfig.model_validate_json(config_json)
        trainer = build_trainer(cfg, read_prompts(prompts_path), out_dir, start_adapter=start_adapter, group=group)
        if trainer.resumed_from is not None and group.main:
            print(f"resumed at round {trainer.round}", file=sys.stderr)
        trainer.train(on_round=lambda s: group.main and print(json.dumps(s), flush=True))
        if group.main:
            # the CLI's own output directory: a run trained further replaces its adapter
            print(json.dumps(trainer.export(Path(out_dir), name, replace=True)), flush=True)

    # one process on CPU: the settings' device (SPO_DEVICE), as the CLI always trained
    device = devices[rank] if world > 1 or devices[0].startswith("cuda") else None
    run_rank(rank, world, rendezvous, device, out_dir, body)
