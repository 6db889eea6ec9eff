"""Baseline (c): the official BentoML SDXL example pattern, one pipeline call per request.

    SPO_BENCH_MODEL_DIR=/path/to/save-tiny-dir bentoml serve benchmarks.baselines.diffusers_service:DiffusersService

Loads diffusers' `StableDiffusionXLPipeline` from a `python -m spo_runtime save-tiny` directory with
the SPO LoRA (`load_lora_weights`, unfused, as the examples do) and answers a sync `/generate` with a
PNG. BentoML runs sync APIs in a worker thread, one at a time (`threads=1`, the default).
"""

from __future__ import annotations

import os

import bentoml
from PIL import Image

MODEL_DIR_ENV = "SPO_BENCH_MODEL_DIR"
LORA_FILE = "spo_tiny_lora_diffusers.safetensors"


@bentoml.service(name="diffusers-baseline", traffic={"timeout": 900})
class DiffusersService:
    def __init__(self) -> None:
        import torch
        from diffusers import StableDiffusionXLPipeline

        model_dir = os.environ[MODEL_DIR_ENV]
        self.pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False)
        self.pipe.load_lora_weights(model_dir, weight_name=LORA_FILE)
        self.pipe.set_progress_bar_config(disable=True)
        self.torch = torch

    @bentoml.api(route="/generate")
    def generate(
        self,
        prompt: str,
        num_inference_steps: int = 20,
        seed: int = 0,
        guidance_scale: float = 5.0,
        width: int = 64,
        height: int = 64,
    ) -> Image.Image:
        generator = self.torch.Generator("cpu").manual_seed(seed)
        return self.pipe(
            prompt=prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            width=width, height=height, generator=generator,
        ).images[0]
