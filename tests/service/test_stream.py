"""img2img and streamed progress over HTTP against the real `bentoml serve`, read with a real SSE client
(httpx-sse): events in order, one step per step, the done image equal to /generate's, previews, a client
that disconnects freeing its slot, and img2img's body limit. The server is tests/server.py's standard one
(generation requests carry its API token)."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from httpx_sse import connect_sse
from PIL import Image

from conftest import pixels
from server import API_AUTH

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(standard_server):
    return standard_server


def stream(server, body, read_steps=None):
    """(events as (type, data)) of one /generate/stream call; stop after `read_steps` step events."""
    out = []
    with httpx.Client(base_url=server.url, headers=API_AUTH, timeout=120) as client:
        with connect_sse(client, "POST", "/generate/stream", json=body) as source:
            assert source.response.status_code == 200
            assert source.response.headers["content-type"].startswith("text/event-stream")
            for sse in source.iter_sse():
                out.append((sse.event, json.loads(sse.data)))
                if read_steps is not None and sum(e == "step" for e, _ in out) >= read_steps:
                    break
    return out


def init_png(w=72, h=64, seed=0) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("extra,steps_run", [({}, 5), ({"init_image": "IMG", "strength": 0.6}, 3)])
def test_events_in_order_and_done_equals_generate(server, extra, steps_run):
    body = {"prompt": "a lighthouse at dusk", "seed": 21, "num_inference_steps": 5, **extra}
    if "init_image" in body:
        body["init_image"] = init_png()
    events = stream(server, body)
    kinds = [e for e, _ in events]
    assert kinds == ["queued"] + ["step"] * steps_run + ["done"], kinds
    assert events[0][1]["position"] >= 0
    steps = [d for e, d in events if e == "step"]
    assert [(d["i"], d["n"]) for d in steps] == [(i, steps_run) for i in range(1, steps_run + 1)]
    assert steps[-1]["eta_s"] == 0 and all(d["eta_s"] >= 0 for d in steps) and "preview" not in steps[0]
    done = events[-1][1]
    assert done["seed"] == 21 and done["format"] == "png" and done["request_id"] == events[0][1]["request_id"]
    direct = httpx.post(server.url + "/generate", json=body, headers=API_AUTH, timeout=120)
    assert direct.status_code == 200 and direct.headers["x-seed"] == "21"
    assert np.array_equal(pixels(base64.b64decode(done["image"])), pixels(direct.content))
    assert done["lora_scale"] == float(direct.headers["x-lora-scale"]) and done["adapter"] == direct.headers["x-adapter"]


def test_previews_are_small_pngs_of_the_latent(server):
    events = stream(server, {"prompt": "a red apple", "seed": 3, "num_inference_steps": 3, "preview": True,
                             "width": 96, "height": 64})
    previews = [Image.open(io.BytesIO(base64.b64decode(d["preview"]))) for e, d in events if e == "step"]
    assert len(previews) == 3 and all(p.size == (12, 8) and p.mode == "RGB" for p in previews)  # latent: 1/8


def test_closing_the_stream_frees_its_slot(server):
    def disconnected():
        return server.metrics().get('spo_rejected_total{reason="disconnected"}', 0)

    before = disconnected()
    events = stream(server, {"prompt": "a long one", "seed": 1, "num_inference_steps": 100}, read_steps=2)
    assert [e for e, _ in events] == ["queued", "step", "step"]
    t0 = time.time()
    while time.time() - t0 < 20:
        engine = httpx.get(server.url + "/info", timeout=10).json()["engine"]
        if engine["running"] == 0 and engine["waiting"] == 0 and disconnected() == before + 1:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the slot was not freed: {engine}, disconnected {disconnected()} (before {before})")
    metrics = server.metrics()
    assert metrics["spo_running_images"] == 0 and metrics["spo_queue_depth"] == 0


def test_errors_before_the_stream_are_http_errors(server):
    r = httpx.post(server.url + "/generate/stream", json={"prompt": "a", "num_inference_steps": 0}, headers=API_AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["num_inference_steps"]
    r = httpx.post(server.url + "/generate/stream", json={"prompt": "a", "adapter": "nope"}, headers=API_AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["adapter"]
    doc = httpx.get(server.url + "/docs.json", timeout=30).json()
    props = doc["paths"]["/generate/stream"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert props["preview"]["type"] == "boolean" and props["num_inference_steps"]["maximum"] == 100


def test_img2img_body_limits_and_bad_images(server):
    big_image = init_png(256, 256, seed=1)  # ~260 KB of PNG: over 64 KiB, under SPO_MAX_IMAGE_BYTES
    assert len(big_image) > 64 * 1024
    r = httpx.post(server.url + "/generate", json={"prompt": "a", "num_inference_steps": 2, "init_image": big_image,
                                                   "strength": 0.5}, headers=API_AUTH, timeout=120)
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (256, 256)
    assert "Denoising strength: 0.5" in Image.open(io.BytesIO(r.content)).info["parameters"]
    r = httpx.post(server.url + "/generate", json={"prompt": "a" * 10, "negative_prompt": "b" * 4000,
                                                   "adapter": None, "extra_padding": "x" * 70000}, headers=API_AUTH, timeout=30)
    assert r.status_code == 400  # unknown field, but first: the body is over 64 KiB without init_image
    assert "without init_image" in r.json()["error"]
    for bad, needle in [("%%%", "base64"), (base64.b64encode(b"not an image").decode(), "decodable")]:
        r = httpx.post(server.url + "/generate", json={"prompt": "a", "init_image": bad}, headers=API_AUTH, timeout=30)
        assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["init_image"] and needle in r.text
    r = httpx.post(server.url + "/generate", json={"prompt": "a", "init_image": init_png(600, 64)}, headers=API_AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["init_image"] and "32..256" in r.text
