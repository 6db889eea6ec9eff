"""spo_runtime: SDXL + SPO LoRA resident on one device, a vectorised sampler, step-level batching.

    from spo_runtime import load_pipeline, Settings, GenerationRequest
    pipe = load_pipeline(Settings(model="tiny"))
    [img] = pipe.generate([GenerationRequest(prompt="a fox", seed=42)])
"""

from spo_runtime.errors import (
    AdapterInUseError,
    AdapterMemoryError,
    AdapterNotFoundError,
    CheckpointFormatError,
    ConfigError,
    InvalidRequestError,
    LoraFormatError,
    ModelLoadError,
    NonFiniteError,
    SpoError,
)
from spo_runtime.model import SpoPipeline, load_pipeline, save_tiny
from spo_runtime.version import __version__
from spo_runtime.requests import GeneratedImage, GenerationRequest
from spo_runtime.settings import Settings


__all__ = [
    "AdapterInUseError", "AdapterMemoryError", "AdapterNotFoundError", "CheckpointFormatError", "ConfigError",
    "GeneratedImage", "GenerationRequest", "InvalidRequestError", "LoraFormatError", "ModelLoadError",
    "NonFiniteError", "Settings", "SpoError", "SpoPipeline", "__version__", "load_pipeline", "save_tiny",
]
