"""Single-file SDXL checkpoints: the tiny model written with the original (SGM/LDM, OpenCLIP) key names loads
through diffusers' from_single_file, with the structure read from a weightless pipeline directory
(SPO_BASE_MODEL_CONFIG), and gives the same image as the diffusers directory it came from."""

from __future__ import annotations

import shutil

import pytest
import safetensors.torch
import torch

from conftest import max_pixel_diff
from spo_runtime import ModelLoadError, Settings, load_pipeline
from spo_runtime.model.tiny import TINY_LORA_WEBUI

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
             "conv_norm_out": "out.0", "conv_out": "out.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2"}


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_ldm(sd: dict, config) -> dict:
    lpb, step = config.layers_per_block, config.layers_per_block + 1
    has_attn = [t.startswith("CrossAttn") for t in config.up_block_types]
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        module, leaf = ".".join(p[:-1]), p[-1]
        if module in _UNET_TOP:
            new = f"{_UNET_TOP[module]}.{leaf}"
        elif p[0] == "mid_block":
            idx = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(p[1], p[2])]
            rest = ".".join(p[3:])
            new = f"middle_block.{idx}." + (_resnet(rest) if p[1] == "resnets" else rest)
        else:
            b, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
            if p[0] == "down_blocks":
                if kind == "downsamplers":
                    new = f"input_blocks.{(b + 1) * step}.0.op.{leaf}"
                else:
                    blk = 1 + b * step + j
                    new = f"input_blocks.{blk}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{blk}.1.{rest}"
            elif kind == "upsamplers":
                new = f"output_blocks.{b * step + lpb}.{2 if has_attn[b] else 1}.conv.{leaf}"
            else:
                blk = b * step + j
                new = f"output_blocks.{blk}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{blk}.1.{rest}"
        out["model.diffusion_model." + new] = v
    return out


def vae_to_ldm(sd: dict, config) -> dict:
    n_up = len(config.up_block_types)
    out = {}
    for k, v in sd.items():
        new = k.replace("conv_norm_out", "norm_out")
        p = new.split(".")
        if p[1] == "down_blocks":
            new = (f"encoder.down.{p[2]}.downsample.conv.{p[-1]}" if p[3] == "downsamplers"
                   else f"encoder.down.{p[2]}.block.{p[4]}." + ".".join(p[5:]))
        elif p[1] == "up_blocks":
            blk = n_up - 1 - int(p[2])
            new = (f"decoder.up.{blk}.upsample.conv.{p[-1]}" if p[3] == "upsamplers"
                   else f"decoder.up.{blk}.block.{p[4]}." + ".".join(p[5:]))
        elif p[1] == "mid_block" and p[2] == "resnets":
            new = f"{p[0]}.mid.block_{int(p[3]) + 1}." + ".".join(p[4:])
        elif p[1] == "mid_block":
            rest = ".".join(p[4:])
            rest = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[rest.rsplit(".", 1)[0]] + "." + p[-1]
            new = f"{p[0]}.mid.attn_1.{rest}"
            if v.ndim == 2:
                v = v[:, :, None, None]  # the original's 1x1 convolutions
        new = new.replace("conv_shortcut", "nin_shortcut")
        out["first_stage_model." + new] = v
    return out


def openclip_to_ldm(sd: dict, prefix: str) -> dict:
    out, qkv = {}, {}
    for k, v in sd.items():
        if k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
            continue
        k = k.removeprefix("text_model.")
        top = {"embeddings.token_embedding.weight": "token_embedding.weight",
               "embeddings.position_embedding.weight": "positional_embedding",
               "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
        if k in top:
            out[top[k]] = v
            continue
        k = (k.replace("encoder.layers.", "transformer.resblocks.").replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
             .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj").replace("self_attn", "attn"))
        for proj in ("q_proj", "k_proj", "v_proj"):
            if f"attn.{proj}." in k:
                base, leaf = k.split(f".{proj}.")
                qkv.setdefault((base, leaf), {})[proj] = v
                break
        else:
            out[k] = v
    for (base, leaf), parts in qkv.items():
        out[f"{base}.in_proj_{leaf}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return {prefix + k: v for k, v in out.items()}


def write_single_file(src_dir, path):
    from diffusers import StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline.from_pretrained(src_dir)
    sd = unet_to_ldm(p.unet.state_dict(), p.unet.config)
    sd.update(vae_to_ldm(p.vae.state_dict(), p.vae.config))
    # original names keep `text_model.` (recent transformers' CLIPTextModel drops it from its own names)
    sd.update({"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
               for k, v in p.text_encoder.state_dict().items()})
    sd.update(openclip_to_ldm(p.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return sd


@pytest.fixture(scope="module")
def single(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    sd = write_single_file(tiny_dir, d / "tiny_sdxl.safetensors")
    config = d / "config"  # the pipeline directory without weights
    shutil.copytree(tiny_dir, config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert not list(config.rglob("*.safetensors"))
    return d / "tiny_sdxl.safetensors", config, sd


def test_single_file_gives_the_image_of_its_directory(tiny_dir, single):
    path, config, sd = single
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in sd)
    assert any(k.endswith("attn.in_proj_weight") for k in sd) and "first_stage_model.decoder.mid.attn_1.q.weight" in sd
    lora = str(tiny_dir / TINY_LORA_WEBUI)
    a = load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora=lora))
    b = load_pipeline(Settings(model="tiny", base_model=str(path), base_model_config=str(config), lora=lora))
    for name in ("unet", "vae"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    for ta, tb in zip(a.text_encoders, b.text_encoders):
        sa, sb = ta.state_dict(), tb.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    req = [dict(prompt="a watercolor fox in a snowy forest", seed=3, num_inference_steps=4, lora_scale=0.7)]
    assert max_pixel_diff(a.generate(req)[0].image, b.generate(req)[0].image) == 0
    assert b.info(show_paths=True)["sources"]["base"]["id"] == str(path)


def test_pickle_single_files_are_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ModelLoadError, match="pickle"):
        load_pipeline(Settings(model="tiny", base_model=str(path)))


def test_offline_without_config_says_which_variable_to_set(single, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, _, _ = single
    with pytest.raises(ModelLoadError, match="SPO_BASE_MODEL_CONFIG"):
        load_pipeline(Settings(model="tiny", base_model=str(path)))
