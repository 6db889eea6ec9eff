"""Loading: the parts of a preset (a diffusers directory or hub id, a single-file checkpoint, the built-in
tiny model, random full-size SDXL) assembled into a resident `SpoPipeline`."""

from __future__ import annotations

import json
import logging
import time
from importlib import resources
from pathlib import Path

import torch

from spo_runtime.errors import ModelLoadError
from spo_runtime.lora.format import LoraFile, LoraModuleWeights
from spo_runtime.model import tiny
from spo_runtime.model.fingerprint import dir_fingerprint, lora_bytes_hash, params_hash
from spo_runtime.model.pipeline import SpoPipeline
from spo_runtime.model.presets import SPO_BASE, SPO_LORA_FILE, SPO_LORA_REPO, SPO_VAE, hub_file, resolve
from spo_runtime.model.single_file import load_single_file
from spo_runtime.sampling.sampler import SDXL_SCHEDULER_CONFIG
from spo_runtime.settings import Settings
from spo_runtime.speed import fp8

log = logging.getLogger("spo_runtime")


def load_pipeline(settings: Settings | None = None) -> SpoPipeline:
    """Load the preset named by `settings` (default: from SPO_* variables) and keep it resident."""
    settings = settings or Settings.from_env()
    preset, device, dtype = resolve(settings)
    if settings.quant == "fp8":
        fp8.check_supported(device, dtype)  # before minutes of loading: a clear ConfigError naming SPO_QUANT
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    t0 = time.perf_counter()
    if preset.name == "tiny":
        parts = _load_tiny(settings)
    elif preset.name == "sdxl-random":
        parts = _build_random_sdxl(device, dtype)
    else:
        parts = _load_sdxl(settings, dtype)
    pipe = SpoPipeline(parts, settings, preset, device, dtype)
    log.warning(
        "loaded %s on %s (%s) in %.1fs; adapters: %s",
        preset.name, device, str(dtype).removeprefix("torch."), time.perf_counter() - t0, ", ".join(pipe.registry.adapters) or "none",
    )
    return pipe


def _load_tiny(settings: Settings) -> dict:
    if settings.base_model:
        parts = _load_dir(settings.base_model, torch.float32, vae_src=settings.vae, config=settings.base_model_config)
    else:
        parts = tiny.build_components()
        parts["scheduler_config"] = dict(SDXL_SCHEDULER_CONFIG)
        parts["force_zeros_for_empty_prompt"] = True
        parts["sources"] = {"base": {"id": "built-in tiny (seed 0)", "sha256": params_hash(parts["unet"])}}
    if settings.lora:
        parts["lora"] = settings.lora
    elif settings.base_model and (Path(settings.base_model) / tiny.TINY_LORA_DIFFUSERS).exists():
        parts["lora"] = str(Path(settings.base_model) / tiny.TINY_LORA_DIFFUSERS)
    elif not settings.base_model:
        parts["lora"] = tiny.tiny_lora_file(parts["unet"])
    return parts


def _load_sdxl(settings: Settings, dtype: torch.dtype) -> dict:
    base = settings.base_model or SPO_BASE
    # The stock SDXL VAE overflows in fp16: the preset swaps in the fp16-fix VAE unless a local
    # pipeline is given without SPO_VAE (then its own VAE runs, upcast when its config asks).
    vae = settings.vae or (None if settings.base_model else SPO_VAE)
    parts = _load_dir(base, dtype, vae_src=vae, config=settings.base_model_config)
    parts["lora"] = settings.lora or hub_file(SPO_LORA_REPO, SPO_LORA_FILE, "SPO_LORA")
    return parts


def _load_dir(src: str, dtype: torch.dtype, vae_src: str | None = None, config: str | None = None) -> dict:
    """Components of a diffusers SDXL pipeline directory or hub id, or of a single-file checkpoint."""
    if Path(src).is_file():
        return load_single_file(src, dtype, vae_src, config)
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    local = Path(src).is_dir()
    variant = "fp16" if (not local and dtype != torch.float32) else None
    try:
        kw = dict(torch_dtype=dtype, variant=variant)
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", **kw)
        te1 = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kw)
        te2 = CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", **kw)
        tok1 = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
        tok2 = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2")
        if vae_src:
            vae = AutoencoderKL.from_pretrained(vae_src, torch_dtype=dtype)
        else:
            vae = AutoencoderKL.from_pretrained(src, subfolder="vae", **kw)
        scheduler_config = dict(DDIMScheduler.load_config(src, subfolder="scheduler"))
        index = DiffusionPipeline.load_config(src)  # model_index.json
    except Exception as e:
        raise ModelLoadError(f"SPO_BASE_MODEL: could not load an SDXL pipeline from {src!r} ({type(e).__name__}: {e})") from e
    if dtype == torch.float16 and vae.config.get("force_upcast", False):
        vae = vae.to(torch.float32)  # stock SDXL VAE: NaN in fp16
    sources = {"base": {"id": src, "sha256": dir_fingerprint(src) if local else None}}
    if vae_src:
        sources["vae"] = {"id": vae_src, "sha256": dir_fingerprint(vae_src) if Path(vae_src).is_dir() else None}
    return dict(
        unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
        scheduler_config=scheduler_config, sources=sources,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
    )


def _config(name: str) -> dict:
    return json.loads(resources.files("spo_runtime").joinpath("configs", name).read_text())


def _build_random_sdxl(device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Full-size SDXL with random weights, initialised on the target device (for timing only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(_config("unet.json")).to(dtype)
        vae = AutoencoderKL.from_config(_config("vae.json")).to(dtype)
        te1 = CLIPTextModel(CLIPTextConfig(**_config("text_encoder.json"))).to(dtype)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_config("text_encoder_2.json"))).to(dtype)
    for m in (unet, vae, te1, te2):
        m.eval().requires_grad_(False)
    tok1, tok2 = tiny.build_tokenizers()  # ids stay below the 49408-token vocabulary
    lora = tiny.build_lora_state(unet, seed=seed + 1, rank=64)
    modules = {m: LoraModuleWeights(m, d, u, a) for m, (d, u, a) in lora.items()}
    return dict(
        unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
        scheduler_config=dict(SDXL_SCHEDULER_CONFIG), force_zeros_for_empty_prompt=True,
        sources={"base": {"id": f"random SDXL (seed {seed})", "sha256": None}},
        lora=LoraFile("diffusers", modules, sha256=lora_bytes_hash(modules)),
    )
