"""Scorers: the preference function a trainer ranks its candidates with.

A `PreferenceScorer` maps [-1, 1] images (B, 3, H, W), B prompts and timesteps (B,) to scores (B,).
`SpmScorer` is the step-aware preference model (`spm`) with its tokenizer; `BrightnessScorer` a toy for
tests. `default_scorer` is the one a job's config names, built for the trainer's pipeline.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Iterable, Protocol, runtime_checkable

import torch
from torch import Tensor

from spo_runtime.training.config import TrainConfig
from spo_runtime.training.spm import StepAwarePreferenceModel, build_spm, spm_config
from spo_runtime.training.spm_source import load_spm_tokenizer, spm_weights_file
from spo_runtime.training.spm_weights import load_spm_weights

if TYPE_CHECKING:
    from spo_runtime.model.pipeline import SpoPipeline

__all__ = ["BrightnessScorer", "PreferenceScorer", "SpmScorer", "default_scorer"]


@runtime_checkable
class PreferenceScorer(Protocol):
    """A preference function: [-1, 1] images (B, 3, H, W), B prompts, timesteps (B,) -> scores (B,)."""

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
    """

    def __init__(self, model: StepAwarePreferenceModel, tokenizer, *, grad: bool = False,
                 max_length: int | None = None, cache_size: int = 4096):
        self.model = model
        self.tokenizer = tokenizer
        self.grad = grad
        self.max_length = int(max_length or model.config.text_config.max_position_embeddings)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

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
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            image = self.model.image_embeds(self.model.preprocess(images), timesteps)
            return self.model.scores_from_embeds(image, text)


class BrightnessScorer:
    """Toy preference: ``sign * mean(image)`` over (C, H, W) of [-1, 1] images; prompts and timesteps are
    ignored. ``sign=+1`` prefers bright images, ``-1`` dark ones."""

    def __init__(self, sign: int = 1):
        if sign not in (1, -1):
            raise ValueError(f"sign: expected +1 or -1, got {sign!r}")
        self.sign = sign

    def __call__(self, images: Tensor, prompts: list[str], timesteps: Tensor) -> Tensor:
        if images.ndim != 4:
            raise ValueError(f"images: expected (B, C, H, W), got {tuple(images.shape)}")
        _check_prompts(prompts, images.shape[0])
        return self.sign * images.float().mean(dim=(1, 2, 3))


def default_scorer(config: TrainConfig, pipe: SpoPipeline, tokenizer=None) -> PreferenceScorer:
    """The scorer `config.scorer` names, for a trainer on `pipe`. The SPM: for the tiny preset a tiny one,
    random (seeded by `config.seed`) with the pipeline's tokenizer; otherwise full size, with the weights
    of `config.spm_path` (default SPO_SPM) or, for the sdxl-spo preset, the released ones, and the tokenizer of
    SPO_SPM_TOKENIZER or the hub (the pipeline's for sdxl-random)."""
    if config.scorer == "brightness":
        return BrightnessScorer(+1)
    if config.scorer == "darkness":
        return BrightnessScorer(-1)
    preset = pipe.preset.name
    if preset == "tiny":
        cfg = spm_config("tiny")
        cfg.text_config.vocab_size = len(pipe.tokenizers[0])  # the tiny tokenizer's ids
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = StepAwarePreferenceModel(cfg)
        tokenizer = tokenizer or pipe.tokenizers[0]
    else:
        model = build_spm("sdxl-random" if preset == "sdxl-random" else "sdxl", device="cpu")
        if tokenizer is None:
            if preset == "sdxl-random":
                tokenizer = pipe.tokenizers[0]
            else:  # SPO_SPM_TOKENIZER (offline), else the hub's; the error names the variable
                tokenizer = load_spm_tokenizer(pipe.settings.spm_tokenizer)
    if config.spm_path:
        load_spm_weights(model, config.spm_path)
    elif preset == "sdxl-spo":
        load_spm_weights(model, spm_weights_file(None))
    # the SPM scores in float32 whatever the pipeline's dtype, as the authors' code does: pair selection
    # compares score gaps near ln(1.4/0.6), which half precision would blur
    model = model.to(pipe.device, torch.float32).eval().requires_grad_(False)
    return SpmScorer(model, tokenizer)
