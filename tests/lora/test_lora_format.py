"""LoRA file format: round trips in both layouts, strict validation, atomic writes, diffusers compatibility."""

from __future__ import annotations

import copy
import hashlib
import os

import pytest
import safetensors.torch
import torch

from spo_runtime.errors import LoraFormatError
from spo_runtime.lora.format import (
    LoraFile,
    LoraModuleWeights,
    ModuleSpec,
    detect_layout,
    lora_state_dict,
    module_specs,
    parse_lora_state_dict,
    read_lora_file,
    save_lora_file,
)

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0."
TARGETS = [
    ATTN + "attn1.to_q", ATTN + "attn1.to_k", ATTN + "attn1.to_v", ATTN + "attn1.to_out.0",
    ATTN + "attn2.to_k", ATTN + "ff.net.0.proj", ATTN + "ff.net.2",
    "down_blocks.0.resnets.0.conv1", "down_blocks.1.resnets.0.conv_shortcut",
]
RANK = 4


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=64, norm_num_groups=8, transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
    ).eval()


@pytest.fixture(scope="module")
def specs(unet):
    return module_specs(unet)


def random_lora(specs, alphas=None, seed=1) -> dict[str, LoraModuleWeights]:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for i, name in enumerate(TARGETS):
        s = specs[name]
        extra = s.kernel_size if s.kind == "conv" else ()
        tail = (1, 1) if s.kind == "conv" else ()
        down = torch.randn((RANK, s.in_features, *extra), generator=gen)
        up = torch.randn((s.out_features, RANK, *tail), generator=gen)
        modules[name] = LoraModuleWeights(name, down, up, float(alphas[i] if alphas else RANK))
    return modules


def delta(m: LoraModuleWeights) -> torch.Tensor:
    return m.scale * (m.up.flatten(1).double() @ m.down.flatten(1).double())


def webui_key(name: str, suffix: str) -> str:
    return "lora_unet_" + name.replace(".", "_") + "." + suffix


def test_module_specs_kinds_and_shapes(specs):
    assert specs[ATTN + "attn1.to_q"] == ModuleSpec("linear", 64, 64)
    assert specs[ATTN + "attn2.to_k"] == ModuleSpec("linear", 64, 64)
    assert specs[ATTN + "ff.net.0.proj"] == ModuleSpec("linear", 64, 512)
    assert specs[ATTN + "ff.net.2"] == ModuleSpec("linear", 256, 64)
    assert specs["down_blocks.0.resnets.0.conv1"] == ModuleSpec("conv", 32, 32, (3, 3))
    assert specs["down_blocks.1.resnets.0.conv_shortcut"] == ModuleSpec("conv", 32, 64, (1, 1))
    assert "conv_norm_out" not in specs
    assert len(specs) == 125


