"""What a caller asks for (`GenerationRequest`), what it gets (`GeneratedImage`), and a request
while it runs (`ActiveRequest`: its conditioning, latent and `SamplerRow`)."""

from __future__ import annotations

import enum
import functools
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator

from spo_runtime.imaging import check_image_size, decode_image
from spo_runtime.limits import (ADAPTER_NAME, ADAPTER_NAME_RULE, DEFAULT_STRENGTH, GUIDANCE_RANGE, LORA_SCALE_RANGE,
                                MAX_IMAGE_PIXELS, MAX_PROMPT_CHARS, MAX_SEED, SIZE_RANGE, STEPS_RANGE)
from spo_runtime.sampling.sampler import SCHEDULERS, SamplerRow
from spo_runtime.validation import allowed, invalid, validation_error

# Prompt text: anything but control characters (tab, newline and carriage return are allowed). NUL would
# end the PNG `parameters` chunk's keyword; the others have no meaning in a prompt. Refused, not escaped.
_TEXT = r"[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
_VISIBLE = r"[^\s\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
Scheduler = Literal[SCHEDULERS]  # type: ignore[valid-type]


class GenerationRequest(BaseModel):
    """One text-to-image request: the one schema of /generate, /generate_batch, the CLI and the load test.

    Field names are the HTTP names; bounds, enums and descriptions here are what /docs.json publishes.
    Validate with `GenerationRequest.parse(data, size_range=(lo, hi))` to get an `InvalidRequestError`
    naming the field and the allowed range. Types are strict: "20" is not a step count and true is not a
    seed (integers are accepted where a number is expected).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True,
                              # OpenAPI 3.0's singular `example` (BentoML's document is 3.0)
                              json_schema_extra={"example": {"prompt": "a watercolor fox in a snowy forest", "seed": 42,
                                                             "num_inference_steps": 20}})

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=rf"^{_TEXT}*{_VISIBLE}{_TEXT}*$",
                        description="What to draw: 1..4000 characters, not only whitespace; no control characters "
                                    "but tab and newline.",
                        json_schema_extra={"example": "a watercolor fox in a snowy forest"})
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, pattern=rf"^{_TEXT}*$",
        description="What to avoid (no control characters but tab and newline). Absent or null: SDXL's all-zero "
                    "negative embedding; \"\" is encoded as empty text.")
    width: int | None = Field(None, ge=SIZE_RANGE[0], le=SIZE_RANGE[1], multiple_of=8,
                              description="Image width in pixels, a multiple of 8 in the preset's range; null: the preset's default.")
    height: int | None = Field(None, ge=SIZE_RANGE[0], le=SIZE_RANGE[1], multiple_of=8,
                               description="Image height in pixels, a multiple of 8 in the preset's range; null: the preset's default.")
    num_inference_steps: int = Field(20, ge=STEPS_RANGE[0], le=STEPS_RANGE[1],
                                     description=f"Denoising steps, {STEPS_RANGE[0]}..{STEPS_RANGE[1]}.")
    guidance_scale: float = Field(5.0, ge=GUIDANCE_RANGE[0], le=GUIDANCE_RANGE[1], allow_inf_nan=False,
                                  description=f"Classifier-free guidance, {GUIDANCE_RANGE[0]:g}..{GUIDANCE_RANGE[1]:g}; <= 1 disables guidance (one UNet pass per step).")
    scheduler: Scheduler = Field("ddim", description="Sampler: " + ", ".join(SCHEDULERS) + ".")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description=f"0..{MAX_SEED}; null: drawn and reported in X-Seed.")
    lora_scale: float | None = Field(None, ge=LORA_SCALE_RANGE[0], le=LORA_SCALE_RANGE[1], allow_inf_nan=False,
                                     description=f"LoRA scale, {LORA_SCALE_RANGE[0]:g}..{LORA_SCALE_RANGE[1]:g}; null: the server's current default.")
    adapter: str | None = Field(None, pattern=ADAPTER_NAME.pattern, max_length=64,
                                description=f"Name of a loaded adapter ({ADAPTER_NAME_RULE}); null: the server's default "
                                            "adapter. A name that is not loaded is a 400 naming `adapter`.")
    eta: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False,
                       description="DDIM stochasticity, 0..1 (0: deterministic). Must be 0 unless scheduler is 'ddim' "
                                   "(a 400 naming `eta`).")

    init_image: Any = Field(
        None, json_schema_extra={"type": "string", "format": "byte"},
        description="img2img: the starting image, base64 PNG, JPEG or WebP (a data: URL prefix is allowed; a PIL "
                    f"image in the library), at most {MAX_IMAGE_PIXELS:,} pixels (the body limit is SPO_MAX_IMAGE_BYTES), "
                    "turned upright by its EXIF orientation. The output has its size rounded "
                    "down to a multiple of 8 unless width/height are given (then the image is resized to them, and "
                    "may hold at most as many pixels as the preset's largest image); a size outside the preset's "
                    "range is a 400 naming `init_image`, answered from the image's header before it is decoded.")
    strength: float | None = Field(
        None, gt=0.0, le=1.0, allow_inf_nan=False,
        description=f"img2img: how much of the schedule runs, (0, 1]; null: {DEFAULT_STRENGTH}. The last "
                    "int(num_inference_steps * strength) steps run, so that product must be >= 1. Only with init_image "
                    "(a 400 naming `strength` otherwise).")

    @field_validator("eta")
    @classmethod
    def _eta(cls, v: float, info: ValidationInfo) -> float:
        if v > 0 and info.data.get("scheduler", "ddim") != "ddim":
            raise ValueError("must be 0 unless scheduler is 'ddim'")
        return v

    # the sides this model allows (a preset's: `for_sizes`); an init_image is checked against them from its header
    size_range: ClassVar[tuple[int, int]] = SIZE_RANGE

    @field_validator("init_image", mode="plain")
    @classmethod
    def _init_image(cls, v: Any, info: ValidationInfo) -> Image.Image | None:
        if v is None:
            return None
        return decode_image(v, cls.size_range, info.data.get("width"), info.data.get("height"))

    @field_validator("strength")
    @classmethod
    def _strength(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("init_image") is None:
            raise ValueError("only with init_image (img2img)")
        steps = info.data.get("num_inference_steps", 20)
        if int(steps * (v if v is not None else DEFAULT_STRENGTH)) < 1 and info.data.get("init_image") is not None:
            raise ValueError(f"with num_inference_steps={steps} must be >= {1 / steps:.4g} (at least one step runs)")
        return v

    @property
    def img2img_strength(self) -> float | None:
        """The strength in force: None for text-to-image."""
        if self.init_image is None:
            return None
        return self.strength if self.strength is not None else DEFAULT_STRENGTH

    @classmethod
    @functools.cache
    def for_sizes(cls, lo: int, hi: int) -> type[GenerationRequest]:
        """This model with width and height bounded to a preset's range (cached: one class per range)."""
        if (lo, hi) == SIZE_RANGE:
            return cls
        size = {name: (int | None, Field(None, ge=lo, le=hi, multiple_of=8, description=f.description))
                for name, f in cls.model_fields.items() if name in ("width", "height")}
        model = create_model(cls.__name__, __base__=cls, __module__=cls.__module__, __doc__=cls.__doc__, **size)
        model.size_range = (lo, hi)
        return model

    @classmethod
    def parse(cls, data: Any, size_range: tuple[int, int] | None = None) -> GenerationRequest:
        """Validate `data` (a dict); raise InvalidRequestError naming every bad field. A request is parsed
        once: one given here is already valid, so it comes back as is (its image not copied) once its sizes
        are checked against `size_range`, the one bound a preset narrows."""
        if isinstance(data, GenerationRequest):
            if size_range:
                data.check_sizes(*size_range)
            return data
        model = cls.for_sizes(*size_range) if size_range else cls
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e, model) from None

    def check_sizes(self, lo: int, hi: int) -> None:
        """Raise the InvalidRequestError that validating this request against `for_sizes(lo, hi)` would
        raise for its width and height (the rest of it is valid already)."""
        model = GenerationRequest.for_sizes(lo, hi)
        problems = [(name, f"must be {allowed(model, name)}, got {v!r}") for name in ("width", "height")
                    if (v := getattr(self, name)) is not None and not lo <= v <= hi]
        if self.init_image is not None and not problems:
            try:
                check_image_size(self.init_image.size, (lo, hi), self.width, self.height)
            except ValueError as e:
                problems.append(("init_image", str(e)))
        if problems:
            raise invalid(problems)


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
            + (f", Denoising strength: {r.img2img_strength}" if r.init_image is not None else "")
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
class ActiveRequest:
    """A request while it runs: resolved parameters, conditioning, sampler row and latent."""

    request: GenerationRequest
    seed: int
    width: int
    height: int
    adapter: str | None
    lora_scale: float
    row: SamplerRow
    latents: torch.Tensor  # (1, C, h, w)
    prompt_embeds: torch.Tensor | None = None  # (1, 77, D)
    pooled: torch.Tensor | None = None  # (1, P)
    negative_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    prompt_truncated: bool = False
    status: Status = Status.WAITING
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
