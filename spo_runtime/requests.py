"""What a caller asks for (`GenerationRequest`), what it gets (`GeneratedImage`), and the state a
request carries while it runs (`RequestState`)."""

from __future__ import annotations

import enum
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from .errors import InvalidRequestError
from .sampler import SCHEDULERS, RowState

MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 4000
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _range(name: str, v: float, lo: float, hi: float) -> None:
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"must be a finite number in {lo}..{hi}, got {v}")
    if not lo <= v <= hi:
        raise ValueError(f"must be in {lo}..{hi}, got {v}")


class GenerationRequest(BaseModel):
    """One text-to-image request. Field names are the HTTP names.

    Validate with `GenerationRequest.parse(data, size_range=(lo, hi))` to get an
    `InvalidRequestError` naming the field and the allowed range.
    """

    # strict: "20" is not a step count, true is not a seed (ints are still accepted for floats)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    prompt: str
    negative_prompt: str | None = None  # None: SDXL's zero negative embedding; "" is encoded
    width: int | None = None  # None: the preset's default (1024 for SDXL, 64 for tiny)
    height: int | None = None
    num_inference_steps: int = 20
    guidance_scale: float = 5.0  # <= 1 disables classifier-free guidance
    scheduler: str = "ddim"
    seed: int | None = None  # None: drawn and reported
    lora_scale: float | None = None  # None: the server's current default
    adapter: str | None = None  # None: the server's current default adapter
    eta: float = 0.0  # DDIM stochasticity (0 = deterministic DDIM); ddim only

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty string")
        if len(v) > MAX_PROMPT_CHARS:
            raise ValueError(f"must be at most {MAX_PROMPT_CHARS} characters, got {len(v)}")
        return v

    @field_validator("negative_prompt")
    @classmethod
    def _negative(cls, v: str | None) -> str | None:
        if v is not None and len(v) > MAX_PROMPT_CHARS:
            raise ValueError(f"must be at most {MAX_PROMPT_CHARS} characters, got {len(v)}")
        return v

    @field_validator("width", "height")
    @classmethod
    def _size(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is None:
            return v
        lo, hi = (info.context or {}).get("size_range", (64, 4096))
        if v % 8 or not lo <= v <= hi:
            raise ValueError(f"must be a multiple of 8 in {lo}..{hi}, got {v}")
        return v

    @field_validator("num_inference_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        _range("num_inference_steps", v, 1, 100)
        return v

    @field_validator("guidance_scale")
    @classmethod
    def _guidance(cls, v: float) -> float:
        _range("guidance_scale", v, 0.0, 30.0)
        return v

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        if v not in SCHEDULERS:
            raise ValueError(f"must be one of {', '.join(SCHEDULERS)}, got {v!r}")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_SEED:
            raise ValueError(f"must be in 0..{MAX_SEED}, got {v}")
        return v

    @field_validator("lora_scale")
    @classmethod
    def _scale(cls, v: float | None) -> float | None:
        if v is not None:
            _range("lora_scale", v, -2.0, 2.0)
        return v

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, v: str | None) -> str | None:
        if v is not None and not ADAPTER_NAME.match(v):
            raise ValueError("must be 1..64 characters of letters, digits, '_', '.', '-', starting with a letter or digit")
        return v

    @field_validator("eta")
    @classmethod
    def _eta(cls, v: float, info: ValidationInfo) -> float:
        _range("eta", v, 0.0, 1.0)
        if v > 0 and info.data.get("scheduler", "ddim") != "ddim":
            raise ValueError("must be 0 unless scheduler is 'ddim'")
        return v

    @classmethod
    def parse(cls, data: Any, size_range: tuple[int, int] | None = None) -> GenerationRequest:
        """Validate `data` (a dict or a request); raise InvalidRequestError naming every bad field."""
        if isinstance(data, GenerationRequest):
            data = data.model_dump(exclude_unset=True)
        context = {"size_range": size_range} if size_range else None
        try:
            return cls.model_validate(data, context=context)
        except ValidationError as e:
            raise validation_error(e) from None


def validation_error(e: ValidationError) -> InvalidRequestError:
    """Pydantic's errors -> one InvalidRequestError (first field; every problem in `.errors`)."""
    problems = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "field required"
        problems.append((loc, msg))
    first, rest = problems[0], problems[1:]
    out = InvalidRequestError(first[0], first[1] + "".join(f"; {f}: {m}" for f, m in rest))
    out.errors = problems
    return out


@dataclass
class GeneratedImage:
    """One finished request: the image and what produced it."""

    image: Image.Image
    seed: int
    lora_scale: float
    adapter: str | None
    adapter_sha256: str | None
    prompt_truncated: bool
    request: GenerationRequest
    timings: dict[str, float] = field(default_factory=dict)  # queue_ms, encode_ms, denoise_ms, decode_ms

    def parameters_text(self) -> str:
        """A1111-style `parameters` text (the PNG text chunk)."""
        r = self.request
        lines = [r.prompt]
        if r.negative_prompt is not None:
            lines.append(f"Negative prompt: {r.negative_prompt}")
        lines.append(
            f"Steps: {r.num_inference_steps}, Sampler: {r.scheduler}, CFG scale: {r.guidance_scale}, "
            f"Seed: {self.seed}, Size: {self.image.width}x{self.image.height}, "
            f"Lora: {self.adapter}, Lora scale: {self.lora_scale}"
            + (f", Lora hash: {self.adapter_sha256[:16]}" if self.adapter_sha256 else "")
            + (f", Eta: {r.eta}" if r.eta else "")
        )
        return "\n".join(lines)


class Status(enum.IntEnum):
    """Ordered lifecycle of a request (later values are further along)."""

    WAITING = 0
    RUNNING = 1
    FINISHED = 2
    FAILED = 3
    CANCELLED = 4


@dataclass
class RequestState:
    """A request while it runs: resolved parameters, conditioning, sampler row and latent."""

    request: GenerationRequest
    seed: int
    width: int
    height: int
    adapter: str | None
    lora_scale: float
    row: RowState
    latents: torch.Tensor  # (1, C, h, w)
    prompt_embeds: torch.Tensor | None = None  # (1, 77, D)
    pooled: torch.Tensor | None = None  # (1, P)
    negative_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    prompt_truncated: bool = False
    status: Status = Status.WAITING
    error: BaseException | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    tag: Any = None  # the engine's handle (future, deadline, ...)

    @property
    def cfg(self) -> bool:
        return self.request.guidance_scale > 1.0

    @property
    def scales(self) -> dict[str, float]:
        """This row's LoRA scale over the loaded adapters (absent = 0)."""
        return {self.adapter: self.lora_scale} if self.adapter is not None and self.lora_scale != 0 else {}
