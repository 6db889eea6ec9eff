"""`StepModel`: the engine's only view of the model. `SpoPipeline` implements it in the server, the fake
pipeline of tests/test_scheduler.py in the scheduler's tests; the engine never imports `spo_runtime.model`.

Listed here is everything the engine reads or calls: requests are parsed once on submission, prepared in one
call per step for the rows joining it, stepped once per step (`denoise`) and decoded together when done; the
admin calls and the LoRA registry are used only at step boundaries, in the engine thread.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import torch

from spo_runtime.requests import ActiveRequest, GeneratedImage, GenerationRequest


class Preset(Protocol):
    default_size: int  # pixels: the height and width of a request that gives neither


class LoadedAdapter(Protocol):
    name: str
    nbytes: int  # device memory its weights take (the spo_adapter_bytes gauge)


class AdapterRegistry(Protocol):
    """The LoRA registry as the engine uses it: admin calls at step boundaries, and the gauges."""

    adapters: Mapping[str, LoadedAdapter]

    def read(self, path: Any) -> Any: ...  # read and validate a LoRA file (outside the loop)
    def load(self, name: str, lora: Any, source: str | None = None, replace: bool = False) -> Any: ...
    def get(self, name: str) -> LoadedAdapter: ...  # raises AdapterNotFoundError
    def in_use(self, name: str, running: list[dict[str, float]]) -> None: ...  # raises AdapterInUseError


class Scorer(Protocol):
    """A preference scorer as the engine calls it (`spo_runtime.preference.scorers.PreferenceScorer`, which the
    service builds and hands over: the engine never imports it): [-1, 1] images (B, 3, H, W), B prompts and
    timesteps (B,) -> float32 scores (B,); optional `image_size`, the side it looks at (None: any)."""

    def __call__(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor: ...


class StepModel(Protocol):
    """What the engine drives: `SpoPipeline` in the server, a fake in the scheduler's tests."""

    preset: Preset
    registry: AdapterRegistry
    default_lora_scale: float
    device: torch.device  # for the device-memory gauges

    def parse(self, request: GenerationRequest | dict) -> GenerationRequest: ...
    def prepare(self, requests: list[GenerationRequest | dict]) -> list[ActiveRequest]: ...
    def denoise(self, states: list[ActiveRequest]) -> Any: ...  # one step of every row, in place
    def decode(self, states: list[ActiveRequest]) -> list[GeneratedImage | BaseException]: ...
    # best_of: latents (UNet scale) -> float32 images in [-1, 1] on the device, decoded smaller down to `min_side`
    def images(self, latents: torch.Tensor, min_side: int | None = None) -> torch.Tensor: ...
    def set_default_lora_scale(self, scale: float) -> dict: ...
    def set_default_adapter(self, name: str | None) -> None: ...
    def unload_adapter(self, name: str) -> None: ...
