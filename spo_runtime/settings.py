"""Typed settings, read from SPO_* environment variables (the configuration table of the README)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InvalidRequestError

PRESETS = ("auto", "sdxl-spo", "sdxl-random", "tiny")


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Literal["auto", "sdxl-spo", "sdxl-random", "tiny"] = "auto"  # SPO_MODEL
    base_model: str | None = None  # SPO_BASE_MODEL: hub id or diffusers pipeline directory
    vae: str | None = None  # SPO_VAE: hub id or AutoencoderKL directory
    lora: str | None = None  # SPO_LORA: LoRA file (diffusers or webui layout, .safetensors)
    device: str | None = None  # SPO_DEVICE: cuda, cuda:1, cpu; default cuda when available
    dtype: Literal["float16", "bfloat16", "float32"] | None = None  # SPO_DTYPE; default by device and preset
    attention: Literal["sdpa", "xformers"] = "sdpa"  # SPO_ATTENTION
    lora_scale: float = Field(1.0, ge=-2.0, le=2.0)  # SPO_LORA_SCALE: default scale of new requests
    lora_fuse: bool = True  # SPO_LORA_FUSE: fuse the default adapter at the default scale at load
    adapter_memory_mb: float | None = Field(None, gt=0)  # SPO_ADAPTER_MEMORY_MB: cap on loaded adapters
    embed_cache_size: int = Field(512, ge=0)  # SPO_EMBED_CACHE: prompt embeddings kept (LRU)
    torch_threads: int | None = Field(None, ge=1)  # SPO_TORCH_THREADS
    compile: bool = False  # SPO_COMPILE: torch.compile the UNet (minutes of warm-up; see RESULTS.md)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        """Settings from SPO_* variables; `overrides` win. Errors name the variable."""
        env = os.environ if environ is None else environ
        values: dict = {}
        for name in cls.model_fields:
            raw = env.get(f"SPO_{name.upper()}")
            if raw is not None and raw != "":
                values[name] = _parse_bool(raw) if name in ("lora_fuse", "compile") else raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as e:
            err = e.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else "settings"
            raise InvalidRequestError(f"SPO_{field.upper()}", err["msg"]) from None


def _parse_bool(raw: str) -> bool | str:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    return raw
