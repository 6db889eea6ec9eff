"""The scorer interface and its factory (SPO_SCORER, SPO_SPM): what serving's best_of, evaluation and the trainer
build. Float32 scores computed in float32 whatever the images' dtype; the tiny SPM is random, seeded and the
same at every build; SPO_SPM loads offline; an unpinned hub SPM is refused at once, naming SPO_SPM."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from spo_runtime.errors import CheckpointFormatError
from spo_runtime.preference.scorers import (BrightnessScorer, PreferenceScorer, SpmScorer, build_scorer,
                                            scorer_from_settings)
from spo_runtime.preference.spm_weights import save_spm_weights
from spo_runtime.settings import Settings


def _images(batch=3, side=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, side, side, generator=g) * 2 - 1


def test_settings_name_the_scorer(pipe):
    assert scorer_from_settings(Settings(model="tiny", scorer="none"), pipe) is None
    up = scorer_from_settings(Settings(model="tiny", scorer="brightness"), pipe)
    down = scorer_from_settings(Settings(model="tiny", scorer="darkness"), pipe)
    assert isinstance(up, BrightnessScorer) and up.name == "brightness" and down.name == "darkness"
    assert isinstance(up, PreferenceScorer) and up.image_size is None
    images = _images()
    assert torch.equal(up(images, ["a"], torch.zeros(3)), images.mean(dim=(1, 2, 3)))
    assert torch.equal(down(images, ["a"], torch.zeros(3)), -images.mean(dim=(1, 2, 3)))
    assert Settings.from_env({"SPO_SCORER": "brightness"}).scorer == "brightness"
    with pytest.raises(Exception, match="SPO_SCORER"):
        Settings.from_env({"SPO_SCORER": "pickscore"})


def test_tiny_spm_scores_float32_in_float32_and_is_the_same_at_every_build(pipe):
    scorer = scorer_from_settings(Settings(model="tiny"), pipe)  # SPO_SCORER's default: spm
    assert isinstance(scorer, SpmScorer) and scorer.name == "spm (tiny, random)" and scorer.image_size == 28
    assert next(scorer.model.parameters()).dtype == torch.float32
    images, prompts, t = _images(), ["a red fox", "a blue owl", "a red fox"], torch.tensor([0.0, 500.0, 999.0])
    scores = scorer(images, prompts, t)
    assert scores.dtype == torch.float32 and scores.shape == (3,) and torch.isfinite(scores).all()
    # half-precision or double images: the same float32 computation (preprocess casts to float32 first)
    assert scorer(images.double(), prompts, t).dtype == torch.float32
    assert torch.allclose(scorer(images.half(), prompts, t), scorer(images.half().float(), prompts, t))
    assert torch.equal(scorer_from_settings(Settings(model="tiny"), pipe)(images, prompts, t), scores)
    # the timestep conditions the score; one prompt and one timestep broadcast
    assert not torch.allclose(scorer(images, prompts, torch.zeros(3)), scorer(images, prompts, torch.full((3,), 999.0)))
    assert torch.equal(scorer(images, ["a red fox"], torch.tensor(0.0)), scorer(images, ["a red fox"] * 3, torch.zeros(3)))


def test_spo_spm_loads_offline_into_the_served_scorer(pipe, tmp_path):
    trained = build_scorer("spm", pipe, seed=7)  # another seed: other weights than the default build's
    path = tmp_path / "spm.safetensors"
    save_spm_weights(trained.model, path)
    served = scorer_from_settings(Settings(model="tiny", spm=str(path)), pipe)
    images, prompts, t = _images(2), ["a cat", "a dog"], torch.tensor([0.0, 300.0])
    assert torch.equal(served(images, prompts, t), trained(images, prompts, t))
    assert not torch.equal(scorer_from_settings(Settings(model="tiny"), pipe)(images, prompts, t), trained(images, prompts, t))
    assert served.name == f"spm (tiny, {path})"


def test_the_unpinned_hub_spm_is_refused_at_once_naming_spo_spm(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    real = SimpleNamespace(preset=SimpleNamespace(name="sdxl-spo"), device=torch.device("cpu"), tokenizers=[None])
    t0 = time.perf_counter()
    with pytest.raises(CheckpointFormatError, match="set SPO_SPM to a local"):
        scorer_from_settings(Settings(model="sdxl-spo"), real)
    assert time.perf_counter() - t0 < 5  # refused before the 1.3 B-parameter model is built
    with pytest.raises(ValueError, match="scorer"):
        build_scorer("pickscore", real)
