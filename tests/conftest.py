"""Shared fixtures and helpers: the tiny model saved once per session, our pipeline and diffusers' on it, one
intra-op thread, image comparison, polling; and (from server.py) the `bentoml serve` instances that test
modules share, one per configuration.

tests/ is on sys.path (pyproject's pytest `pythonpath`), so test files in the folders below import
`from conftest import ...` and `from server import ...`."""

from __future__ import annotations

import io
import os
import shutil
import time

import numpy as np
import pytest
import torch

from server import adapter_dir, standard_server  # noqa: F401  (session fixtures, seen by pytest from here)

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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on a shared 2-core machine two OpenMP threads make tiny steps and
    training rounds many times slower (spinning workers wait for a descheduled one; benchmarks/RESULTS.md,
    contention). Modules take it with `pytestmark = pytest.mark.usefixtures("one_thread")`, which sets it
    up before their module fixtures."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pixels(image) -> np.ndarray:
    """An image as int16 RGB pixels (differences do not wrap): a PIL image, encoded bytes (PNG, JPEG, WebP)
    as an HTTP answer carries them, or an array."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.int16)


def max_pixel_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def wait_until(predicate, timeout: float = 30.0, every: float = 0.05):
    """Poll `predicate` until it returns something true, and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {predicate}")
        time.sleep(every)


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


def pytest_terminal_summary(terminalreporter):
    """How long the `bentoml serve` start-ups of this run took (tests/server.py's Server, this process)."""
    from server import STARTUPS

    if STARTUPS:
        each = ", ".join(f"{name} {s:.1f}" for name, s in STARTUPS)
        terminalreporter.write_line(f"bentoml serve start-ups: {len(STARTUPS)}, {sum(s for _, s in STARTUPS):.1f} s "
                                    f"to ready in all ({each})")


def pytest_collection_modifyitems(items):
    """A test that takes a server fixture carries the `server` marker, so that `-m "not server"` (make
    test-fast) never starts one."""
    for item in items:
        if {"standard_server", "server"} & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("server") is None:
            raise pytest.UsageError(f"{item.nodeid} uses a server fixture: mark it @pytest.mark.server")
