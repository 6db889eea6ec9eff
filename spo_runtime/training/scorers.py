"""The trainer's scorer: the one a job's config names (`config.scorer`, `config.spm_path`), built for the
trainer's pipeline by `spo_runtime.preference.scorers.build_scorer` (the interface and the scorers live there)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spo_runtime.preference.scorers import PreferenceScorer, build_scorer
from spo_runtime.training.config import TrainConfig

if TYPE_CHECKING:
    from spo_runtime.model.pipeline import SpoPipeline

__all__ = ["default_scorer"]


def default_scorer(config: TrainConfig, pipe: SpoPipeline, tokenizer=None) -> PreferenceScorer:
    """The scorer `config.scorer` names, for a trainer on `pipe`: for the tiny preset the tiny SPM, random and
    seeded by `config.seed`; otherwise the full-size one with `config.spm_path`'s weights (default SPO_SPM) or,
    for sdxl-spo, the released ones, and the tokenizer of SPO_SPM_TOKENIZER or the hub (`build_scorer`)."""
    return build_scorer(config.scorer, pipe, spm_path=config.spm_path, tokenizer=tokenizer,
                        tokenizer_dir=pipe.settings.spm_tokenizer, seed=config.seed)
