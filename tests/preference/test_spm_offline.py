"""Offline SPM: SPO_SPM is TrainConfig.spm_path's default (a job's config overrides it), SPO_SPM_TOKENIZER a
local tokenizer directory; without them and without the hub, the error names the variable to set."""

from __future__ import annotations

import pytest
import torch

from spo_runtime.errors import CheckpointFormatError
from spo_runtime.preference.spm import StepAwarePreferenceModel, build_spm, spm_config
from spo_runtime.preference.spm_source import load_spm_tokenizer, spm_weights_file
from spo_runtime.preference.spm_weights import load_spm_weights, save_spm_weights
from spo_runtime.training.config import TrainConfig


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_spo_spm_is_the_default_spm_path_and_loads(tmp_path, monkeypatch, suffix):
    model = StepAwarePreferenceModel(spm_config("tiny"))
    path = tmp_path / f"spm{suffix}"
    save_spm_weights(model, path)
    monkeypatch.setenv("SPO_SPM", str(path))
    assert TrainConfig().spm_path == str(path)
    assert TrainConfig.parse({"spm_path": "/elsewhere.bin"}).spm_path == "/elsewhere.bin"  # the job's config wins
    other = build_spm("tiny", seed=1)
    load_spm_weights(other, spm_weights_file(TrainConfig().spm_path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    monkeypatch.delenv("SPO_SPM")
    assert TrainConfig().spm_path is None


def test_missing_spm_and_tokenizer_name_the_variable(tmp_path, offline, tiny_dir, monkeypatch):
    from transformers import CLIPTokenizer

    real = CLIPTokenizer.from_pretrained.__func__

    def no_hub(cls, source, **kw):  # this machine's HF cache may hold the tokenizer: behave as a bare one
        if not str(source).startswith("/"):
            raise OSError(f"We couldn't connect to the hub to load {source} and it is not in the cache")
        return real(cls, source, **kw)

    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", classmethod(no_hub))
    with pytest.raises(CheckpointFormatError, match="set SPO_SPM to a local"):
        spm_weights_file(None)
    with pytest.raises(FileNotFoundError, match="SPO_SPM"):
        spm_weights_file(str(tmp_path / "missing.bin"))
    with pytest.raises(CheckpointFormatError, match="set SPO_SPM_TOKENIZER"):
        load_spm_tokenizer(None)
    with pytest.raises(CheckpointFormatError, match="SPO_SPM_TOKENIZER"):
        load_spm_tokenizer(str(tmp_path))
    tok = load_spm_tokenizer(str(tiny_dir / "tokenizer"))  # any local CLIP tokenizer directory
    assert tok("a fox").input_ids[0] == tok.bos_token_id
    from spo_runtime.model.presets import hub_file

    with pytest.raises(Exception, match="set SPO_SPM to a local"):
        hub_file("SPO-Diffusion-Models/Step-Aware_Preference_Models", "sdxl_step-aware_preference_model.bin", "SPO_SPM")
