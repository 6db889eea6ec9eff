"""LoRA layouts people already have, read through diffusers' public converter: kohya with SGM block names
(tiny model, and the full SDXL UNet on the meta device), text-encoder parts applied per request (oracle:
diffusers' load_lora_weights + set_adapters), PEFT names, and the layouts we refuse."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import safetensors.torch
import torch

from conftest import max_pixel_diff
from spo_runtime import LoraFormatError, Settings, load_pipeline
from spo_runtime.lora.format import LoraFile, LoraModuleWeights, lora_state_dict, module_specs, module_specs_of, parse_lora_state_dict

PROMPT = "a portrait of an astronaut, cinematic lighting"
_RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "conv_shortcut": "skip_connection", "time_emb_proj": "emb_layers.1"}


def sgm_kohya_prefix(module: str, layers_per_block: int) -> str:
    """The kohya name of UNet layer `module` with SGM (LDM) block names, as kohya's SDXL trainer writes it."""
    p = module.split(".")
    step = layers_per_block + 1
    if p[0] == "mid_block":
        head, rest = f"middle_block.{ {('resnets', '0'): 0, ('attentions', '0'): 1, ('resnets', '1'): 2}[(p[1], p[2])] }", p[3:]
    else:
        b, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
        if p[0] == "down_blocks":
            if kind == "downsamplers":
                head, rest = f"input_blocks.{(b + 1) * step}.0", ["op"]
            else:
                head = f"input_blocks.{1 + b * step + j}.{ {'resnets': 0, 'attentions': 1}[kind] }"
        else:
            if kind == "upsamplers":
                head = f"output_blocks.{b * step + layers_per_block}.2"
            else:
                head = f"output_blocks.{b * step + j}.{ {'resnets': 0, 'attentions': 1}[kind] }"
    if "resnets" in module and rest and rest[0] in _RESNET_SGM:
        rest = [_RESNET_SGM[rest[0]]] + rest[1:]
    return "lora_unet_" + ".".join([head, *rest]).replace(".", "_")


def to_sgm(webui: dict[str, torch.Tensor], unet_modules: list[str], layers_per_block: int) -> dict[str, torch.Tensor]:
    rename = {"lora_unet_" + m.replace(".", "_"): sgm_kohya_prefix(m, layers_per_block) for m in unet_modules}
    out = {}
    for k, v in webui.items():
        name, _, suffix = k.partition(".")
        out[f"{rename.get(name, name)}.{suffix}"] = v
    return out