def test_module_specs_reports_wrapper_path_not_base_layer():
    class Wrapper(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_layer = base
            self.lora_down = torch.nn.Linear(base.in_features, 2, bias=False)

    model = torch.nn.Sequential(Wrapper(torch.nn.Linear(8, 16)), torch.nn.Conv2d(16, 4, 3))
    assert module_specs(model) == {"0": ModuleSpec("linear", 8, 16), "1": ModuleSpec("conv", 16, 4, (3, 3))}


@pytest.mark.parametrize("layout", ["diffusers", "webui"])
def test_round_trip_identical_tensors(tmp_path, specs, layout):
    modules = random_lora(specs)
    path = tmp_path / f"lora.{layout}.safetensors"
    digest = save_lora_file(path, modules, layout, metadata={"source": "test"})
    lf = read_lora_file(path, specs)
    assert isinstance(lf, LoraFile) and lf.layout == layout and lf.path == path
    assert digest == lf.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert list(lf.modules) == [n for n in specs if n in modules]  # UNet order, whatever the file order
    for name, m in modules.items():
        got = lf.modules[name]
        assert got.module == name and got.alpha == RANK and got.scale == 1.0
        assert torch.equal(got.down, m.down) and torch.equal(got.up, m.up)
        assert got.down.dtype == torch.float32
        assert torch.equal(delta(got), delta(m))
    assert lf.rank == RANK
    assert lf.targets == ["conv1", "conv_shortcut", "net.2", "proj", "to_k", "to_out.0", "to_q", "to_v"]
    assert lf.nbytes == sum(4 * (m.down.numel() + m.up.numel()) for m in modules.values())
    assert os.listdir(tmp_path) == [path.name]


def test_webui_alpha_round_trips_and_bakes_into_diffusers(tmp_path, specs):
    alphas = [1.0, 2.0, 8.0, 0.5, 4.0, 3.0, 16.0, 1.5, 2.0]
    modules = random_lora(specs, alphas)
    save_lora_file(tmp_path / "w.safetensors", modules, "webui")
    webui = read_lora_file(tmp_path / "w.safetensors", specs)
    assert {n: m.alpha for n, m in webui.modules.items()} == dict(zip(TARGETS, alphas))
    for name, m in modules.items():
        assert torch.equal(webui.modules[name].down, m.down) and torch.equal(webui.modules[name].up, m.up)

    raw = safetensors.torch.load_file(tmp_path / "w.safetensors")
    assert raw[webui_key(TARGETS[0], "alpha")].shape == () and len(raw) == 3 * len(TARGETS)

    save_lora_file(tmp_path / "d.safetensors", webui.modules, "diffusers")
    raw = safetensors.torch.load_file(tmp_path / "d.safetensors")
    assert not any(k.endswith(".alpha") for k in raw) and len(raw) == 2 * len(TARGETS)
    diff = read_lora_file(tmp_path / "d.safetensors", specs)
    for name, m in modules.items():
        got = diff.modules[name]
        assert got.alpha == RANK and torch.equal(got.down, m.down)
        assert torch.allclose(delta(got), delta(m), rtol=0, atol=1e-6)


def test_peft_keys_and_half_precision_parse(specs):
    s = specs[ATTN + "attn1.to_out.0"]
    sd = {
        f"unet.{ATTN}attn1.to_out.0.lora_A.weight": torch.randn(2, s.in_features).half(),
        f"unet.{ATTN}attn1.to_out.0.lora_B.weight": torch.randn(s.out_features, 2).half(),
        f"unet.{ATTN}attn1.to_out.0.alpha": torch.tensor(1.0),
    }
    layout, modules = parse_lora_state_dict(sd, specs)
    m = modules[ATTN + "attn1.to_out.0"]
    assert layout == "diffusers" and m.rank == 2 and m.alpha == 1.0 and m.scale == 0.5
    assert m.down.dtype == torch.float16 and m.down is sd[f"unet.{ATTN}attn1.to_out.0.lora_A.weight"]


def test_detect_layout():
    assert detect_layout(["unet.a.lora.down.weight"]) == "diffusers"
    assert detect_layout(["lora_unet_a.lora_down.weight"]) == "webui"


def good_state_dict(specs, layout="diffusers"):
    return lora_state_dict(random_lora(specs, [2.0] * len(TARGETS)), layout)


Q = ATTN + "attn1.to_q"
DOWN, UP = f"unet.{Q}.lora.down.weight", f"unet.{Q}.lora.up.weight"


def broken(name, specs):
    sd = good_state_dict(specs, "webui" if name.startswith("webui") else "diffusers")
    if name == "dangling_down":
        del sd[UP]
        return sd, DOWN
    if name == "dangling_up":
        del sd[DOWN]
        return sd, UP
    if name == "unknown_module":
        key = "unet.down_blocks.9.attentions.0.proj_in.lora.down.weight"
        sd[key], sd[key.replace(".lora.down.", ".lora.up.")] = torch.zeros(4, 64), torch.zeros(64, 4)
        return sd, key
    if name == "not_linear_or_conv":
        key = "unet.conv_norm_out.lora.down.weight"
        sd[key], sd[key.replace(".lora.down.", ".lora.up.")] = torch.zeros(4, 32), torch.zeros(32, 4)
        return sd, key
    if name == "wrong_shape":
        sd[DOWN] = torch.zeros(4, 63)
        return sd, DOWN
    if name == "conv_as_linear":
        key = "unet.down_blocks.0.resnets.0.conv1.lora.down.weight"
        sd[key] = sd[key].flatten(1)
        return sd, key
    if name == "rank_mismatch":
        sd[UP] = torch.zeros(64, 3)
        return sd, UP
    if name == "grammar":
        sd[f"unet.{Q}.lora.mid.weight"] = torch.zeros(1)
        return sd, f"unet.{Q}.lora.mid.weight"
    if name == "non_finite":
        sd[UP] = sd[UP].clone()
        sd[UP][0, 0] = float("nan")
        return sd, UP
    if name == "duplicate_down":
        sd[f"unet.{Q}.lora_A.weight"] = sd[DOWN].clone()
        return sd, f"unet.{Q}.lora_A.weight"
    if name == "duplicate_down_first":  # the same, with the peft key first: diffusers would then rename none
        sd = {f"unet.{Q}.lora_A.weight": sd[DOWN].clone(), **sd}
        return sd, f"unet.{Q}.lora_A.weight"
    if name == "webui_missing_alpha":
        del sd[webui_key(Q, "alpha")]
        return sd, webui_key(Q, "lora_down.weight")
    if name == "webui_alpha_without_weights":
        sd[webui_key("conv_in", "alpha")] = torch.tensor(1.0)
        return sd, webui_key("conv_in", "alpha")
    if name == "webui_alpha_zero":
        sd[webui_key(Q, "alpha")] = torch.tensor(0.0)
        return sd, webui_key(Q, "alpha")
    if name == "webui_alpha_nan":
        sd[webui_key(Q, "alpha")] = torch.tensor(float("inf"))
        return sd, webui_key(Q, "alpha")
    if name == "webui_sgm_names":
        key = "lora_unet_input_blocks_4_1_proj_in.lora_down.weight"
        sd[key] = torch.zeros(4, 64)
        return sd, key
    if name == "text_encoder":
        sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 8)
        return sd, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"
    if name == "text_encoder_diffusers":
        sd["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight"] = torch.zeros(4, 8)
        return sd, "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight"
    if name == "mixed_layouts":
        sd[webui_key(Q, "lora_down.weight")] = sd[DOWN].clone()
        return sd, webui_key(Q, "lora_down.weight")
    if name == "unknown_prefix":
        sd["model.diffusion_model.out.2.weight"] = torch.zeros(1)
        return sd, "model.diffusion_model.out.2.weight"
    raise AssertionError(name)


