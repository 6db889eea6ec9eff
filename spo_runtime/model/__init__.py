"""The model: presets and how Settings pick one (`presets`), loading a preset's parts from a diffusers directory,
the hub, a single-file checkpoint or code (`loading`, `single_file`, `tiny`), what identifies each part
(`fingerprint`), and the resident `SpoPipeline` that the engine and the trainer drive (`pipeline`), composed of
prompts to embeddings (`text`), one batched denoising step over rows of mixed parameters (`denoiser`), latents
to and from images (`vae`) and the speed settings applied to them (`speed_paths`)."""

from typing import TYPE_CHECKING

# imported on first use (PEP 562), as in spo_runtime/__init__: `spo_runtime.model.presets` (what the service needs
# to read its configuration) does not pull in diffusers
_LAZY = {"load_pipeline": "loading", "SpoPipeline": "pipeline", "PRESETS": "presets", "Preset": "presets",
         "resolve": "presets", "save_tiny": "tiny"}

if TYPE_CHECKING:
    from spo_runtime.model.loading import load_pipeline
    from spo_runtime.model.pipeline import SpoPipeline
    from spo_runtime.model.presets import PRESETS, Preset, resolve
    from spo_runtime.model.tiny import save_tiny

__all__ = ["PRESETS", "Preset", "SpoPipeline", "load_pipeline", "resolve", "save_tiny"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'spo_runtime.model' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"spo_runtime.model.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
