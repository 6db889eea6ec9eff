"""A training job's configuration (`TrainConfig`): every hyperparameter, typed and bounded, with the paper's
SDXL recipe as defaults; saved with every checkpoint and exported adapter. Its checks name the field
(`config.<name>`) and the allowed range; `pairs_per_step` and `accumulation` derive the optimiser step's
size for a number of data-parallel ranks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from spo_runtime.errors import InvalidRequestError
from spo_runtime.limits import MAX_SEED, SIZE_RANGE
from spo_runtime.preference.spm_source import default_spm_path
from spo_runtime.validation import validation_error

MAX_ROUNDS = 1_000_000  # max_rounds, checkpoint_every
MAX_TARGETS = 64  # targets: suffixes of UNet layer names
MAX_TARGET_CHARS = 128
SPM_SUFFIXES = (".safetensors", ".bin")


def _bounded(default, lo=None, hi=None, *, gt=None, lt=None):
    """A float field in a closed (or half-open) range, never NaN or infinite."""
    return Field(default, ge=lo, le=hi, gt=gt, lt=lt, allow_inf_nan=False)


class TrainConfig(BaseModel):
    """Every hyperparameter of a job; saved with every checkpoint. Defaults: the paper's SDXL recipe.
    Every number is bounded (a 400 names `config.<field>` and the range), so no job can ask for a size,
    a round count or a file the server cannot honour."""

    model_config = ConfigDict(extra="forbid")

    # sampling (DDIM, eta 1, CFG with an empty negative prompt)
    num_inference_steps: int = Field(20, ge=2, le=100)
    guidance_scale: float = _bounded(5.0, 0.0, 30.0)
    eta: float = _bounded(1.0, gt=0.0, hi=1.0)
    train_t_max: int = Field(751, ge=1, le=999)  # steps with t above this are sampled once, untrained
    chunk: int = Field(4, ge=1, le=50)  # steps per branch chunk
    k: int = Field(2, ge=2, le=16)  # candidates per branch point
    threshold: float = _bounded(0.4, 0.0, lt=1.0)  # keep a pair if p_w - p_l exceeds this
    # default: the preset's; the server narrows these to the served preset's sizes
    width: int | None = Field(None, ge=SIZE_RANGE[0], le=SIZE_RANGE[1], multiple_of=8)
    height: int | None = Field(None, ge=SIZE_RANGE[0], le=SIZE_RANGE[1], multiple_of=8)
    # loss
    beta: float = _bounded(10.0, gt=0.0, hi=1000.0)
    ratio_clip: float = _bounded(0.1, gt=0.0, lt=1.0)
    # LoRA
    rank: int = Field(64, ge=1, le=512)
    alpha: float = _bounded(64.0, gt=0.0, hi=4096.0)
    targets: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]  # suffixes of UNet layer names (1..64)
    # optimiser
    lr: float = _bounded(1e-5, gt=0.0, hi=1.0)
    betas: tuple[float, float] = (0.9, 0.999)  # each in [0, 1)
    weight_decay: float = _bounded(1e-4, 0.0, 1.0)
    adam_eps: float = _bounded(1e-8, gt=0.0, hi=1.0)
    grad_clip: float = _bounded(1.0, gt=0.0, hi=1000.0)
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
    epochs: float = _bounded(10.0, gt=0.0, hi=1000.0)  # passes over the prompt list
    max_rounds: int | None = Field(None, ge=1, le=MAX_ROUNDS)
    seed: int = Field(42, ge=0, le=MAX_SEED)
    # precision and memory
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # base weights' dtype; LoRA stays fp32
    gradient_checkpointing: bool = False
    # scoring
    scorer: Literal["spm", "brightness", "darkness"] = "spm"
    # SPM checkpoint (.safetensors, or .bin read with weights_only); default: SPO_SPM. A job's must be
    # SPO_SPM or a file under SPO_ADAPTER_DIR (`with_spm_under`)
    spm_path: str | None = Field(default_factory=default_spm_path, max_length=4096)
    # bookkeeping
    checkpoint_every: int = Field(10, ge=1, le=MAX_ROUNDS)  # rounds
    keep_checkpoints: int = Field(2, ge=1, le=100)

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if not 1 <= len(v) <= MAX_TARGETS:
            raise ValueError(f"must hold 1..{MAX_TARGETS} suffixes of UNet layer names, got {len(v)}")
        for t in v:
            if not 1 <= len(t) <= MAX_TARGET_CHARS:
                raise ValueError(f"each must be 1..{MAX_TARGET_CHARS} characters, got one of {len(t)}")
        return v

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):  # NaN fails too
            raise ValueError(f"each must be in [0, 1), got {list(v)}")
        return v

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
            err = validation_error(e, cls)
            raise InvalidRequestError(f"config.{err.field}", err.message) from None

    def with_spm_under(self, root: str | Path, configured: str | None) -> TrainConfig:
        """This config with `spm_path` checked and made absolute: None, `configured` (SPO_SPM), or a
        .safetensors/.bin file that resolves (links followed) under `root` (SPO_ADAPTER_DIR; a relative
        path is taken from there). Anything else, an absolute path elsewhere or `..` out of it included,
        raises InvalidRequestError naming config.spm_path."""
        value = self.spm_path
        if value is None or (configured and value == configured):
            return self
        field = "config.spm_path"
        rule = "must be SPO_SPM or a .safetensors or .bin file under SPO_ADAPTER_DIR (a path relative to it)"
        if "\x00" in value:
            raise InvalidRequestError(field, rule)
        base = Path(root).resolve()
        path = (base / value).resolve()  # an absolute value replaces base
        if configured and path == Path(configured).resolve():
            return self.model_copy(update={"spm_path": configured})
        if not path.is_relative_to(base):
            raise InvalidRequestError(field, f"{rule}, got {value!r}")
        if path.suffix.lower() not in SPM_SUFFIXES:
            raise InvalidRequestError(field, f"must end with .safetensors or .bin, got {value!r}")
        if not path.is_file():
            raise InvalidRequestError(field, f"no such file under SPO_ADAPTER_DIR: {value!r}")
        return self.model_copy(update={"spm_path": str(path)})