def random_modules(model_specs: dict, chosen: list[str], rank: int = 4, alpha: float = 2.0, seed: int = 0, gain: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in chosen:
        s = model_specs[m]
        k = s.kernel_size if s.kind == "conv" else ()
        fan_in = s.in_features * (k[0] * k[1] if k else 1)
        down = torch.randn(rank, s.in_features, *k, generator=g) / fan_in**0.5
        up = torch.randn(s.out_features, rank, *((1, 1) if k else ()), generator=g) * (gain / rank**0.5)
        out[m] = LoraModuleWeights(m, down, up, alpha)
    return out


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return load_pipeline(Settings(model="tiny", base_model=str(tiny_dir)))


def diffusers_image(dp, path, adapter, scale, seed, prompt=PROMPT, steps=4):
    if adapter not in dp.get_list_adapters().get("unet", []):
        dp.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
    dp.set_adapters([adapter], adapter_weights=[scale])
    return dp(prompt, num_inference_steps=steps, height=64, width=64, generator=torch.Generator().manual_seed(seed)).images[0]


def restore(dp, *adapters):
    for a in adapters:
        dp.delete_adapters(a)
    dp.set_adapters(["spo"], adapter_weights=[1.0])


# -- kohya with SGM block names ------------------------------------------------------------------


def test_kohya_sgm_tiny_matches_diffusers_and_webui(ours, diffusers_pipe, tmp_path):
    specs = module_specs(ours.unet)
    chosen = [m for m in specs if m.endswith(("to_q", "to_k", "to_v", "to_out.0", "resnets.0.conv1", "resnets.0.conv2",
                                              "downsamplers.0.conv", "upsamplers.0.conv", "ff.net.2"))]
    modules = random_modules(specs, chosen, alpha=2.0, seed=3, gain=0.5)
    webui = lora_state_dict(modules, "webui")
    sgm = to_sgm(webui, chosen, ours.unet.config.layers_per_block)
    assert any(k.startswith("lora_unet_input_blocks_") for k in sgm) and any("output_blocks" in k for k in sgm)
    assert any("_in_layers_2." in k for k in sgm) and any("_op." in k for k in sgm)
    path = tmp_path / "kohya_sgm.safetensors"
    safetensors.torch.save_file(sgm, path)
    safetensors.torch.save_file(webui, tmp_path / "kohya.safetensors")
    a = ours.load_adapter("sgm", path)
    b = ours.load_adapter("kohya", tmp_path / "kohya.safetensors")
    assert a.layout == "webui-sgm" and b.layout == "webui" and a.modules == b.modules == sorted(chosen)
    for m, down, up in ours.registry.tensors("sgm"):
        assert torch.equal(down, modules[m].down) and torch.allclose(up, modules[m].up * 0.5)
    img = ours.generate([dict(prompt=PROMPT, seed=5, num_inference_steps=4, adapter="sgm", lora_scale=0.8)])[0]
    try:
        ref = diffusers_image(diffusers_pipe, path, "sgm", 0.8, 5)
    finally:
        restore(diffusers_pipe, "sgm")
    assert max_pixel_diff(img.image, ref) <= 1
    base = ours.generate([dict(prompt=PROMPT, seed=5, num_inference_steps=4, adapter="sgm", lora_scale=0.0)])[0]
    assert max_pixel_diff(img.image, base.image) > 10  # the comparison is not vacuous


@pytest.fixture(scope="module")
def sdxl_meta():
    """The full SDXL UNet on the meta device: its structure, no memory."""
    from diffusers import UNet2DConditionModel

    config = json.loads(resources.files("spo_runtime").joinpath("configs", "unet.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return unet


def spo_webui_meta(unet) -> tuple[dict[str, torch.Tensor], list[str]]:
    """SPO's layers (to_q/k/v/out.0 of every attention) at rank 64 as a webui file: meta weights, real alphas."""
    specs = module_specs(unet)
    chosen = [m for m in specs if (".attn1." in m or ".attn2." in m) and m.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    modules = {}
    for m in chosen:
        s = specs[m]
        modules[m] = LoraModuleWeights(m, torch.empty(64, s.in_features, device="meta"),
                                       torch.empty(s.out_features, 64, device="meta"), 32.0)
    return lora_state_dict(modules, "webui"), chosen


def test_full_sdxl_spo_webui_and_sgm_files_map_every_key(sdxl_meta):
    webui, chosen = spo_webui_meta(sdxl_meta)
    assert len(webui) == 1680 and len(chosen) == 560
    assert all(webui[k].device.type == "cpu" for k in webui if k.endswith(".alpha"))
    sgm = to_sgm(webui, chosen, sdxl_meta.config.layers_per_block)
    assert len(sgm) == 1680 and not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in sgm)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in sgm
    assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0.alpha" in sgm
    specs = module_specs(sdxl_meta)
    layout_w, mw = parse_lora_state_dict(webui, specs, sdxl_meta.config)
    layout_s, ms = parse_lora_state_dict(sgm, specs, sdxl_meta.config)
    assert (layout_w, layout_s) == ("webui", "webui-sgm")
    assert list(mw) == list(ms) and sorted(ms) == sorted(chosen)
    for m in chosen:  # the same tensors reached the same layers, alpha read from the file
        assert ms[m].down is sgm[sgm_kohya_prefix(m, 2) + ".lora_down.weight"]
        assert ms[m].down is mw[m].down and ms[m].alpha == mw[m].alpha == 32.0 and ms[m].rank == 64
    with pytest.raises(LoraFormatError, match="SGM block names need the UNet's config"):
        parse_lora_state_dict(sgm, specs)
    # one SGM key in a file of diffusers block names: diffusers would drop it silently; we refuse by name
    key = next(iter(sgm))
    mixed = {**webui, **{k: v for k, v in sgm.items() if k.split(".")[0] == key.split(".")[0]}}
    with pytest.raises(LoraFormatError) as e:
        parse_lora_state_dict(mixed, specs, sdxl_meta.config)
    assert key in e.value.keys and "mixed block names" in str(e.value)


# -- text-encoder parts ---------------------------------------------------------------------------


def te_lora_file(pipe, tmp_path, layout="webui"):
    specs = module_specs_of(pipe.unet, pipe.registry.text_encoders)
    unet_part = [m for m in specs if not m.startswith("text_encoder") and m.endswith(("attn2.to_k", "attn2.to_v", "ff.net.2"))]
    te_part = [m for m in specs if m.startswith(("text_encoder.", "text_encoder_2.")) and
               m.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))]
    assert {m.split(".")[0] for m in te_part} == {"text_encoder", "text_encoder_2"}
    modules = random_modules(specs, unet_part + te_part, alpha=2.0, seed=11, gain=1.5)
    path = tmp_path / f"te_{layout}.safetensors"
    safetensors.torch.save_file(lora_state_dict(modules, layout), path)
    return path, modules


def test_text_encoder_lora_per_request_matches_diffusers(ours, diffusers_pipe, tmp_path):
    path, modules = te_lora_file(ours, tmp_path)
    keys = safetensors.torch.load_file(path)
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    a = ours.load_adapter("te", path)
    info = a.info()
    assert info["text_encoder"] and info["text_encoder_layers"] == 24 and info["unet_layers"] == len(modules) - 24
    reqs = [dict(prompt=PROMPT, seed=7, num_inference_steps=4, adapter="te", lora_scale=s) for s in (0.6, 1.3)]
    reqs.append(dict(prompt=PROMPT, seed=7, num_inference_steps=4, adapter="spo", lora_scale=1.0))
    batch = ours.generate(reqs)
    assert ours.last_step.rows == 3  # one UNet call for the three rows
    sha = a.sha256
    cache = ours.prompts._cache
    assert (PROMPT, "te", sha, 0.6) in cache and (PROMPT, "te", sha, 1.3) in cache and PROMPT in cache
    try:
        refs = [diffusers_image(diffusers_pipe, path, "te", s, 7) for s in (0.6, 1.3)]
    finally:
        restore(diffusers_pipe, "te")
    refs.append(diffusers_pipe(PROMPT, num_inference_steps=4, height=64, width=64, generator=torch.Generator().manual_seed(7)).images[0])
    diffs = [max_pixel_diff(img.image, ref) for img, ref in zip(batch, refs)]
    print("text-encoder LoRA vs diffusers, max pixel diff:", diffs)
    assert max(diffs) <= 1
    # the text-encoder part matters: the same file without it gives another image
    unet_only = {m: w for m, w in modules.items() if not m.startswith("text_encoder")}
    ours.load_adapter("te_unet_only", LoraFile("webui", unet_only))
    other = ours.generate([dict(reqs[0], adapter="te_unet_only")])[0]
    assert max_pixel_diff(other.image, batch[0].image) > 5
    # diffusers-layout (PEFT names for the text encoders) of the same weights: the same images
    dpath, _ = te_lora_file(ours, tmp_path, layout="diffusers")
    assert any(k.startswith("text_encoder_2.") and k.endswith("lora_A.weight") for k in safetensors.torch.load_file(dpath))
    ours.load_adapter("te_peft", dpath)
    again = ours.generate([dict(r, adapter="te_peft") for r in reqs[:2]])
    assert all(max_pixel_diff(x.image, y.image) <= 1 for x, y in zip(again, batch))
    # unloading forgets the embeddings made with the adapter's text-encoder layers
    ours.unload_adapter("te")
    assert not any(isinstance(k, tuple) and k[1] == "te" for k in ours.prompts._cache)
    for name in ("te_unet_only", "te_peft"):
        ours.unload_adapter(name)


# -- refused layouts ------------------------------------------------------------------------------

_Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
REFUSED = {
    "LoHa": {f"{_Q}.hada_w1_a": torch.zeros(4, 64), f"{_Q}.hada_w1_b": torch.zeros(4, 64), f"{_Q}.alpha": torch.tensor(4.0)},
    "LoKr": {f"{_Q}.lokr_w1": torch.zeros(8, 8), f"{_Q}.lokr_w2": torch.zeros(8, 8)},
    "DoRA": {f"{_Q}.lora_down.weight": torch.zeros(4, 64), f"{_Q}.lora_up.weight": torch.zeros(64, 4),
             f"{_Q}.alpha": torch.tensor(4.0), f"{_Q}.dora_scale": torch.ones(1, 64)},
    "full-weight": {f"{_Q}.diff": torch.zeros(64, 64)},
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_layouts_are_refused_naming_format_and_key(ours, tmp_path, name):
    sd = REFUSED[name]
    path = tmp_path / f"{name}.safetensors"
    safetensors.torch.save_file(sd, path)
    before = dict(ours.registry.adapters)
    with pytest.raises(LoraFormatError, match=name) as e:
        ours.load_adapter("refused", path)
    assert e.value.keys and e.value.keys[0] in sd and e.value.keys[0] in str(e.value)
    assert ours.registry.adapters == before


def test_admin_listing_reports_layout_text_encoder_parts_and_layers(ours, tmp_path):
    import json
    from types import SimpleNamespace

    import anyio

    from service.admin import list_adapters

    path, modules = te_lora_file(ours, tmp_path)
    ours.load_adapter("listed", path)
    try:
        # the handler under the admin wrapper (auth and readiness are tested with the service)
        handler = next(c.cell_contents for c in list_adapters.__closure__ if callable(c.cell_contents))
        response = anyio.run(handler, SimpleNamespace(pipe=ours), None)
    finally:
        ours.unload_adapter("listed")
    listed = {a["name"]: a for a in json.loads(response.body)["adapters"]}
    a, spo = listed["listed"], listed["spo"]
    assert (a["layout"], a["text_encoder"], a["rank"]) == ("webui", True, 4)
    assert (a["unet_layers"], a["text_encoder_layers"]) == (len(modules) - 24, 24)
    assert a["layers_by_part"] == {"unet": len(modules) - 24, "text_encoder": 12, "text_encoder_2": 12}
    assert a["memory_bytes"] == sum(4 * (m.down.numel() + m.up.numel()) for m in modules.values())
    import hashlib

    assert a["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and a["file_state"]
    assert (spo["text_encoder"], spo["text_encoder_layers"], spo["unet_layers"]) == (False, 0, 64)
