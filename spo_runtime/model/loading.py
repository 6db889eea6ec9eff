"""Loading: the parts of a preset (a diffusers directory or a pinned hub snapshot, a single-file checkpoint, the
built-in tiny model, random full-size SDXL) assembled into a resident `SpoPipeline`. Every hub part comes from
`weights.py` (repository, files, revision); a local directory may hold the full files or only the fp16 variant."""

from __future__ import annotations

import json
import logging
import time
from importlib import resources
from pathlib import Path

import torch

from spo_runtime.errors import ModelLoadError
from spo_runtime.lora.format import LoraFile, LoraModuleWeights
from spo_runtime.fsutil import file_sha256
from spo_runtime.model import tiny, weights
from spo_runtime.model.fingerprint import dir_fingerprint, lora_bytes_hash, params_hash
from spo_runtime.model.pipeline import SpoPipeline
from spo_runtime.model.presets import hub_file, resolve
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
    for item in weights.plan(settings, preset.name):
        item.require()  # an unpinned part is refused before minutes of loading the others
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
        base, base_id = weights.locate("base", settings.base_model, settings)
        vae = _vae_source(settings, None)
        parts = _load_dir(base, torch.float32, vae_src=vae, config=_base_config(base, settings))
        _name_sources(parts, base_id, vae, settings)
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


def _vae_source(settings: Settings, preset_vae: str | None) -> tuple[str, str] | None:
    """(local path, id) of the VAE: SPO_VAE, else the preset's (`preset_vae`, a weights.py part); None: the base's own
    (SPO_VAE=base, or a preset without one)."""
    if settings.vae == weights.VAE_FROM_BASE:
        return None
    if settings.vae or preset_vae:
        return weights.locate("vae", settings.vae, settings)
    return None


def _load_sdxl(settings: Settings, dtype: torch.dtype) -> dict:
    # The stock SDXL VAE overflows in fp16: the preset's fp16-fix VAE stays whatever SPO_BASE_MODEL names (the
    # hub id, a local mirror, a fine-tune), unless SPO_VAE says otherwise (SPO_VAE=base: the base's own).
    base, base_id = weights.locate("base", settings.base_model, settings)
    if settings.vae == weights.VAE_FROM_BASE and not weights.is_local(settings.base_model):
        weights.locate("base_vae", settings.base_model, settings)  # the base's own VAE files, into the same snapshot
    vae = _vae_source(settings, weights.PARTS["vae"].repo)
    parts = _load_dir(base, dtype, vae_src=vae, config=_base_config(base, settings))
    _name_sources(parts, base_id, vae, settings)
    if settings.lora:
        parts["lora"], lora_id = settings.lora, settings.lora
    else:
        item = weights.fetch_for("lora", settings)
        parts["lora"] = hub_file(item.repo, item.part.files[0], "SPO_LORA", revision=item.require())
        lora_id = weights.hub_id(item, parts["lora"])
    parts["sources"]["lora"] = {"id": lora_id, "sha256": file_sha256(parts["lora"])}
    return parts


def _base_config(base: str, settings: Settings) -> str | None:
    """The structure of a single-file base: SPO_BASE_MODEL_CONFIG, else SDXL base 1.0's pinned configs."""
    if weights.is_single_file(base) and not settings.base_model_config:
        return weights.locate("base_config", None, settings)[0]
    return settings.base_model_config


def _name_sources(parts: dict, base_id: str, vae: tuple[str, str] | None, settings: Settings) -> None:
    """/info names a hub part by `repo@commit` (the snapshot's path stays out of it), a local one by its path."""
    sources = parts["sources"]
    sources["base"]["id"] = base_id
    if vae:
        sources["vae"]["id"] = vae[1]
    if "base_config" in sources and not settings.base_model_config:
        sources["base_config"]["id"] = weights.hub_id(weights.fetch_for("base_config", settings), sources["base_config"]["id"])


def _variant(src: Path, subfolder: str, dtype: torch.dtype) -> str | None:
    """`fp16` when the local component holds fp16 variant files (`*.fp16.safetensors`, what the pinned download
    and the init container fetch) and either nothing else or the pipeline runs in half precision; else None."""
    files = [f.name for f in (src / subfolder).glob("*.safetensors")]
    fp16 = [f for f in files if f.endswith(".fp16.safetensors")]
    full = [f for f in files if f not in fp16]
    return "fp16" if fp16 and (not full or dtype != torch.float32) else None


def _load_dir(src: str, dtype: torch.dtype, vae_src: tuple[str, str] | None = None, config: str | None = None) -> dict:
    """Components of a local diffusers SDXL pipeline directory (full or fp16-variant files), or of a single-file
    checkpoint; `vae_src`: (path, id) of a separate AutoencoderKL directory."""
    if Path(src).is_file():
        return load_single_file(src, dtype, vae_src[0] if vae_src else None, config)
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(src)
    if not root.is_dir():
        raise ModelLoadError(f"SPO_BASE_MODEL: {src!r} is not a local diffusers pipeline directory or file")
    try:
        def kw(sub: str) -> dict:
            return dict(subfolder=sub, torch_dtype=dtype, variant=_variant(root, sub, dtype))

        unet = UNet2DConditionModel.from_pretrained(src, **kw("unet"))
        te1 = CLIPTextModel.from_pretrained(src, **kw("text_encoder"))
        te2 = CLIPTextModelWithProjection.from_pretrained(src, **kw("text_encoder_2"))
        tok1 = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
        tok2 = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2")
        if vae_src:
            vae_root = Path(vae_src[0])
            vae = AutoencoderKL.from_pretrained(vae_src[0], torch_dtype=dtype, variant=_variant(vae_root.parent, vae_root.name, dtype))
        else:
            vae = AutoencoderKL.from_pretrained(src, **kw("vae"))
        scheduler_config = dict(DDIMScheduler.load_config(src, subfolder="scheduler"))
        index = DiffusionPipeline.load_config(src)  # model_index.json
    except Exception as e:
        raise ModelLoadError(f"SPO_BASE_MODEL: could not load an SDXL pipeline from {src!r} ({type(e).__name__}: {e})") from e
    if dtype == torch.float16 and vae.config.get("force_upcast", False):
        vae = vae.to(torch.float32)  # stock SDXL VAE: NaN in fp16
    sources = {"base": {"id": src, "sha256": dir_fingerprint(src)}}
    if vae_src:
        sources["vae"] = {"id": vae_src[1], "sha256": dir_fingerprint(vae_src[0])}
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
