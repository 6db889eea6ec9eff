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

from server import STARTUPS, adapter_dir, standard_server  # noqa: F401  (session fixtures, seen by pytest from here)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` runs the suite in two pytest-xdist workers (PYTEST_XDIST_WORKER is set in each): one intra-op
# thread each, so that the two share the two cores instead of four OpenMP threads spinning on them, and
# passive OpenMP waits in this process and every process it starts (servers, CLI runs, training ranks)
XDIST = "PYTEST_XDIST_WORKER" in os.environ
if XDIST:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1 if XDIST else min(2, os.cpu_count() or 1))


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


def darkening_adapter(path) -> str:
    """Write a LoRA that darkens every image of the tiny model, whatever the prompt and seed; its sha256.

    It targets the UNet's conv_out, whose input is SiLU(GroupNorm(h)): down averages a 3x3 window over
    every channel (positive wherever SiLU's positive mean dominates), up maps that to 300 x (1, 1, -1, 1).
    The predicted noise gains a large term along (1, 1, -1, 1), so the sampler's clean-latent estimate ends
    far along -(1, 1, -1, 1), whatever the prompt and seed, and the tiny VAE decodes that direction darker
    than any base image: mean 119.8..120.6 against 121.4..122.4 for the base (64 prompt-seed pairs, 2 and 4
    DDIM steps, 32x32). So a darkness scorer prefers it in every pair, by construction."""
    from spo_runtime.lora.format import LoraModuleWeights, save_lora_file
    from spo_runtime.model.tiny import UNET_CONFIG

    channels = UNET_CONFIG["block_out_channels"][0]
    down = torch.ones(1, channels, 3, 3) / (9 * channels)
    up = torch.tensor([1.0, 1.0, -1.0, 1.0]).reshape(4, 1, 1, 1) * 300
    return save_lora_file(path, {"conv_out": LoraModuleWeights("conv_out", down, up, 1.0)}, "diffusers")


KOHYA_TE_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def kohya_text_encoder_lora(text_encoders: dict, leaves=KOHYA_TE_ATTENTION, rank: int = 2, alpha: float = 1.0,
                            seed: int = 25) -> tuple[dict, dict]:
    """Random LoRA weights for the `leaves` layers of both text encoders under the names kohya's SDXL trainer
    writes (`lora_te1_text_model_encoder_layers_N_self_attn_q_proj.lora_down.weight`, `lora_te2_...`, each
    with `.alpha`): ({key: tensor}, {module as spo_runtime names it: alpha / rank * up @ down, float64})."""
    from spo_runtime.lora.format import module_specs

    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    for part, kohya in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        for path, spec in module_specs(text_encoders[part]).items():
            if not path.endswith(tuple("." + leaf for leaf in leaves)):
                continue
            base = kohya + (path if path.startswith("text_model.") else "text_model." + path).replace(".", "_")
            down = torch.randn(rank, spec.in_features, generator=g) / spec.in_features**0.5
            up = torch.randn(spec.out_features, rank, generator=g) * (1.5 / rank**0.5)
            sd.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up,
                       f"{base}.alpha": torch.tensor(alpha)})
            deltas[f"{part}.{path}"] = alpha / rank * (up.double() @ down.double())
    return sd, deltas


def reported_lora(tiny_dir, text_encoders: dict) -> tuple[dict, dict]:
    """The file of the report behind issue 25 (refused, while diffusers loads it): the tiny model's webui LoRA
    (`lora_unet_*`) plus kohya q/k/v/out keys of both text encoders, each with `.alpha`: (state dict, the
    text-encoder layers' deltas as in `kohya_text_encoder_lora`)."""
    import safetensors.torch

    te, deltas = kohya_text_encoder_lora(text_encoders)
    return {**safetensors.torch.load_file(tiny_dir / "spo_tiny_lora_webui.safetensors"), **te}, deltas


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


def pytest_sessionfinish(session):
    """An xdist worker hands its server start-ups to the controller (pytest_testnodedown below)."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["startups"] = list(STARTUPS)


def pytest_testnodedown(node, error):
    STARTUPS.extend(tuple(s) for s in getattr(node, "workeroutput", {}).get("startups", ()))


def pytest_terminal_summary(terminalreporter):
    """How long the `bentoml serve` start-ups of this run took (tests/server.py's Server, in this process or
    in the xdist workers)."""
    if STARTUPS:
        each = ", ".join(f"{name} {s:.1f}" for name, s in STARTUPS)
        terminalreporter.write_line(f"bentoml serve start-ups: {len(STARTUPS)}, {sum(s for _, s in STARTUPS):.1f} s "
                                    f"to ready in all ({each})")


GROUP = pytest.StashKey[str]()


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """A test that takes a server fixture carries the `server` marker, so that `-m "not server"` (make
    test-fast) never starts one.

    Each test gets an xdist group, so that `make test`'s two workers (`--dist loadgroup`) start each server
    once: the tests of the shared standard server form one group, every other test runs with the rest of
    its module (whose module-scoped servers and pipelines it shares)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if {"standard_server", "server"} & names and item.get_closest_marker("server") is None:
            raise pytest.UsageError(f"{item.nodeid} uses a server fixture: mark it @pytest.mark.server")
        group = "standard_server" if "standard_server" in names else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))
        item.stash[GROUP] = group
    if XDIST:
        # the groups holding servers and slow tests first, so that the run does not end on one of them with
        # the other worker idle (xdist hands out groups in this order)
        heavy = {item.stash[GROUP] for item in items if item.get_closest_marker("server") or item.get_closest_marker("slow")}
        items.sort(key=lambda item: item.stash[GROUP] not in heavy)
