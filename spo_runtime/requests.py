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
from spo_runtime.limits import BEST_OF_RANGE, DEFAULT_SEARCH_STEPS, SEARCH_STEPS_RANGE
from spo_runtime.sampling.sampler import img2img_start

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
    best_of: int = Field(
        1, ge=BEST_OF_RANGE[0], le=BEST_OF_RANGE[1],
        description=f"Candidates per image, {BEST_OF_RANGE[0]}..{BEST_OF_RANGE[1]}: they run in the same batch, candidate i "
                    "with seed + i (so each is reproducible alone), and the one the server's preference model scores "
                    "highest for the prompt is answered (X-Preference-Score, X-Best-Of). Counts as best_of images "
                    "against the queue and cost limits. seed + best_of - 1 must stay <= "
                    f"{MAX_SEED}.")
    search: Literal["step"] | None = Field(
        None, description="\"step\": the SPO paper's step-aware selection, with best_of > 1 (a 400 naming `search` "
                          "otherwise): at search_steps branch points the preference model scores every candidate's "
                          "estimate of the clean image at its timestep, and the best one seeds the next segment of "
                          "all of them; null: plain best_of (only the finished images are scored).")
    search_steps: int | None = Field(
        None, ge=SEARCH_STEPS_RANGE[0], le=SEARCH_STEPS_RANGE[1],
        description=f"Branch points of search \"step\", {SEARCH_STEPS_RANGE[0]}..{SEARCH_STEPS_RANGE[1]}, evenly spread, "
                    "fewer than the denoising steps the image runs; only with search; null: "
                    f"{DEFAULT_SEARCH_STEPS} (fewer when the image runs fewer than {DEFAULT_SEARCH_STEPS + 1} steps).")

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

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int, info: ValidationInfo) -> int:
        seed = info.data.get("seed")
        if seed is not None and seed + v - 1 > MAX_SEED:
            raise ValueError(f"with seed={seed} must be in {BEST_OF_RANGE[0]}..{MAX_SEED - seed + 1} (candidate i uses "
                             f"seed + i, at most {MAX_SEED}), got {v}")
        return v

    @field_validator("search")
    @classmethod
    def _search(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None or "best_of" not in info.data:  # a bad best_of is the error to report
            return v
        if info.data["best_of"] < 2:
            raise ValueError(f"only with best_of > 1 (candidates to choose between), got best_of={info.data['best_of']}")
        steps = _steps_run(info.data)
        if steps is not None and steps < 2:
            raise ValueError(f"needs at least 2 denoising steps to branch between, the image runs {steps}")
        return v

    @field_validator("search_steps")
    @classmethod
    def _search_steps(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is None or "search" not in info.data:
            return v
        if info.data["search"] != "step":
            raise ValueError("only with search \"step\"")
        steps = _steps_run(info.data)
        if steps is not None and v > steps - 1:
            raise ValueError(f"with {steps} denoising steps must be in {SEARCH_STEPS_RANGE[0]}..{steps - 1} (branch "
                             f"points lie between steps), got {v}")
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


def _steps_run(data: dict) -> int | None:
    """The denoising steps a request being validated runs (img2img: the last int(steps x strength)); None when
    one of the fields it depends on was invalid."""
    if "num_inference_steps" not in data or "strength" not in data:
        return None
    steps = data["num_inference_steps"]
    if data.get("init_image") is None:
        return steps
    strength = data["strength"] if data["strength"] is not None else DEFAULT_STRENGTH
    return steps - img2img_start(steps, strength)


@dataclass(frozen=True)
class Branch:
    """One branch point of search "step": after `step` steps every candidate's clean-image estimate was scored at
    `timestep` (`scores`, candidate order) and candidate `chosen` seeded the next segment."""

    step: int
    timestep: float
    scores: tuple[float, ...]
    chosen: int


@dataclass(frozen=True)
class Selection:
    """How best_of chose an image: every candidate's seed and final score (t = 0, candidate order), the one chosen,
    and the branch points of search "step"."""

    best_of: int
    index: int
    scores: tuple[float, ...]
    seeds: tuple[int, ...]
    search: str | None = None
    branches: tuple[Branch, ...] = ()

    @property
    def score(self) -> float:
        """The chosen candidate's score."""
        return self.scores[self.index]

    def as_dict(self) -> dict:
        return {"best_of": self.best_of, "index": self.index, "score": self.score, "scores": list(self.scores),
                "seeds": list(self.seeds), "search": self.search,
                "branches": [{"step": b.step, "timestep": b.timestep, "scores": list(b.scores), "chosen": b.chosen}
                             for b in self.branches]}


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
    timings: dict[str, float] = field(default_factory=dict)  # queue_ms, encode_ms, denoise_ms, decode_ms[, score_ms]
    score: float | None = None  # this candidate's preference score (best_of > 1)
    branches: tuple[Branch, ...] = ()  # search "step": the branch points its group went through
    selection: Selection | None = None  # the answered image of best_of > 1: how it was chosen

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
            + (f", Best of: {self.selection.best_of}" + (f", Search: {self.selection.search}" if self.selection.search else "")
               + f", Preference score: {self.selection.score:.4f}" if self.selection is not None else "")
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
    x0: torch.Tensor | None = None  # (1, C, h, w): the last step's estimate of the clean latent (search "step" scores it)
    branches: list[Branch] | None = None  # search "step": the branch points of its group, one list shared by the group

    @property
    def cfg(self) -> bool:
        return self.request.guidance_scale > 1.0

    @property
    def scales(self) -> dict[str, float]:
        """This row's LoRA scale over the loaded adapters (absent = 0)."""
        return {self.adapter: self.lora_scale} if self.adapter is not None and self.lora_scale != 0 else {}
