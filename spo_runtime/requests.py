"""What a caller asks for (`GenerationRequest`), what it gets (`GeneratedImage`), and a request
while it runs (`ActiveRequest`: its conditioning, latent and `SamplerRow`)."""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import io
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator

from .errors import InvalidRequestError
from .sampler import SCHEDULERS, SamplerRow

MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 4000
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ADAPTER_NAME_RULE = "1..64 characters of letters, digits, '_', '.', '-', starting with a letter or digit"
MAX_IMAGE_PIXELS = 4096 * 4096  # an init_image larger than this is refused before it is decoded
DEFAULT_STRENGTH = 0.75  # img2img, as A1111's default denoising strength
SIZE_RANGE = (32, 2048)  # the widest any preset allows; `for_sizes` narrows it to a preset's range
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
    num_inference_steps: int = Field(20, ge=1, le=100, description="Denoising steps, 1..100.")
    guidance_scale: float = Field(5.0, ge=0.0, le=30.0, allow_inf_nan=False,
                                  description="Classifier-free guidance, 0..30; <= 1 disables guidance (one UNet pass per step).")
    scheduler: Scheduler = Field("ddim", description="Sampler: " + ", ".join(SCHEDULERS) + ".")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description=f"0..{MAX_SEED}; null: drawn and reported in X-Seed.")
    lora_scale: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False,
                                     description="LoRA scale, -2..2; null: the server's current default.")
    adapter: str | None = Field(None, pattern=ADAPTER_NAME.pattern, max_length=64,
                                description=f"Name of a loaded adapter ({ADAPTER_NAME_RULE}); null: the server's default "
                                            "adapter. A name that is not loaded is a 400 naming `adapter`.")
    eta: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False,
                       description="DDIM stochasticity, 0..1 (0: deterministic). Must be 0 unless scheduler is 'ddim' "
                                   "(a 400 naming `eta`).")

    init_image: Any = Field(
        None, json_schema_extra={"type": "string", "format": "byte"},
        description="img2img: the starting image, base64 PNG, JPEG or WebP (a data: URL prefix is allowed; a PIL "
                    f"image in the library), at most {MAX_IMAGE_PIXELS:,} pixels (the body limit is SPO_MAX_IMAGE_BYTES). The output has its size rounded "
                    "down to a multiple of 8 unless width/height are given (then the image is resized to them); "
                    "a size outside the preset's range is a 400 naming `init_image`.")
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

    @field_validator("init_image", mode="plain")
    @classmethod
    def _init_image(cls, v: Any) -> Image.Image | None:
        return v if v is None else decode_image(v)

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
        return create_model(cls.__name__, __base__=cls, __module__=cls.__module__, __doc__=cls.__doc__, **size)

    @classmethod
    def parse(cls, data: Any, size_range: tuple[int, int] | None = None) -> GenerationRequest:
        """Validate `data` (a dict or a request); raise InvalidRequestError naming every bad field."""
        if isinstance(data, GenerationRequest):
            data = data.model_dump(exclude_unset=True)
        model = cls.for_sizes(*size_range) if size_range else cls
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e, model) from None


def decode_image(v: Any) -> Image.Image:
    """A PIL image, or base64 (optionally a data: URL) of a PNG/JPEG/WebP -> an RGB PIL image. Refuses what
    does not decode, other formats, and more than MAX_IMAGE_PIXELS pixels (checked before decoding)."""
    if isinstance(v, Image.Image):
        img = v
    elif isinstance(v, str):
        text = v.split(",", 1)[1] if v.startswith("data:") and "," in v else v
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("must be base64 of a PNG, JPEG or WebP image (not valid base64)") from None
        try:
            img = Image.open(io.BytesIO(raw), formats=("PNG", "JPEG", "WEBP"))
        except Exception:
            raise ValueError("must be base64 of a PNG, JPEG or WebP image (not decodable as one)") from None
    else:
        raise ValueError(f"must be a base64 string (PNG, JPEG or WebP), got {type(v).__name__}")
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"must have at most {MAX_IMAGE_PIXELS:,} pixels, got {w}x{h}")
    try:
        return img.convert("RGB") if img.mode != "RGB" else img.copy()
    except Exception:
        raise ValueError("must be base64 of a PNG, JPEG or WebP image (the image data is damaged)") from None


