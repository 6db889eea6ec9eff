"""A single-file SDXL checkpoint (original key names, .safetensors only: pickles are refused) loaded through
diffusers' `from_single_file`, its structure from a local diffusers directory or SDXL base 1.0's."""

from __future__ import annotations

from pathlib import Path

import torch

from spo_runtime.errors import ModelLoadError
from spo_runtime.fsutil import file_sha256
from spo_runtime.model.fingerprint import dir_fingerprint
from spo_runtime.model.presets import SPO_BASE

PICKLE_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")

def load_single_file(src: str, dtype: torch.dtype, vae_src: str | None, config: str | None) -> dict:
    """Components of a single-file SDXL checkpoint (original key names), through diffusers' `from_single_file`;
    the structure (configs, tokenizers, scheduler) from `config`: a local diffusers pipeline directory without
    weights (SPO_BASE_MODEL_CONFIG), else SDXL base 1.0's from the hub."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors import safe_open
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(src)
    if path.suffix.lower() in PICKLE_CHECKPOINT_SUFFIXES:
        raise ModelLoadError(f"SPO_BASE_MODEL: {src} is a pickle checkpoint ({path.suffix}); pickles can run code when "
                             "loaded and are refused: convert it to .safetensors")
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"SPO_BASE_MODEL: {src}: a single-file checkpoint must be a .safetensors file")
    cfg = config or SPO_BASE
    local = Path(cfg).is_dir()
    try:
        # Each text encoder from its own embedder's keys only: diffusers tells the two CLIPs apart by width,
        # which fails when both have the same width (the tiny model).
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            embedders = {i: {k: f.get_tensor(k) for k in keys if k.startswith(f"conditioner.embedders.{i}.")} for i in (0, 1)}
        kw = dict(config=cfg, torch_dtype=dtype, local_files_only=local)
        te1 = create_diffusers_clip_model_from_ldm(CLIPTextModel, embedders[0], subfolder="text_encoder", **kw)
        te2 = create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, embedders[1], subfolder="text_encoder_2", **kw)
        del embedders
        extra = {"vae": AutoencoderKL.from_pretrained(vae_src, torch_dtype=dtype)} if vae_src else {}
        pipe = StableDiffusionXLPipeline.from_single_file(str(path), text_encoder=te1, text_encoder_2=te2, **extra, **kw)
    except ModelLoadError:
        raise
    except Exception as e:
        hint = "" if config else ("; offline, set SPO_BASE_MODEL_CONFIG to a local diffusers SDXL pipeline directory "
                                  "without weights (model_index.json, the components' configs, tokenizers, scheduler)")
        raise ModelLoadError(f"SPO_BASE_MODEL: could not load the single-file SDXL checkpoint {src!r} with the structure "
                             f"of {cfg!r} ({type(e).__name__}: {e}){hint}") from e
    vae = pipe.vae
    if dtype == torch.float16 and vae.config.get("force_upcast", False):
        vae = vae.to(torch.float32)
    sources = {"base": {"id": src, "sha256": file_sha256(path)},
               "base_config": {"id": cfg, "sha256": dir_fingerprint(cfg) if local else None}}
    if vae_src:
        sources["vae"] = {"id": vae_src, "sha256": dir_fingerprint(vae_src) if Path(vae_src).is_dir() else None}
    return dict(
        unet=pipe.unet, vae=vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, scheduler_config=dict(pipe.scheduler.config),
        sources=sources, force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
    )
