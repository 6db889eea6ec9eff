"""A training job's configuration (`TrainConfig`): every hyperparameter, typed and bounded, with the paper's
SDXL recipe as defaults; saved with every checkpoint and exported adapter. Its checks name the field
(`config.<name>`) and the allowed range; `pairs_per_step` and `accumulation` derive the optimiser step's
size for a number of data-parallel ranks."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spo_runtime.errors import InvalidRequestError
from spo_runtime.training.spm_source import default_spm_path
from spo_runtime.validation import validation_error


class TrainConfig(BaseModel):
    """Every hyperparameter of a job; saved with every checkpoint. Defaults: the paper's SDXL recipe."""

    model_config = ConfigDict(extra="forbid")

    # sampling (DDIM, eta 1, CFG with an empty negative prompt)
    num_inference_steps: int = Field(20, ge=2, le=100)
    guidance_scale: float = Field(5.0, ge=0.0, le=30.0)
    eta: float = Field(1.0, gt=0.0, le=1.0)
    train_t_max: int = Field(751, ge=1, le=999)  # steps with t above this are sampled once, untrained
    chunk: int = Field(4, ge=1, le=50)  # steps per branch chunk
    k: int = Field(2, ge=2, le=16)  # candidates per branch point
    threshold: float = Field(0.4, ge=0.0, lt=1.0)  # keep a pair if p_w - p_l exceeds this
    width: int | None = None  # default: the preset's
    height: int | None = None
    # loss
    beta: float = Field(10.0, gt=0.0)
    ratio_clip: float = Field(0.1, gt=0.0, lt=1.0)
    # LoRA
    rank: int = Field(64, ge=1, le=512)
    alpha: float = Field(64.0, gt=0.0)
    targets: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]  # suffixes of UNet layer names
    # optimiser
    lr: float = Field(1e-5, gt=0.0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-4, ge=0.0)
    adam_eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    # kept pairs per optimiser step over all ranks: the paper's 4 GPUs x 2 pairs x 2 accumulation
    effective_batch: int = Field(16, ge=1, le=4096)
    micro_batch: int = Field(2, ge=1, le=256)  # pairs per forward/backward on one rank
    # micro-batches per optimiser step on each rank; unset: derived, effective_batch / (micro_batch x nproc).
    # Given without effective_batch, it sets the effective batch: micro_batch x grad_accum x nproc.
    grad_accum: int | None = Field(None, ge=1, le=256)
    prompts_per_round: int = Field(2, ge=1, le=256)  # per rank
    rollout_batch: int | None = Field(None, ge=1, le=256)  # prompts per sampling batch; unset: the round's
    # data-parallel ranks; unset: SPO_TRAIN_NPROC, else the training GPUs' count on CUDA, 1 on CPU
    nproc: int | None = Field(None, ge=1, le=64)
    epochs: float = Field(10.0, gt=0.0)  # passes over the prompt list
    max_rounds: int | None = Field(None, ge=1)
    seed: int = Field(42, ge=0)
    # precision and memory
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # base weights' dtype; LoRA stays fp32
    gradient_checkpointing: bool = False
    # scoring
    scorer: Literal["spm", "brightness", "darkness"] = "spm"
    # SPM checkpoint (.safetensors, or .bin read with weights_only); default: SPO_SPM
    spm_path: str | None = Field(default_factory=default_spm_path)
    # bookkeeping
    checkpoint_every: int = Field(10, ge=1)  # rounds
    keep_checkpoints: int = Field(2, ge=1)

    def pairs_per_step(self, world: int) -> int:
        """Kept pairs per optimiser step over all `world` ranks (the effective batch)."""
        if self.grad_accum is not None and "effective_batch" not in self.model_fields_set:
            return self.micro_batch * self.grad_accum * world
        return self.effective_batch

    def accumulation(self, world: int) -> int:
        """Micro-batches per optimiser step on each rank (on average: ranks split each step's pairs)."""
        return max(1, math.ceil(self.pairs_per_step(world) / (self.micro_batch * world)))

    def check_world(self, world: int) -> None:
        """Given both, grad_accum and effective_batch must agree for `world` ranks."""
        if self.grad_accum is not None and "effective_batch" in self.model_fields_set:
            want = self.micro_batch * self.grad_accum * world
            if want != self.effective_batch:
                raise InvalidRequestError(
                    "config.grad_accum", f"micro_batch x grad_accum x nproc = {self.micro_batch} x {self.grad_accum} x "
                                         f"{world} = {want} differs from effective_batch {self.effective_batch}; give one of the two")

    @classmethod
    def parse(cls, data: dict) -> TrainConfig:
        """`data` validated; a bad value raises InvalidRequestError naming `config.<field>`."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = validation_error(e)
            raise InvalidRequestError(f"config.{err.field}", str(err).split(": ", 1)[-1]) from None
