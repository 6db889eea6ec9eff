"""The AUTOMATIC1111 API against the real `bentoml serve`, spoken by `webuiapi` (pinned in requirements.txt,
used unchanged, with HTTP Basic auth as A1111's --api-auth): txt2img with `<lora:spo:0.6>` equals /generate
with adapter spo at scale 0.6, img2img equals /generate's img2img, the answer's info and PNG chunk, the
refusals that name the field, the listing routes, progress and interrupt. The server is tests/server.py's
standard one."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from conftest import pixels
from server import ADMIN_TOKEN, API_TOKEN

TOKEN = API_TOKEN
ADMIN = ADMIN_TOKEN
BASIC = ("any-user", TOKEN)


@pytest.fixture(scope="module")
def server(standard_server):
    return standard_server


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(baseurl=server.url + "/sdapi/v1", sampler="DDIM", steps=3, username=BASIC[0],
                             password=BASIC[1])


def generate(server, **body) -> bytes:
    r = httpx.post(server.url + "/generate", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.content


@pytest.mark.server
def test_txt2img_with_a_lora_tag_equals_generate(server, api):
    result = api.txt2img(prompt="a castle at dusk <lora:spo:0.6>", negative_prompt="", seed=40, steps=3, cfg_scale=6,
                         width=64, height=64, eta=0, batch_size=2)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    direct = generate(server, prompt="a castle at dusk", negative_prompt="", seed=40, num_inference_steps=3,
                      guidance_scale=6, width=64, height=64, adapter="spo", lora_scale=0.6)
    assert np.abs(pixels(result.images[0]) - pixels(direct)).max() <= 1
    info = result.info
    assert info["seed"] == 40 and info["all_seeds"] == [40, 41] and len(info["infotexts"]) == 2
    assert info["infotexts"][0].startswith("a castle at dusk <lora:spo:0.6>\nSteps: 3, Sampler: DDIM, CFG scale: 6, "
                                           "Seed: 40, Size: 64x64")
    assert 'Lora hashes: "spo: ' in info["infotexts"][0] and "Seed: 41" in info["infotexts"][1]
    raw = base64.b64decode(result.json["images"][0])
    assert Image.open(io.BytesIO(raw)).info["parameters"] == info["infotexts"][0]
    assert result.parameters["prompt"] == "a castle at dusk <lora:spo:0.6>"


@pytest.mark.server
def test_img2img_equals_generates_img2img(server, api):
    rng = np.random.default_rng(1)
    init = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
    result = api.img2img(images=[init], prompt="an oil painting", negative_prompt="", seed=7, steps=4, cfg_scale=5,
                         width=64, height=64, denoising_strength=0.5, sampler_name="Euler")
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    direct = generate(server, prompt="an oil painting", negative_prompt="", seed=7, num_inference_steps=4,
                      guidance_scale=5, width=64, height=64, scheduler="euler",
                      init_image=base64.b64encode(buf.getvalue()).decode(), strength=0.5)
    assert np.abs(pixels(result.images[0]) - pixels(direct)).max() <= 1
    assert "Sampler: Euler" in result.info["infotexts"][0] and "Denoising strength: 0.5" in result.info["infotexts"][0]


@pytest.mark.parametrize("body,field,needle", [
    ({"prompt": "a <lora:spo:0.5> <lora:other:1>"}, "prompt", "other, spo"),
    ({"enable_hr": True}, "enable_hr", "not supported"),
    ({"restore_faces": True}, "restore_faces", "not supported"),
    ({"subseed_strength": 0.3}, "subseed_strength", "not supported"),
    ({"sampler_name": "Euler a"}, "sampler_name", "DDIM, Euler, DPM++ 2M"),
    ({"sampler_name": "DPM++ 2M", "scheduler": "Exponential"}, "scheduler", "Karras"),
    ({"batch_size": 3, "n_iter": 3}, "batch_size", "1..8"),
    ({"width": 1024}, "width", "32..256"),
    ({"cfg_scale": 50}, "cfg_scale", "0..30"),  # our model's names are given back as A1111's
    ({"prompt": "a <lora:nope:0.5>"}, "prompt", "'nope' is not loaded"),
])
@pytest.mark.server
def test_refusals_name_the_field(server, body, field, needle):
    full = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "sampler_name": "DDIM", "enable_hr": False,
            "hr_scale": 2, "denoising_strength": 0.7, "tiling": False, **body}
    r = httpx.post(server.url + "/sdapi/v1/txt2img", json=full, auth=BASIC, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field and needle in r.json()["detail"], r.json()


@pytest.mark.server
def test_auth_listings_progress_and_interrupt(server, api):
    r = httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "a"}, timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic"
    assert httpx.get(server.url + "/sdapi/v1/samplers", auth=("u", "wrong"), timeout=30).status_code == 401
    assert [s["name"] for s in api.get_samplers()] == ["DDIM", "Euler", "DPM++ 2M"]
    assert api.get_sd_models()[0]["model_name"] == "tiny"
    assert [lo["name"] for lo in api.get_loras()] == ["spo"]
    assert api.get_options()["sd_model_checkpoint"].startswith("tiny")
    assert api.get_progress()["progress"] == 0
    answers = []
    slow = threading.Thread(target=lambda: answers.append(httpx.post(
        server.url + "/sdapi/v1/txt2img", auth=BASIC, timeout=120,
        json={"prompt": "a slow one", "steps": 100, "width": 64, "height": 64, "sampler_name": "DDIM"})))
    slow.start()
    t0 = time.time()
    while time.time() - t0 < 60:
        p = api.get_progress()
        if p["progress"] > 0:
            break
        time.sleep(0.05)
    assert 0 < p["progress"] < 1 and p["state"]["sampling_steps"] == 100 and p["eta_relative"] > 0
    assert httpx.post(server.url + "/sdapi/v1/interrupt", auth=BASIC, timeout=30).status_code == 401  # admin only
    r = httpx.post(server.url + "/sdapi/v1/interrupt", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 200 and r.json()["interrupted"]
    slow.join(60)
    assert answers and answers[0].status_code == 499 and "cancelled" in answers[0].json()["detail"]
    assert json.loads(json.dumps(api.get_progress()))["progress"] == 0


def test_lora_tags_and_samplers_without_a_server():
    from service.a1111 import sampler, split_lora
    from spo_runtime.errors import InvalidRequestError

    assert split_lora("a fox <lora:spo:0.6>") == ("a fox", "spo", 0.6)
    assert split_lora("<lora:spo> a fox, <lora:spo:1>") == ("a fox,", "spo", 1.0)  # the same tag twice
    assert split_lora("a fox") == ("a fox", None, None)
    for bad in ("<lora:spo:0.5> <lora:spo:0.7> x", "<lora:spo:high> x", "<lora:spo:0.5:te=1> x"):
        with pytest.raises(InvalidRequestError):
            split_lora(bad)
    assert sampler({"sampler_name": "DPM++ 2M", "scheduler": "automatic"}) == "dpmpp_2m_karras"
    assert sampler({"sampler_name": "DPM++ 2M Karras"}) == "dpmpp_2m_karras"
    assert sampler({"sampler_index": "Euler"}) == "euler"
    assert sampler({"sampler_name": "DDIM", "sampler_index": "Euler a"}) == "ddim"  # sampler_index: ignored
    with pytest.raises(InvalidRequestError):
        sampler({"sampler_name": "DDIM", "scheduler": "Karras"})


def test_every_field_of_the_wrong_type_is_a_400_naming_it_without_a_server():
    """Each A1111 field with values of every JSON type (and NaN, Infinity, huge numbers): parse accepts the
    value or raises InvalidRequestError naming that field (or its item), never another exception."""
    import itertools
    from types import SimpleNamespace

    from service.a1111 import parse
    from service.schemas import A1111Body
    from spo_runtime.errors import InvalidRequestError

    pipe = SimpleNamespace(preset=SimpleNamespace(default_size=64, name="tiny"), default_adapter="spo",
                           registry=SimpleNamespace(adapters={}), info=lambda: {"sources": {}})
    svc = SimpleNamespace(pipe=pipe)
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()  # a type-correct string; its bytes are checked later
    values = [None, [], {}, "", "x", "20", 0, 1, -1, 1.5, 2.0, float("nan"), float("inf"), True, False, 10**30, 1e308,
              ["DDIM"], {"x": 1}, [None]]
    typed_refusals = 0
    for field, value in itertools.product([*A1111Body.model_fields, "not_a1111", "hr_foo"], values):
        body = {"prompt": "a fox", "steps": 2, "init_images": [png], field: value}
        try:
            parse(body, svc, img2img=False)
        except InvalidRequestError as e:
            renamed = {"n_iter": "batch_size"}.get(field)  # batch_size x n_iter over 8 names batch_size
            assert e.field == field or e.field.startswith(f"{field}.") or e.field == renamed, (field, value, e.field)
            typed_refusals += e.message.startswith("must be")
    assert typed_refusals > 500
