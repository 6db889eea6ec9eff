"""spo_runtime: SDXL + SPO LoRA resident on one device, a vectorised sampler, step-level batching.

    from spo_runtime import load_pipeline, Settings, GenerationRequest
    pipe = load_pipeline(Settings(model="tiny"))
    [img] = pipe.generate([GenerationRequest(prompt="a fox", seed=42)])
"""

from typing import TYPE_CHECKING

from spo_runtime.version import __version__

# The public names, imported on first use (PEP 562): `import spo_runtime.errors` (every service module does, and
# BentoML's arbiter imports the service only to read its configuration) then costs milliseconds instead of the
# seconds of importing diffusers and torch that `spo_runtime.model` needs.
_LAZY = {
    **dict.fromkeys(["AdapterInUseError", "AdapterMemoryError", "AdapterNotFoundError", "CheckpointFormatError",
                     "ConfigError", "InvalidRequestError", "LoraFormatError", "ModelLoadError", "NonFiniteError",
                     "SpoError"], "spo_runtime.errors"),
    **dict.fromkeys(["SpoPipeline", "load_pipeline", "save_tiny"], "spo_runtime.model"),
    **dict.fromkeys(["GeneratedImage", "GenerationRequest"], "spo_runtime.requests"),
    "Settings": "spo_runtime.settings",
}

if TYPE_CHECKING:
    from spo_runtime.errors import (AdapterInUseError, AdapterMemoryError, AdapterNotFoundError, CheckpointFormatError,
                                    ConfigError, InvalidRequestError, LoraFormatError, ModelLoadError, NonFiniteError,
                                    SpoError)
    from spo_runtime.model import SpoPipeline, load_pipeline, save_tiny
    from spo_runtime.requests import GeneratedImage, GenerationRequest
    from spo_runtime.settings import Settings


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'spo_runtime' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = [
    "AdapterInUseError", "AdapterMemoryError", "AdapterNotFoundError", "CheckpointFormatError", "ConfigError",
    "GeneratedImage", "GenerationRequest", "InvalidRequestError", "LoraFormatError", "ModelLoadError",
    "NonFiniteError", "Settings", "SpoError", "SpoPipeline", "__version__", "load_pipeline", "save_tiny",
]
