"""LoRA files users have, through `/admin/adapters/load` of the real `bentoml serve` (the standard server of
tests/server.py): the file of the report behind issue 25 (the tiny model's webui LoRA plus kohya q/k/v/out
keys of both text encoders, with `.alpha`; diffusers loads it, we answered 400) loads, `/admin/adapters`
counts its layers per part, and its images at two scales equal diffusers' within 1/255. A file diffusers
refuses, and one whose keys target no layer of the model, are 400s naming the file and a key of it.
The layout matrix itself runs in process (tests/lora/test_lora_parity.py)."""

from __future__ import annotations

import httpx
import pytest
import safetensors.torch
import torch

from conftest import kohya_text_encoder_lora, max_pixel_diff, reported_lora
from server import ADMIN_AUTH, API_AUTH

pytestmark = pytest.mark.server
PROMPT = "a portrait of an astronaut, cinematic lighting"
SCALES = (0.6, 1.4)


def load(server, name: str, file: str) -> httpx.Response:
    return httpx.post(server.url + "/admin/adapters/load", json={"name": name, "file": file}, headers=ADMIN_AUTH,
                      timeout=60)


def listed(server) -> dict:
    r = httpx.get(server.url + "/admin/adapters", headers=ADMIN_AUTH)
    assert r.status_code == 200, r.text
    return {a["name"]: a for a in r.json()["adapters"]}


def test_the_reported_file_loads_counts_its_parts_and_draws_diffusers_images(standard_server, adapter_dir, pipe,
                                                                             diffusers_pipe, tiny_dir):
    sd, te_deltas = reported_lora(tiny_dir, pipe.registry.text_encoders)
    file = "reported_webui_kohya_te.safetensors"
    safetensors.torch.save_file(sd, adapter_dir / file)
    per_part = {p: sum(m.split(".")[0] == p for m in te_deltas) for p in ("text_encoder", "text_encoder_2")}
    unet = len([k for k in sd if k.startswith("lora_unet_") and k.endswith(".lora_down.weight")])
    expected = {"unet": unet, **per_part}
    assert unet == 64 and per_part["text_encoder"] > 0 and per_part["text_encoder_2"] > 0

    r = load(standard_server, "reported", file)
    assert r.status_code == 200, r.text
    try:
        assert r.json()["layers_by_part"] == expected and r.json()["layout"] == "webui"
        assert listed(standard_server)["reported"]["layers_by_part"] == expected
        assert listed(standard_server)["spo"]["layers_by_part"] == {"unet": 64, "text_encoder": 0, "text_encoder_2": 0}

        dp = diffusers_pipe
        dp.load_lora_weights(str(adapter_dir), weight_name=file, adapter_name="reported")
        try:
            refs = []
            for s in SCALES:
                dp.set_adapters(["reported"], adapter_weights=[s])
                refs.append(dp(PROMPT, num_inference_steps=2, height=64, width=64,
                               generator=torch.Generator().manual_seed(11)).images[0])
        finally:
            dp.delete_adapters("reported")
            dp.set_adapters(["spo"], adapter_weights=[1.0])
        for s, ref in zip(SCALES, refs):
            body = dict(prompt=PROMPT, seed=11, num_inference_steps=2, adapter="reported", lora_scale=s)
            got = httpx.post(standard_server.url + "/generate", json=body, headers=API_AUTH, timeout=120)
            assert got.status_code == 200 and got.headers["x-adapter"] == "reported", got.text
            assert max_pixel_diff(got.content, ref) <= 1, s
        assert max_pixel_diff(refs[0], refs[1]) > 5  # the scale changes the image: not vacuous
    finally:
        r = httpx.post(standard_server.url + "/admin/adapters/unload", json={"name": "reported"}, headers=ADMIN_AUTH,
                       timeout=60)
        assert r.status_code == 200, r.text


def refused(server, name: str, file: str) -> str:
    r = load(server, name, file)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["detail"][0]["loc"] == ["file"] and file in body["error"], body
    assert name not in listed(server)
    return body["error"]


def test_files_diffusers_refuses_or_that_target_nothing_are_400_naming_the_file_and_a_key(standard_server, adapter_dir,
                                                                                        pipe):
    # kohya q/k/v without out_proj: diffusers' converter cannot classify the text-encoder part and refuses the file
    sd, _ = kohya_text_encoder_lora(pipe.registry.text_encoders, leaves=("q_proj", "k_proj", "v_proj"))
    safetensors.torch.save_file(sd, adapter_dir / "qkv_only.safetensors")
    message = refused(standard_server, "qkv", "qkv_only.safetensors")
    assert "refused the file" in message and any(k in message for k in sd), message

    # an SD 1.5 kohya key: no layer of this UNet
    key = "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q"
    other = {f"{key}.lora_down.weight": torch.zeros(4, 320), f"{key}.lora_up.weight": torch.zeros(320, 4),
             f"{key}.alpha": torch.tensor(4.0)}
    safetensors.torch.save_file(other, adapter_dir / "sd15.safetensors")
    message = refused(standard_server, "sd15", "sd15.safetensors")
    assert "targets no layer of this model" in message and f"{key}.lora_down.weight" in message, message
