"""The model: presets and how Settings pick one (`presets`), loading a preset's parts from a diffusers directory,
the hub, a single-file checkpoint or code (`loading`, `single_file`, `tiny`), what identifies each part
(`fingerprint`), and the resident `SpoPipeline` that the engine and the trainer drive (`pipeline`), composed of
prompts to embeddings (`text`), one batched denoising step over rows of mixed parameters (`denoiser`), latents
to and from images (`vae`) and the speed settings applied to them (`speed_paths`)."""

from spo_runtime.model.loading import load_pipeline
from spo_runtime.model.pipeline import SpoPipeline
from spo_runtime.model.presets import PRESETS, Preset, resolve
from spo_runtime.model.tiny import save_tiny

__all__ = ["PRESETS", "Preset", "SpoPipeline", "load_pipeline", "resolve", "save_tiny"]