BROKEN = [
    "dangling_down", "dangling_up", "unknown_module", "not_linear_or_conv", "wrong_shape", "conv_as_linear",
    "rank_mismatch", "grammar", "non_finite", "duplicate_down", "duplicate_down_first", "webui_missing_alpha", "webui_alpha_without_weights",
    "webui_alpha_zero", "webui_alpha_nan", "webui_sgm_names", "text_encoder", "text_encoder_diffusers",
    "mixed_layouts", "unknown_prefix",
]


@pytest.mark.parametrize("name", BROKEN)
def test_broken_state_dicts_raise_naming_the_key(tmp_path, specs, name):
    sd, key = broken(name, specs)
    with pytest.raises(LoraFormatError) as exc:
        parse_lora_state_dict(sd, specs)
    assert key in exc.value.keys and key in str(exc.value)
    safetensors.torch.save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(LoraFormatError) as exc:
        read_lora_file(tmp_path / "bad.safetensors", specs)
    assert key in exc.value.keys


def test_shape_error_says_what_was_expected(specs):
    sd, _ = broken("wrong_shape", specs)
    with pytest.raises(LoraFormatError, match=r"expected shape \[4, 64\], got \[4, 63\]"):
        parse_lora_state_dict(sd, specs)
    sd, _ = broken("conv_as_linear", specs)
    with pytest.raises(LoraFormatError, match=r"expected shape \[r, 32, 3, 3\], got \[4, 288\]"):
        parse_lora_state_dict(sd, specs)


