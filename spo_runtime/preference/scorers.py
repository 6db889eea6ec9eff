"""Preference scorers: what ranks images for a prompt, in training (the SPO roll-out's pairs) and in serving
(`best_of`, `search: "step"`) and evaluation.

A `PreferenceScorer` is called as ``scorer(images, prompts, timesteps) -> scores``:

- ``images``: (B, 3, H, W) in [-1, 1], any float dtype, any device (moved to the scorer's). Latents are scored
  through the pipeline's decoder first: ``scorer(pipe.images(latents), prompts, t)`` (`SpoPipeline.images`);
- ``prompts``: B strings, or one for every image;
- ``timesteps``: (B,) diffusion timesteps in training units (0: a clean image), or one for every image;
- returns: (B,) float32 scores, computed in float32 whatever the images' dtype; higher is preferred.

Two optional attributes, read with ``getattr``: ``image_size``, the side the scorer resizes images to (a caller
may decode smaller images for it; None: any size), and ``name``, what /info reports.

`SpmScorer` is the step-aware preference model (`spm`) with its tokenizer; `BrightnessScorer` a deterministic
toy (sign x mean pixel) for tests and demos. `build_scorer(kind, pipe, ...)` builds one for a pipeline (the
trainer's `default_scorer` and serving both use it); `scorer_from_settings(settings, pipe)` is SPO_SCORER's.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Iterable, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from spo_runtime.preference.spm import StepAwarePreferenceModel, build_spm, spm_config
from spo_runtime.preference.spm_source import load_spm_tokenizer, spm_weights_file
from spo_runtime.preference.spm_weights import load_spm_weights

if TYPE_CHECKING:
    from spo_runtime.model.pipeline import SpoPipeline
    from spo_runtime.settings import Settings

__all__ = ["BrightnessScorer", "PreferenceScorer", "ScorerKind", "SpmScorer", "build_scorer", "scorer_from_settings"]

ScorerKind = Literal["spm", "brightness", "darkness"]


@runtime_checkable
class PreferenceScorer(Protocol):
    """[-1, 1] images (B, 3, H, W), B prompts (or one), timesteps (B,) (or one) -> float32 scores (B,)."""

    def __call__(self, images: Tensor, prompts: list[str], timesteps: Tensor) -> Tensor: ...


def _check_prompts(prompts: Iterable[str], batch: int) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if len(prompts) == 1 and batch != 1:
        prompts = prompts * batch
    if len(prompts) != batch:
        raise ValueError(f"prompts: expected 1 or {batch} prompts, got {len(prompts)}")
    return prompts


class SpmScorer:
    """``PreferenceScorer`` backed by a ``StepAwarePreferenceModel`` and a transformers tokenizer.

    Prompts are tokenised to ``max_length`` (default: the text tower's 77 positions, truncated and padded)
    and their normalised text embeddings cached per prompt (LRU, ``cache_size`` entries; cleared by
    ``clear_cache()``, e.g. after reloading weights). Scoring runs under ``torch.no_grad()`` unless
    ``grad=True``, in which case gradients flow to the images (text embeddings are always cached detached).
    Images are moved to the model's device; scores come back float32 on that device.
    """

    def __init__(self, model: StepAwarePreferenceModel, tokenizer, *, grad: bool = False,
                 max_length: int | None = None, cache_size: int = 4096, name: str = "spm"):
        self.model = model
        self.tokenizer = tokenizer
        self.grad = grad
        self.name = name
        self.max_length = int(max_length or model.config.text_config.max_position_embeddings)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def clear_cache(self) -> None:
        self._cache.clear()

    @property
    def cache_len(self) -> int:
        return len(self._cache)

    def _text_embeds(self, prompts: list[str]) -> Tensor:
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if todo:
            tokens = self.tokenizer(todo, padding="max_length", max_length=self.max_length,
                                    truncation=True, return_tensors="pt")
            with torch.no_grad():
                emb = self.model.text_embeds(tokens["input_ids"]).detach()
            for prompt, row in zip(todo, emb):
                self._cache[prompt] = row
        rows = []
        for p in prompts:
            self._cache.move_to_end(p)
            rows.append(self._cache[p])
        out = torch.stack(rows)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def __call__(self, images: Tensor, prompts: list[str], timesteps: Tensor) -> Tensor:
        prompts = _check_prompts(prompts, images.shape[0])
        text = self._text_embeds(prompts)
        images = images.to(self.model.model.visual_projection.weight.device)
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            image = self.model.image_embeds(self.model.preprocess(images), timesteps)
            return self.model.scores_from_embeds(image, text).to(torch.float32)


class BrightnessScorer:
    """Toy preference: ``sign * mean(image)`` over (C, H, W) of [-1, 1] images, in float32; prompts and
    timesteps are ignored. ``sign=+1`` prefers bright images (SPO_SCORER=brightness), ``-1`` dark ones
    (darkness). Deterministic, any image size: the oracle of the selection tests."""

    image_size = None

    def __init__(self, sign: int = 1):
        if sign not in (1, -1):
            raise ValueError(f"sign: expected +1 or -1, got {sign!r}")
        self.sign = sign
        self.name = "brightness" if sign == 1 else "darkness"

    def __call__(self, images: Tensor, prompts: list[str], timesteps: Tensor) -> Tensor:
        if images.ndim != 4:
            raise ValueError(f"images: expected (B, C, H, W), got {tuple(images.shape)}")
        _check_prompts(prompts, images.shape[0])
        return self.sign * images.to(torch.float32).mean(dim=(1, 2, 3))


def build_scorer(kind: ScorerKind, pipe: SpoPipeline, *, spm_path: str | None = None, tokenizer=None,
                 tokenizer_dir: str | None = None, seed: int = 0) -> PreferenceScorer:
    """The scorer `kind` names, on `pipe`'s device. ``"spm"``: for the tiny preset a tiny SPM, random (seeded by
    `seed`) with the pipeline's tokenizer; otherwise full size, with the weights of `spm_path` (SPO_SPM) or, for
    the sdxl-spo preset, the released ones from the hub (refused, naming SPO_SPM, while the hub file is not
    pinned), and the tokenizer `tokenizer`, else `tokenizer_dir`'s (SPO_SPM_TOKENIZER), else the hub's (the
    pipeline's for sdxl-random). `spm_path` loads into the tiny SPM too (a checkpoint of the tiny shape).
    The SPM runs in float32 whatever the pipeline's dtype, as the authors' code does: pair selection compares
    score gaps near ln(1.4/0.6), which half precision would blur."""
    if kind in ("brightness", "darkness"):
        return BrightnessScorer(+1 if kind == "brightness" else -1)
    if kind != "spm":
        raise ValueError(f"scorer: must be spm, brightness or darkness, got {kind!r}")
    preset = pipe.preset.name
    if preset == "tiny":
        cfg = spm_config("tiny")
        cfg.text_config.vocab_size = len(pipe.tokenizers[0])  # the tiny tokenizer's ids
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = StepAwarePreferenceModel(cfg)
        tokenizer = tokenizer or pipe.tokenizers[0]
        weights = spm_path
        name = f"spm (tiny, {spm_path})" if spm_path else "spm (tiny, random)"
    else:
        # the weights file first: an unpinned hub file is refused at once, before 1.3 B parameters are built
        weights = spm_path or (spm_weights_file(None) if preset == "sdxl-spo" else None)
        model = build_spm("sdxl-random" if preset == "sdxl-random" else "sdxl", device="meta" if weights else "cpu")
        if tokenizer is None:
            tokenizer = pipe.tokenizers[0] if preset == "sdxl-random" else load_spm_tokenizer(tokenizer_dir)
        name = f"spm ({weights})" if weights else "spm (full size, random)"
    if weights:
        load_spm_weights(model, weights)
    model = model.to(pipe.device, torch.float32).eval().requires_grad_(False)
    return SpmScorer(model, tokenizer, name=name)


def scorer_from_settings(settings: Settings, pipe: SpoPipeline) -> PreferenceScorer | None:
    """SPO_SCORER's scorer for serving on `pipe` (None for `none`): the SPM from SPO_SPM and SPO_SPM_TOKENIZER
    (offline), the tiny random SPM on the tiny preset, or the brightness/darkness toys."""
    if settings.scorer == "none":
        return None
    return build_scorer(settings.scorer, pipe, spm_path=settings.spm, tokenizer_dir=settings.spm_tokenizer, seed=0)
