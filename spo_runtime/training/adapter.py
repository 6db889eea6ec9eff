"""The adapter a trainer trains: its first weights, its place in the pipeline's registry and the weights
read back.

A job either starts a new LoRA (`init_lora_modules`: A gaussian with std 1/r, B zero, so the adapter starts
as the base model) or continues a LoRA file, which then also stays loaded, frozen, as the reference model.
In the registry the trained adapter is `TRAIN`, in float32 parameters whatever the base's dtype, with
alpha / r folded into B.
"""

from __future__ import annotations

from typing import Sequence

import torch

from spo_runtime.errors import InvalidRequestError
from spo_runtime.lora.format import LoraFile, LoraModuleWeights, ModuleSpec, module_specs
from spo_runtime.lora.runtime import LoraRegistry
from spo_runtime.model.pipeline import SpoPipeline
from spo_runtime.training.config import TrainConfig

__all__ = ["REF", "TRAIN", "init_lora_modules", "load_trainable", "trained_modules"]

TRAIN = "train"  # the trainable adapter's name inside the trainer's registry
REF = "ref"  # the frozen starting adapter (reference model), when continuing one


def init_lora_modules(specs: dict[str, ModuleSpec], targets: Sequence[str], rank: int, alpha: float,
                      generator: torch.Generator) -> dict[str, LoraModuleWeights]:
    """New LoRA weights on the layers of `specs` whose names end with "." + one of `targets`: down (A) of
    shape (rank, in, *kernel) drawn from N(0, 1/rank^2) by `generator`, up (B) of shape (out, rank, 1, 1 for a
    convolution) zero, so that the adapter changes nothing until trained."""
    suffixes = tuple("." + t for t in targets)
    chosen = [m for m in specs if m.endswith(suffixes)]
    if not chosen:
        raise InvalidRequestError("config.targets", f"no UNet layer ends with any of {list(targets)}")
    modules = {}
    for m in chosen:
        sp = specs[m]
        k = sp.kernel_size if sp.kind == "conv" else ()
        down = torch.randn(rank, sp.in_features, *k, generator=generator) / rank
        up = torch.zeros(sp.out_features, rank, *((1, 1) if k else ()))
        modules[m] = LoraModuleWeights(m, down, up, alpha)
    return modules


def load_trainable(pipe: SpoPipeline, config: TrainConfig, start: LoraFile | None) -> list[torch.nn.Parameter]:
    """Load the trainable adapter `TRAIN` into `pipe`'s registry: a float32 copy of `start`, or new weights
    (`init_lora_modules` of the config's targets, rank and alpha, seeded by `config.seed`). Returns its
    parameters in module order (down, up of each), the order that indexes the optimiser's saved state."""
    if start is not None:
        modules = {m: LoraModuleWeights(m, w.down.float().clone(), w.up.float().clone(), w.alpha) for m, w in start.modules.items()}
    else:
        modules = init_lora_modules(module_specs(pipe.unet), config.targets, config.rank, config.alpha,
                                    torch.Generator().manual_seed(config.seed))
    reg = pipe.registry
    reg.load(TRAIN, LoraFile("diffusers", modules), source="trainer")
    trainable = reg.make_trainable(TRAIN)  # fp32 parameters; alpha / r folded into up by the registry
    return [p for m in modules for p in trainable[m]]


def trained_modules(registry: LoraRegistry) -> dict[str, LoraModuleWeights]:
    """The trained adapter, copied to the CPU in float32 (alpha / rank folded into up, so alpha = rank)."""
    return {m: LoraModuleWeights(m, w.down.float(), w.up.float(), w.alpha) for m, w in registry.module_weights(TRAIN).items()}