_TYPES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "dict": "a JSON object",
          "list": "a list", "literal": "one of the listed values"}
_PATTERN_RULES = {"prompt": "must be a non-empty string (not only whitespace) without control characters (tab and "
                            "newline are allowed)",
                  "negative_prompt": "must not hold control characters (tab and newline are allowed)", "adapter": f"must be {ADAPTER_NAME_RULE}",
                  "device": "must be cpu, cuda, cuda:N or mps", "train_device": "must be cpu, cuda, cuda:N or mps"}


def allowed(model: type[BaseModel], name: str) -> str:
    """The allowed values of a field, in words, from its declared constraints (what /docs.json says)."""
    f = model.model_fields.get(name)
    if f is None:
        return ""
    c: dict[str, Any] = {}
    for m in f.metadata:
        for key in ("ge", "le", "gt", "lt", "multiple_of", "min_length", "max_length"):
            if getattr(m, key, None) is not None:
                c[key] = getattr(m, key)
    args = getattr(f.annotation, "__args__", ())
    literal = [a for a in args if getattr(a, "__origin__", None) is Literal] or (
        [f.annotation] if getattr(f.annotation, "__origin__", None) is Literal else [])
    if literal:
        return "one of " + ", ".join(map(str, literal[0].__args__))
    if "ge" in c or "gt" in c:
        lo = c.get("ge", c.get("gt"))
        hi = c.get("le", c.get("lt"))
        if hi is None:
            return f"> {lo}" if "gt" in c else f">= {lo}"
        rng = f"({lo}, {hi}]" if "gt" in c else f"{lo}..{hi}"
        return f"a multiple of {c['multiple_of']} in {rng}" if "multiple_of" in c else f"in {rng}"
    if "max_length" in c:
        return f"{c.get('min_length', 0)}..{c['max_length']} characters"
    if "min_length" in c:
        return f"at least {c['min_length']} characters"
    return ""


def validation_error(e: ValidationError, model: type[BaseModel] | None = None) -> InvalidRequestError:
    """Pydantic's errors -> one InvalidRequestError naming the first field, every problem in `.errors`.
    Each message says what is allowed (the field's declared range or values) and what was given."""
    problems = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        name = str(err["loc"][0]) if err["loc"] else ""
        kind, got = err["type"], err.get("input")
        rule = allowed(model, name) if model is not None else ""
        if isinstance(got, (int, float, str, bool)) and len(repr(got)) < 80:
            shown = f"got {got!r}"
        else:
            shown = f"got {len(got)} characters" if isinstance(got, str) else f"got {type(got).__name__}"
        if kind == "extra_forbidden":
            msg = "unknown field"
        elif kind == "missing":
            msg = "field required"
        elif not err["loc"] and model is not None and re.match(r"^\w+: ", msg := err["msg"].removeprefix("Value error, ")) \
                and msg.split(":")[0] in model.model_fields:
            loc, msg = msg.split(": ", 1)  # a model-level check names its field as "field: ..."
        elif kind == "model_type" or (kind == "dict_type" and not err["loc"]):
            loc, msg = "body", "must be a JSON object"
        elif kind == "json_invalid":
            loc, msg = "body", f"must be JSON ({err.get('ctx', {}).get('error', err['msg'])})"
        elif kind == "string_pattern_mismatch" and name in _PATTERN_RULES:
            msg = _PATTERN_RULES[name]
        elif kind.endswith("_type") or kind.endswith("_parsing") or kind == "finite_number":
            what = _TYPES.get(kind.split("_")[0], kind.removesuffix("_type"))
            if kind == "finite_number":
                what = "a finite number"
            msg = f"must be {what}" + (f" {rule}" if rule and not rule.startswith("one of") else "") + f", {shown}"
        elif kind == "literal_error" or kind == "enum":
            msg = f"must be {rule or err['msg']}, {shown}"
        elif rule and kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than", "multiple_of",
                               "string_too_long", "string_too_short"):
            msg = f"must be {rule}, {shown}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
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
