"""Shared fixtures: the tiny model saved once per session, our pipeline and diffusers' on it."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from spo_runtime import save_tiny

    d = tmp_path_factory.mktemp("tiny")
    save_tiny(d)
    return d


@pytest.fixture(scope="session")
def pipe(tiny_dir):
    """Our pipeline on the saved tiny model, loaded through the real loading path (webui LoRA file)."""
    from spo_runtime import Settings, load_pipeline

    return load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora=str(tiny_dir / "spo_tiny_lora_webui.safetensors")))


@pytest.fixture(scope="session")
def diffusers_pipe(tiny_dir):
    from diffusers import StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline.from_pretrained(tiny_dir, add_watermarker=False)
    p.load_lora_weights(str(tiny_dir), weight_name="spo_tiny_lora_diffusers.safetensors", adapter_name="spo")
    p.set_progress_bar_config(disable=True)
    return p


def pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def max_pixel_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def system_tool(name: str, package: str) -> str:
    """A Debian tool a test needs (kubectl, prometheus, promtool): skipped with one line where it is missing (a
    machine without apt; `make deps-system` says what it would install), a failure in CI, which installs it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found: `make deps-system` installs it (Debian package {package})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
