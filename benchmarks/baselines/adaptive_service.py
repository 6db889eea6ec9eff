"""Baseline (d): BentoML's documented adaptive batching, two-service pattern.

    SPO_BENCH_MODEL_DIR=/path/to/save-tiny-dir bentoml serve benchmarks.baselines.adaptive_service:AdaptiveFront

An async front service (`/generate`) depends (`bentoml.depends`) on a worker service whose API is
`batchable=True`: BentoML's dispatcher groups concurrent single-item calls into one list (up to
`max_batch_size`, waiting at most what its latency model allows under `max_latency_ms`). Diffusers
can run requests together only when they share the step count, guidance and size, so the worker
splits each batch into such groups and runs every group as one pipeline call with a list of prompts
and a list of generators.

Knobs (environment): SPO_BENCH_MAX_BATCH (default 8, like spo-serve's SPO_MAX_BATCH) and
SPO_BENCH_MAX_LATENCY_MS (default 60000, BentoML's default).
"""

from __future__ import annotations

import base64
import io
import os

import bentoml
from PIL import Image
from pydantic import BaseModel

MODEL_DIR_ENV = "SPO_BENCH_MODEL_DIR"
LORA_FILE = "spo_tiny_lora_diffusers.safetensors"
MAX_BATCH = int(os.environ.get("SPO_BENCH_MAX_BATCH", "8"))
MAX_LATENCY_MS = int(os.environ.get("SPO_BENCH_MAX_LATENCY_MS", "60000"))


class GenRequest(BaseModel):
    prompt: str
    num_inference_steps: int = 20
    seed: int = 0
    guidance_scale: float = 5.0
    width: int = 64
    height: int = 64


@bentoml.service(name="adaptive-worker", traffic={"timeout": 900})
class AdaptiveWorker:
    def __init__(self) -> None:
        import torch
        from diffusers import StableDiffusionXLPipeline

        model_dir = os.environ[MODEL_DIR_ENV]
        self.pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False)
        self.pipe.load_lora_weights(model_dir, weight_name=LORA_FILE)
        self.pipe.set_progress_bar_config(disable=True)
        self.torch = torch

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS)
    def generate(self, requests: list[GenRequest]) -> list[str]:
        """A batch of requests -> base64 PNGs, in order."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.num_inference_steps, r.guidance_scale, r.width, r.height), []).append(i)
        for (steps, guidance, width, height), idx in groups.items():
            images = self.pipe(
                prompt=[requests[i].prompt for i in idx], num_inference_steps=steps, guidance_scale=guidance,
                width=width, height=height,
                generator=[self.torch.Generator("cpu").manual_seed(requests[i].seed) for i in idx],
            ).images
            for i, img in zip(idx, images):
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                out[i] = base64.b64encode(buf.getvalue()).decode()
        return out


@bentoml.service(name="adaptive-front", traffic={"timeout": 900})
class AdaptiveFront:
    worker = bentoml.depends(AdaptiveWorker)

    @bentoml.api(route="/generate")
    async def generate(
        self,
        prompt: str,
        num_inference_steps: int = 20,
        seed: int = 0,
        guidance_scale: float = 5.0,
        width: int = 64,
        height: int = 64,
    ) -> Image.Image:
        req = GenRequest(prompt=prompt, num_inference_steps=num_inference_steps, seed=seed,
                         guidance_scale=guidance_scale, width=width, height=height)
        [png] = await self.worker.to_async.generate([req])
        return Image.open(io.BytesIO(base64.b64decode(png)))