def test_many_offending_keys_are_summarised(specs):
    sd = {f"unet.nowhere.{i}.lora.down.weight": torch.zeros(1, 1) for i in range(25)}
    with pytest.raises(LoraFormatError, match="and 15 more") as exc:
        parse_lora_state_dict(sd, specs)
    assert len(exc.value.keys) == 25


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".PTH", ".ckpt", ".pkl"])
def test_pickle_files_are_refused_unread(tmp_path, specs, suffix):
    path = tmp_path / f"lora{suffix}"
    torch.save(good_state_dict(specs), path)
    with pytest.raises(LoraFormatError, match="pickle files .* refused; convert to safetensors") as exc:
        read_lora_file(path, specs)
    assert path.name in str(exc.value)
    with pytest.raises(LoraFormatError, match="pickle"):
        save_lora_file(path, random_lora(specs), "diffusers")


GARBAGE = [b"", b"not a safetensors file at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"]


@pytest.mark.parametrize("content", GARBAGE)
def test_garbage_and_missing_files(tmp_path, specs, content):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    with pytest.raises(LoraFormatError, match="not a readable safetensors file") as exc:
        read_lora_file(path, specs)
    assert "garbage.safetensors" in str(exc.value)
    with pytest.raises(LoraFormatError, match="cannot read"):
        read_lora_file(tmp_path / "missing.safetensors", specs)


def test_empty_safetensors_file_is_refused(tmp_path, specs):
    safetensors.torch.save_file({}, tmp_path / "empty.safetensors")
    with pytest.raises(LoraFormatError, match="no keys"):
        read_lora_file(tmp_path / "empty.safetensors", specs)
    with pytest.raises(LoraFormatError):
        save_lora_file(tmp_path / "none.safetensors", {}, "webui")


def test_atomic_save_keeps_old_file_on_failure(tmp_path, specs, monkeypatch):
    path = tmp_path / "lora.safetensors"
    first = save_lora_file(path, random_lora(specs, seed=1), "diffusers")
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        save_lora_file(path, random_lora(specs, seed=2), "diffusers")
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]
    second = save_lora_file(path, random_lora(specs, seed=2), "diffusers")
    assert second != first and second == hashlib.sha256(path.read_bytes()).hexdigest()
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("layout", ["diffusers", "webui"])
def test_diffusers_lora_state_dict_maps_every_key(tmp_path, specs, layout):
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    path = tmp_path / f"{layout}.safetensors"
    save_lora_file(path, random_lora(specs), layout)
    written = safetensors.torch.load_file(path)
    state_dict, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(path))
    assert len(state_dict) + len(alphas or {}) == len(written)
    assert all(k.startswith("unet.") for k in state_dict)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state_dict.items()})
    assert sorted(peft) == sorted(f"{n}.lora_{ab}.weight" for n in TARGETS for ab in "AB")


@pytest.mark.parametrize("layout", ["diffusers", "webui"])
def test_diffusers_loads_the_same_delta(tmp_path, unet, specs, layout):
    pytest.importorskip("peft")
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin as Loader

    # One alpha for all modules: diffusers 0.42 drops per-module webui alphas of attention layers.
    modules = random_lora(specs, [2.0] * len(TARGETS))
    path = tmp_path / f"{layout}.safetensors"
    save_lora_file(path, modules, layout)
    state_dict, alphas = Loader.lora_state_dict(str(path))
    wrapped = copy.deepcopy(unet)
    Loader.load_lora_into_unet(state_dict, alphas, wrapped)
    assert module_specs(wrapped) == specs
    for name, m in modules.items():
        layer = wrapped.get_submodule(name)
        (adapter,) = layer.scaling
        got = layer.scaling[adapter] * (
            layer.lora_B[adapter].weight.flatten(1).double() @ layer.lora_A[adapter].weight.flatten(1).double()
        )
        assert torch.allclose(got, delta(m), rtol=0, atol=1e-5), name
