"""The three presets (`sdxl-spo`: real weights from the hub; `sdxl-random`: full-size SDXL with random
weights, for GPU timing; `tiny`: built in code, for CPU development and tests), the hub ids the real one
loads (pinned with their files and revisions in `weights.py`), and how Settings pick (preset, device, dtype)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from spo_runtime.errors import ConfigError, ModelLoadError
from spo_runtime.model.weights import PARTS
from spo_runtime.settings import Settings

log = logging.getLogger("spo_runtime")

SPO_BASE = PARTS["base"].repo
SPO_VAE = PARTS["vae"].repo
SPO_LORA_REPO = PARTS["lora"].repo
SPO_LORA_FILE = PARTS["lora"].files[0]
DEFAULT_ADAPTER = "spo"  # the name the preset's LoRA is loaded under


@dataclass(frozen=True)
class Preset:
    name: str
    default_size: int
    size_range: tuple[int, int]


PRESETS = {
    "sdxl-spo": Preset("sdxl-spo", 1024, (256, 2048)),
    "sdxl-random": Preset("sdxl-random", 1024, (256, 2048)),
    "tiny": Preset("tiny", 64, (32, 256)),
}
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve(settings: Settings) -> tuple[Preset, torch.device, torch.dtype]:
    """(preset, device, dtype) from settings: `auto` is sdxl-spo with CUDA, tiny without."""
    cuda = torch.cuda.is_available()
    device = torch.device(settings.device or ("cuda" if cuda else "cpu"))
    if device.type == "cuda" and not cuda:
        raise ModelLoadError("SPO_DEVICE: CUDA was asked for but torch sees no CUDA device")
    name = settings.model
    if name == "auto":
        name = "sdxl-spo" if cuda else "tiny"
        log.warning("SPO_MODEL=auto -> %s (%s)", name, "CUDA available" if cuda else "no CUDA device: the CPU demo model")
    if settings.dtype:
        dtype = _DTYPES[settings.dtype]
    elif device.type == "cpu":
        dtype = torch.float32
    elif settings.quant == "fp8":
        dtype = torch.bfloat16  # per-row float8 scaling starts from bf16 weights
    else:
        # fp16 with the fp16-fix VAE for real weights; bf16 for random weights (fp32's range).
        dtype = torch.bfloat16 if name == "sdxl-random" else torch.float16
    return PRESETS[name], device, dtype


def hub_file(repo: str, filename: str, var: str, revision: str | None = None) -> str:
    """A file of a hub repository at `revision` (default: its pin in weights.py), from the local cache when it
    is there or when offline; the error names the variable `var` that points at a local file instead. A file
    that is neither pinned nor given a revision is refused (ConfigError naming its SPO_*_REVISION)."""
    part = next((p for p in PARTS.values() if p.repo == repo and p.files == (filename,)), None)
    revision = revision or (part.revision if part else None)
    if revision is None:
        what = (f"{repo}/{filename} is not pinned in this release: set {part.revision_variable} to a commit of {repo}"
                if part else f"{repo}/{filename} has no pinned revision")
        raise ConfigError(part.revision_variable if part else var,
                          f"{what}, or set {var} to a local {_suffixes(var)} file")
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo, filename, revision=revision)
    except Exception as e:  # offline, gated, missing
        raise ModelLoadError(
            f"{var}: could not fetch {repo}/{filename} at {revision} from the Hugging Face hub ({type(e).__name__}: {e}); "
            f"set {var} to a local {_suffixes(var)} file"
        ) from e


def _suffixes(var: str) -> str:
    return ".safetensors or .bin" if var == "SPO_SPM" else ".safetensors"
