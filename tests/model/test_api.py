"""The public API, validation, presets, the CLI and the error contract."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import max_pixel_diff
from spo_runtime import ConfigError, GenerationRequest, InvalidRequestError, ModelLoadError, NonFiniteError, Settings, load_pipeline
from spo_runtime.model.presets import resolve

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("num_inference_steps", 0, "1..100"),
        ("num_inference_steps", 10000, "1..100"),
        ("num_inference_steps", "20", "integer"),
        ("guidance_scale", math.nan, "finite"),
        ("guidance_scale", 31, "0.0..30.0"),
        ("lora_scale", 99, "-2.0..2.0"),
        ("seed", -5, "0..4294967295"),
        ("seed", 2**32, "0..4294967295"),
        ("scheduler", "plms", "ddim, euler, dpmpp_2m_karras"),
        ("width", 100, "multiple of 8 in 32..256"),
        ("height", 512, "multiple of 8 in 32..256"),
        ("prompt", "   ", "non-empty"),
        ("adapter", "../etc", "letters, digits"),
        ("eta", 0.5, "scheduler is 'ddim'"),
        ("bogus", 1, "unknown field"),
    ],
)
def test_validation_names_field_and_range(field, value, needle):
    body = {"prompt": "a cat", field: value}
    if field == "eta":
        body["scheduler"] = "euler"
    with pytest.raises(InvalidRequestError) as e:
        GenerationRequest.parse(body, size_range=(32, 256))
    assert e.value.field == field
    assert needle in str(e.value) and str(e.value).startswith(field)


def test_missing_prompt_and_several_errors():
    with pytest.raises(InvalidRequestError) as e:
        GenerationRequest.parse({"num_inference_steps": 0, "seed": -1})
    fields = [f for f, _ in e.value.errors]
    assert fields == ["prompt", "num_inference_steps", "seed"]
    assert "field required" in str(e.value)


@pytest.mark.parametrize("size_range,sizes", [((32, 256), {"width": 512}), ((32, 256), {"height": 264}),
                                              ((32, 256), {"width": 1024, "height": 2048}),
                                              ((64, 256), {"width": 32, "height": 40})])
def test_a_parsed_request_gets_the_size_error_a_dict_gets(size_range, sizes):
    """A parsed request is not validated again: only its sizes, against a preset's narrower range, with the
    error the size-bounded model gives the same fields as a dict, byte for byte."""
    body = {"prompt": "a cat", **sizes}
    req = GenerationRequest.parse(body)  # the widest range
    with pytest.raises(InvalidRequestError) as from_dict:
        GenerationRequest.parse(body, size_range=size_range)
    with pytest.raises(InvalidRequestError) as from_request:
        GenerationRequest.parse(req, size_range=size_range)
    got, want = from_request.value, from_dict.value
    assert str(got) == str(want) and (got.field, got.message, got.errors) == (want.field, want.message, want.errors)
    assert got.field == next(iter(sizes)) and f"{size_range[0]}..{size_range[1]}" in str(got)
    assert GenerationRequest.parse(req, size_range=(32, 2048)) is req and GenerationRequest.parse(req) is req


def test_a_request_is_parsed_once(pipe):
    """What the engine's submit parsed passes the pipeline's parse and prepare as the same object."""
    req = pipe.parse(dict(prompt="a cat", seed=3, num_inference_steps=2, width=64))
    assert pipe.parse(req) is req
    [state] = pipe.prepare([req])
    assert state.request is req and state.width == 64
    with pytest.raises(InvalidRequestError) as e:
        pipe.parse(GenerationRequest(prompt="a cat", width=512))  # valid in general, not for the tiny preset
    assert str(e.value) == "width: must be a multiple of 8 in 32..256, got 512"


def test_seed_drawn_and_reported_and_reproducible(pipe):
    a = pipe.generate([dict(prompt="a cat", num_inference_steps=3)])[0]
    assert 0 <= a.seed <= 2**32 - 1
    b = pipe.generate([dict(prompt="a cat", num_inference_steps=3, seed=a.seed)])[0]
    assert max_pixel_diff(a.image, b.image) == 0


def test_long_prompt_is_truncated_and_flagged(pipe):
    long = " ".join(["zebra"] * 200)
    r = pipe.generate([dict(prompt=long, num_inference_steps=2, seed=1), dict(prompt="a cat", num_inference_steps=2, seed=1)])
    assert r[0].prompt_truncated and not r[1].prompt_truncated


def test_embedding_cache_hits_and_bounds(tiny_dir):
    p = load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), embed_cache_size=2))
    calls = []
    orig = p.prompts._encode_texts
    p.prompts._encode_texts = lambda texts: calls.append(list(texts)) or orig(texts)
    p.prepare([dict(prompt="a", negative_prompt="b"), dict(prompt="a")])  # one batched call, "a" once
    p.prepare([dict(prompt="a")])  # cached
    p.prepare([dict(prompt="c"), dict(prompt="d")])  # evicts
    assert calls == [["a", "b"], ["c", "d"]]
    assert list(p.prompts._cache) == ["c", "d"]


def test_mixed_sizes_in_one_call(pipe):
    reqs = [dict(prompt="a", seed=1, width=64, height=64, num_inference_steps=2),
            dict(prompt="a", seed=1, width=96, height=64, num_inference_steps=2)]
    out = pipe.generate(reqs)
    assert [o.image.size for o in out] == [(64, 64), (96, 64)]
    assert max_pixel_diff(out[1].image, pipe.generate([reqs[1]])[0].image) <= 1


def test_nan_latent_raises_typed_error(pipe):
    [s] = pipe.prepare([dict(prompt="a", seed=1, num_inference_steps=1)])
    s.latents = torch.full_like(s.latents, float("nan"))
    [r] = pipe.decode([s])
    assert isinstance(r, NonFiniteError) and "NaN" in str(r)


def test_settings_from_env_and_auto_preset():
    s = Settings.from_env({"SPO_MODEL": "auto", "SPO_LORA_SCALE": "0.5", "SPO_LORA_FUSE": "false"})
    assert s.lora_scale == 0.5 and s.lora_fuse is False
    preset, device, dtype = resolve(s)
    assert (preset.name, device.type, dtype) == ("tiny", "cpu", torch.float32)  # no CUDA here
    with pytest.raises(ConfigError, match="SPO_LORA_SCALE"):  # a configuration error, not a request's 400
        Settings.from_env({"SPO_LORA_SCALE": "9"})
    with pytest.raises(ConfigError, match="SPO_MODEL"):
        Settings.from_env({"SPO_MODEL": "sd15"})


def test_xformers_missing_is_a_clear_error(tiny_dir):
    try:
        import xformers  # noqa: F401

        pytest.skip("xformers is installed here")
    except ImportError:
        pass
    with pytest.raises(ModelLoadError, match="SPO_ATTENTION=xformers"):
        load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), attention="xformers"))


def test_sdxl_spo_loader_on_local_files(tiny_dir, pipe):
    """The sdxl-spo loading path (pipeline dir + separate VAE dir + LoRA file), offline, on the saved tiny model."""
    p = load_pipeline(Settings(model="sdxl-spo", base_model=str(tiny_dir), vae=str(tiny_dir / "vae"),
                               lora=str(tiny_dir / "spo_tiny_lora_diffusers.safetensors"), device="cpu"))
    assert p.preset.name == "sdxl-spo" and p.preset.default_size == 1024
    r = p.generate([dict(prompt="a fox", seed=3, width=256, height=256, num_inference_steps=2)])[0]
    ref = pipe.generate([dict(prompt="a fox", seed=3, width=256, height=256, num_inference_steps=2)])[0]
    assert r.image.size == (256, 256) and max_pixel_diff(r.image, ref.image) <= 1
    info = p.info()
    assert "id" not in info["sources"]["base"] and len(info["sources"]["base"]["sha256"]) == 64  # hashes, not paths
    assert p.info(show_paths=True)["sources"]["base"]["id"] == str(tiny_dir)


def test_sdxl_spo_without_hub_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="SPO_BASE_MODEL"):
        load_pipeline(Settings(model="sdxl-spo", device="cpu", base_model=str(tmp_path / "nothing-here")))


def test_sdxl_random_architecture_matches_spo_lora_layout():
    """The repo's SDXL configs: 2.57 B UNet parameters and SPO's 140 attention modules x 4 = 560 LoRA layers."""
    from diffusers import UNet2DConditionModel

    from spo_runtime.model.loading import _config

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_config("unet.json"))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    targets = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert len(targets) == 560
    lora_params = sum(m.in_features * 64 + m.out_features * 64 for n, m in unet.named_modules() if n in set(targets))
    assert abs(lora_params - 92.9e6) < 0.1e6  # the released SPO LoRA's size


@pytest.mark.slow
def test_cli_generate_save_tiny_and_errors(tmp_path):
    env = {"SPO_MODEL": "tiny", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out, refused = tmp_path / "cli.png", tmp_path / "refused.png"

    def cli(*args) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "spo_runtime", *args], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def finished(proc: subprocess.Popen) -> subprocess.CompletedProcess:
        stdout, stderr = proc.communicate(timeout=120)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    # the three commands are independent: started together, their start-ups (importing the stack) overlap
    procs = [cli("generate", "a fox", "--seed", "42", "--steps", "3", "--lora-scale", "0.5", "-o", str(out)),
             cli("generate", "a fox", "--steps", "0", "-o", str(refused)),
             cli("save-tiny", str(tmp_path / "t"))]
    try:
        generated, refusal, saved = [finished(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    r = generated
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout.strip().splitlines()[-1])
    assert meta["seed"] == 42 and meta["lora_scale"] == 0.5
    img = Image.open(out)
    assert img.size == (64, 64)
    assert "Seed: 42" in img.text["parameters"] and "Lora scale: 0.5" in img.text["parameters"]
    r = refusal
    assert r.returncode == 2 and "num_inference_steps: must be in 1..100, got 0" in r.stderr
    assert not refused.exists()
    r = saved
    assert r.returncode == 0, r.stderr
    names = {p.name for p in (tmp_path / "t").iterdir()}
    assert {"model_index.json", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
            "spo_tiny_lora_webui.safetensors", "spo_tiny_lora_diffusers.safetensors"} <= names
    sched = json.loads((tmp_path / "t" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["timestep_spacing"] == "leading" and sched["steps_offset"] == 1
