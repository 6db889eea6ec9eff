"""Where the SPM's files come from: SPO_SPM (weights) and SPO_SPM_TOKENIZER (a local tokenizer directory)
for offline training, else the released files on the Hugging Face hub. Every error names the variable
to set."""

from __future__ import annotations

import os
from pathlib import Path

from spo_runtime.errors import CheckpointFormatError
from spo_runtime.model import weights
from spo_runtime.settings import Settings

__all__ = ["SPM_FILE", "SPM_REPO", "SPM_TOKENIZER_REPO", "default_spm_path", "load_spm_tokenizer", "spm_weights_file"]

SPM_REPO = weights.PARTS["spm"].repo  # repositories, files and revisions: spo_runtime/model/weights.py
SPM_FILE = weights.PARTS["spm"].files[0]
SPM_TOKENIZER_REPO = weights.PARTS["spm_tokenizer"].repo


def default_spm_path() -> str | None:
    """SPO_SPM (through Settings): the default of `TrainConfig.spm_path`; a job's config overrides it."""
    return Settings.from_env({k: v for k, v in os.environ.items() if k == "SPO_SPM"}).spm


def spm_weights_file(path: str | None) -> str:
    """The SPM weights to load: `path` (TrainConfig.spm_path, default SPO_SPM), else the released file from the
    hub; the error says which variable to set."""
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"SPO_SPM / config.spm_path: SPM checkpoint not found: {path}")
        return str(path)
    try:
        return str(weights.download(weights.fetch_for("spm", weights.env_settings())))
    except Exception as e:  # offline, gated, missing, not pinned
        raise CheckpointFormatError(
            f"SPO_SPM: could not fetch {SPM_REPO}/{SPM_FILE} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "set SPO_SPM to a local .safetensors or .bin file of the step-aware preference model"
        ) from e


def load_spm_tokenizer(directory: str | None):
    """The SPM's tokenizer: from `directory` (SPO_SPM_TOKENIZER), else CLIP-ViT-H-14's from the hub; the error
    says which variable to set."""
    from transformers import CLIPTokenizer

    try:
        if directory and not any((Path(directory) / f).is_file() for f in ("vocab.json", "tokenizer.json")):
            raise FileNotFoundError("no vocab.json or tokenizer.json in it")
        source = directory or str(weights.download(weights.fetch_for("spm_tokenizer", weights.env_settings())))
        return CLIPTokenizer.from_pretrained(source, local_files_only=True)
    except Exception as e:
        what = f"the tokenizer directory {directory!r}" if directory else f"{SPM_TOKENIZER_REPO} from the Hugging Face hub"
        raise CheckpointFormatError(
            f"SPO_SPM_TOKENIZER: could not load {what} ({type(e).__name__}: {e}); set SPO_SPM_TOKENIZER to a local "
            "directory holding the SPM's CLIP tokenizer (vocab.json, merges.txt, tokenizer_config.json)"
        ) from e
