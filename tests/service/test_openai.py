"""The OpenAI Images API against the real `bentoml serve`, spoken by the `openai` SDK itself (pinned in
requirements.txt, used unchanged, `base_url` at the server's /v1): images decode, n and size hold, a bad
size is `openai.BadRequestError`, `url` results download (then expire), edits run img2img, the API key
is SPO_API_TOKEN, errors have OpenAI's shape. The server is tests/server.py's standard one."""

from __future__ import annotations

import base64
import io
import os
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from conftest import pixels
from server import API_TOKEN

TOKEN = API_TOKEN
FAST = {"num_inference_steps": 3}  # ours, through the SDK's extra_body


@pytest.fixture(scope="module")
def server(standard_server):
    return standard_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=120)


def generate(server, **body) -> bytes:
    r = httpx.post(server.url + "/generate", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.content


@pytest.mark.server
def test_generations_n_size_and_the_served_model(server, client):
    resp = client.images.generate(model="dall-e-3", prompt="a red fox", n=2, size="64x32", quality="hd",
                                  style="vivid", user="tester", extra_body={"seed": 11, **FAST})
    assert len(resp.data) == 2 and resp.data[0].url is None
    images = [base64.b64decode(d.b64_json) for d in resp.data]
    assert all(Image.open(io.BytesIO(b)).size == (64, 32) for b in images)
    direct = generate(server, prompt="a red fox", seed=12, width=64, height=32, **FAST)  # the second image's seed
    assert np.abs(pixels(images[1]) - pixels(direct)).max() <= 1
    assert [m.id for m in client.models.list()] == ["tiny"]
    paths = httpx.get(server.url + "/docs.json", timeout=30).json()["paths"]
    assert {"/v1/images/generations", "/v1/images/edits", "/sdapi/v1/txt2img", "/sdapi/v1/progress"} <= set(paths)


@pytest.mark.server
def test_bad_size_and_other_errors_in_openais_shape(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a fox", size="1024x1024")
    assert e.value.param == "size" and "32..256" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a fox", n=9)
    assert e.value.param == "n"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong-key", max_retries=0).images.generate(prompt="a")
    r = httpx.post(server.url + "/v1/images/generations", content=b"{not json", timeout=30,
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(server.url + "/v1/images/generations", timeout=30)  # the framework's 405, in OpenAI's shape
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.server
def test_url_results_download_then_expire(server, client):
    resp = client.images.generate(prompt="a blue bird", response_format="url", extra_body={"seed": 5, **FAST})
    url = resp.data[0].url  # relative without SPO_PUBLIC_URL: never the request's Host header
    assert url.startswith("/v1/images/files/") and len(url.rsplit("/", 1)[1]) == 32, url
    url = server.url + url
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert np.abs(pixels(r.content) - pixels(generate(server, prompt="a blue bird", seed=5, **FAST))).max() <= 1
    file = server.data / "openai_images" / url.rsplit("/", 1)[1]
    old = time.time() - 3601  # SPO_IMAGE_TTL_S's default: 3600
    os.utime(file, (old, old))
    gone = httpx.get(url, timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + "/v1/images/files/" + "0" * 32, timeout=30).status_code == 404


@pytest.mark.server
def test_edits_are_img2img_and_masks_are_refused(server, client):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    resp = client.images.edit(image=("in.png", png, "image/png"), prompt="a painting", size="64x64",
                              extra_body={"seed": 9, **FAST})
    edited = base64.b64decode(resp.data[0].b64_json)
    direct = generate(server, prompt="a painting", seed=9, init_image=base64.b64encode(png).decode(), strength=0.75,
                      width=64, height=64, **FAST)
    assert np.abs(pixels(edited) - pixels(direct)).max() <= 1
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=("in.png", png, "image/png"), mask=("m.png", png, "image/png"), prompt="a")
    assert e.value.param == "mask" and "masks are not supported" in e.value.message


# -- without a server ----------------------------------------------------------------------------


def test_public_url_and_the_disk_cap(tmp_path):
    from types import SimpleNamespace

    from service.openai_api import _sweep, public_base
    from spo_runtime.settings import Settings

    svc = SimpleNamespace(settings=Settings.from_env({"SPO_PUBLIC_URL": "https://images.example.com/spo/"}))
    assert public_base(svc) == "https://images.example.com/spo"
    assert public_base(SimpleNamespace(settings=Settings.from_env({}))) == ""  # unset: relative urls
    now = time.time()
    for i, age in enumerate([10, 20, 30, 4000]):  # the last one is past the TTL
        p = tmp_path / f"{i:032x}"
        p.write_bytes(b"x" * 1000)
        os.utime(p, (now - age, now - age))
    _sweep(tmp_path, ttl=3600, cap_bytes=2000)  # the oldest live one goes to fit the cap
    assert sorted(p.name[-1] for p in tmp_path.iterdir()) == ["0", "1"]
