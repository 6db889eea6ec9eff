"""End to end over HTTP against the real `bentoml serve` (tiny preset): the standard server of tests/server.py,
shared with other modules; generation requests carry its API token, admin requests its admin token."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from server import ADMIN_AUTH, ADMIN_TOKEN, API_AUTH, API_TOKEN, Server

pytestmark = pytest.mark.server
TOKEN = ADMIN_TOKEN
AUTH = ADMIN_AUTH


@pytest.fixture(scope="module")
def server(standard_server):
    return standard_server


def gen(server, timeout=120, **body):
    return httpx.post(server.url + "/generate", json=body, headers=API_AUTH, timeout=timeout)


def img(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.asarray(Image.open(io.BytesIO(resp.content)), dtype=np.int16)


def concurrently(fn, args_list):
    out = [None] * len(args_list)

    def run(i, a):
        out[i] = fn(*a)

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_readyz_was_not_ready_before_warmup(server):
    assert server.ready_history[-1] == 200
    assert any(code != 200 for code in server.ready_history), server.ready_history  # 503 or unanswered first
    assert httpx.get(server.url + "/livez").status_code == 200


def test_png_headers_and_parameters_chunk(server):
    r = gen(server, prompt="a watercolor fox", seed=42, num_inference_steps=4)
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "42" and r.headers["x-lora-scale"] == "1.0" and r.headers["x-adapter"] == "spo"
    assert len(r.headers["x-adapter-sha256"]) == 16 and r.headers["x-prompt-truncated"] == "false"
    assert float(r.headers["x-queue-ms"]) >= 0 and float(r.headers["x-inference-ms"]) > 0 and r.headers["x-request-id"]
    im = Image.open(io.BytesIO(r.content))
    assert im.size == (64, 64) and "Seed: 42" in im.text["parameters"]
    j = gen(server, prompt="a watercolor fox", seed=42, num_inference_steps=4, format="jpeg", quality=30)
    w = gen(server, prompt="a watercolor fox", seed=42, num_inference_steps=4, format="webp", quality=80)
    assert j.headers["content-type"] == "image/jpeg" and j.content[:2] == b"\xff\xd8"
    assert w.headers["content-type"] == "image/webp" and w.content[8:12] == b"WEBP"
    hi = gen(server, prompt="a watercolor fox", seed=42, num_inference_steps=4, format="jpeg", quality=95)
    assert len(hi.content) > len(j.content)  # our quality is honoured


def test_concurrent_requests_batch_and_equal_alone(server):
    before = server.metrics()
    bodies = [dict(prompt=f"a castle number {i}", seed=100 + i, num_inference_steps=s)
              for i, s in enumerate([6, 10, 14, 8, 12, 16, 7, 9])]
    together = concurrently(lambda b: gen(server, **b), [(b,) for b in bodies])
    after = server.metrics()
    steps = after["spo_batch_size_count"] - before.get("spo_batch_size_count", 0)
    images = after["spo_batch_size_sum"] - before.get("spo_batch_size_sum", 0)
    assert images / steps > 1.5, (images, steps)  # batch sizes above 1
    for b, r in zip(bodies, together):
        alone = gen(server, **b)
        assert np.abs(img(r) - img(alone)).max() <= 1


def test_late_request_finishes_before_the_long_batch(server):
    done = {}

    def long_one():
        r = gen(server, prompt="a long one", seed=1, num_inference_steps=100)
        done["long"] = time.time()
        return r

    t = threading.Thread(target=long_one)
    t.start()
    time.sleep(0.5)
    r = gen(server, prompt="a short one", seed=2, num_inference_steps=3)
    done["short"] = time.time()
    t.join()
    assert r.status_code == 200 and done["short"] < done["long"]


def load_conv(server):
    r = httpx.post(server.url + "/admin/adapters/load", json={"name": "conv", "file": "sub/conv.safetensors"}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r


def unload_conv(server):
    """Back to the standard server's state: spo the default adapter at scale 1.0, conv not loaded."""
    assert httpx.post(server.url + "/admin/default_adapter", json={"name": "spo"}, headers=AUTH).status_code == 200
    assert httpx.post(server.url + "/admin/lora_scale", json={"scale": 1.0}, headers=AUTH).status_code == 200
    r = httpx.post(server.url + "/admin/adapters/unload", json={"name": "conv"}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text


def test_mixed_scales_and_adapters_in_one_batch(server):
    r = load_conv(server)
    try:
        _mixed_scales_and_adapters(server, r)
    finally:
        unload_conv(server)


def _mixed_scales_and_adapters(server, r):
    from safetensors import safe_open

    with safe_open(str(server.env["SPO_ADAPTER_DIR"] + "/sub/conv.safetensors"), "pt") as f:
        assert r.json()["layers"] == len(list(f.keys())) // 2
    assert len(r.json()["sha256"]) == 64
    bodies = [dict(prompt="a red fox", seed=7, num_inference_steps=6, adapter=a, lora_scale=s)
              for a, s in [("spo", 0.0), ("spo", 0.5), ("spo", 1.5), ("conv", 1.0), ("conv", -0.7), ("spo", -1.0)]]
    together = concurrently(lambda b: gen(server, **b), [(b,) for b in bodies])
    for b, r in zip(bodies, together):
        assert r.headers["x-adapter"] == b["adapter"] and float(r.headers["x-lora-scale"]) == b["lora_scale"]
        assert np.abs(img(r) - img(gen(server, **b))).max() <= 1
    assert np.abs(img(together[0]) - img(together[2])).max() > 10
    listed = httpx.get(server.url + "/admin/adapters", headers=AUTH).json()
    assert {a["name"] for a in listed["adapters"]} == {"spo", "conv"}
    layers = {a["name"]: a["layers"] for a in listed["adapters"]}
    assert {a["name"]: a["layers_by_part"] for a in listed["adapters"]} == {
        n: {"unet": layers[n], "text_encoder": 0, "text_encoder_2": 0} for n in ("spo", "conv")} and layers["spo"] == 64


def test_scale_change_under_load(server):
    results = {}
    changed = threading.Event()

    def client(i):
        # keep sending until two requests went out after the change was acknowledged (bounded), so that
        # "late" requests exist however fast or slow the machine is
        out, after = [], 0
        for k in range(60):
            if k >= 4 and after >= 2:
                break
            t = time.time()
            after += changed.is_set()
            out.append((t, gen(server, prompt="a lighthouse", seed=11, num_inference_steps=5)))
        results[i] = out

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.6)
    r = httpx.post(server.url + "/admin/lora_scale", json={"scale": 0.3}, headers=AUTH)
    changed_at = time.time()
    changed.set()
    assert r.status_code == 200 and r.json()["previous"] == 1.0 and r.json()["scale"] == 0.3
    assert r.json()["swap_ms"] < 50
    for t in threads:
        t.join()
    try:
        responses = [resp for out in results.values() for _, resp in out]
        assert all(resp.status_code == 200 for resp in responses)
        scales = {resp.headers["x-lora-scale"] for resp in responses}
        assert scales == {"1.0", "0.3"}
        ref = {s: img(gen(server, prompt="a lighthouse", seed=11, num_inference_steps=5, lora_scale=float(s))) for s in scales}
        for resp in responses:
            assert np.abs(img(resp) - ref[resp.headers["x-lora-scale"]]).max() <= 1  # pixels carry the header's scale
        late = [resp for out in results.values() for t, resp in out if t > changed_at + 0.05]
        assert late and all(resp.headers["x-lora-scale"] == "0.3" for resp in late)
    finally:
        httpx.post(server.url + "/admin/lora_scale", json={"scale": 1.0}, headers=AUTH)


@pytest.mark.parametrize(
    "body,field",
    [
        ({"prompt": "x", "num_inference_steps": "abc"}, "num_inference_steps"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "scheduler": "plms"}, "scheduler"),
        ({"prompt": "x", "width": 1000}, "width"),
        ({"prompt": "x", "height": 65}, "height"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": 10000}, "num_inference_steps"),
        ({"prompt": "x", "guidance_scale": float("nan")}, "guidance_scale"),
        ({"prompt": "x", "lora_scale": 99}, "lora_scale"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "seed": -5}, "seed"),
        ({"prompt": "x", "adapter": "nope"}, "adapter"),
        ({"prompt": "x", "format": "gif"}, "format"),
        ({"prompt": "x", "quality": 0}, "quality"),
        ({"prompt": "x", "timeout_s": -1}, "timeout_s"),
        ({}, "prompt"),
    ],
)
def test_bad_input_is_400_naming_the_field(server, body, field):
    content = json.dumps(body, allow_nan=True)
    r = httpx.post(server.url + "/generate", content=content, headers={"content-type": "application/json", **API_AUTH})
    assert r.status_code == 400, (r.status_code, r.text)
    detail = r.json()
    assert any(d["loc"][-1] == field for d in detail["detail"]), detail


def test_oversized_body_and_batch_limits(server):
    r = httpx.post(server.url + "/generate", json={"prompt": "x" * 70000}, headers=API_AUTH)
    assert r.status_code == 400 and "65536 bytes" in r.json()["error"]
    r = httpx.post(server.url + "/generate_batch", json={"prompt": "x", "n": 9}, headers=API_AUTH)
    assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["n"]
    r = httpx.post(server.url + "/generate_batch", json={"prompt": "x", "n": 3, "seed": 2**32 - 2}, headers=API_AUTH)
    assert r.status_code == 400 and "seed" in r.json()["error"]


def test_generate_batch(server):
    r = httpx.post(server.url + "/generate_batch", json={"prompt": "an owl", "n": 3, "seed": 50, "num_inference_steps": 4},
                   headers=API_AUTH, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seeds"] == [50, 51, 52] and len(body["images"]) == 3
    import base64

    second = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][1]["image"]))), dtype=np.int16)
    assert np.abs(second - img(gen(server, prompt="an owl", seed=51, num_inference_steps=4))).max() <= 1


def test_queue_limit_gives_429_with_retry_after(server):
    """The queue is filled step by step, each step confirmed on /info, so the refusal does not depend on
    how fast threads start or how busy the machine is: a long batch of 8 holds the engine (max_batch 8),
    two batches of 8 fill the queue (max_queue 16), one more image is refused; then the holder hangs up,
    which frees the engine for the two queued batches."""
    before = server.metrics().get('spo_rejected_total{reason="queue_full"}', 0)

    async def go():
        async with httpx.AsyncClient(base_url=server.url, headers=API_AUTH, timeout=120) as client:
            async def wait_for(cond):
                for _ in range(1200):
                    engine = (await client.get("/info")).json()["engine"]
                    if cond(engine):
                        return
                    await asyncio.sleep(0.05)
                raise AssertionError(f"engine never reached the state: {engine}")

            # within the default SPO_MAX_QUEUE_COST ((16 + 8) x 40): 8 x 100 unguided steps (800) and 2 x 8 x 2 (32)
            holder = asyncio.ensure_future(client.post("/generate_batch", json=dict(
                prompt="q", seed=0, n=8, num_inference_steps=100, guidance_scale=1.0)))
            await wait_for(lambda e: e["running"] == 8)
            fillers = [asyncio.ensure_future(client.post("/generate_batch", json=dict(
                prompt="q", seed=10 * i, n=8, num_inference_steps=1))) for i in (1, 2)]
            await wait_for(lambda e: e["waiting"] == 16)
            engine = (await client.get("/info")).json()["engine"]
            r429 = await client.post("/generate", json=dict(prompt="one more", num_inference_steps=1))
            holder.cancel()
            return engine, r429, await asyncio.gather(*fillers)

    engine, r429, filled = asyncio.run(go())
    assert engine["max_queue_cost"] == 960 and 32 < engine["queue_cost"] <= 832, engine
    assert r429.status_code == 429, r429.text
    assert int(r429.headers["retry-after"]) >= 1 and "SPO_MAX_QUEUE" in r429.json()["error"]
    assert server.metrics()['spo_rejected_total{reason="queue_full"}'] == before + 1
    assert [r.status_code for r in filled] == [200, 200], [r.text[:200] for r in filled]


def test_client_disconnect_frees_its_slot(server):
    async def go():
        async with httpx.AsyncClient() as client:
            task = asyncio.ensure_future(client.post(server.url + "/generate", json={"prompt": "gone", "num_inference_steps": 100},
                                                     headers=API_AUTH, timeout=60))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    before = server.metrics().get('spo_rejected_total{reason="disconnected"}', 0)
    asyncio.run(go())
    t0 = time.time()
    while time.time() - t0 < 10:
        info = httpx.get(server.url + "/info").json()
        if info["engine"]["running"] == 0 and server.metrics().get('spo_rejected_total{reason="disconnected"}', 0) > before:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the disconnected request kept its slot")


def test_admin_needs_the_token_and_paths_stay_inside(server):
    assert httpx.post(server.url + "/admin/lora_scale", json={"scale": 0.5}).status_code == 401
    assert httpx.post(server.url + "/admin/lora_scale", json={"scale": 0.5}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server.url + "/admin/adapters").status_code == 401
    for bad in ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors", "tiny_webui.bin"]:
        r = httpx.post(server.url + "/admin/adapters/load", json={"name": "x", "file": bad}, headers=AUTH)
        assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["file"], (bad, r.text)
    r = httpx.post(server.url + "/admin/lora_scale", json={"scale": 5}, headers=AUTH)
    assert r.status_code == 400 and "-2.0..2.0" in r.text
    r = httpx.post(server.url + "/admin/adapters/unload", json={"name": "nope"}, headers=AUTH)
    assert r.status_code == 400
    adapter_dir = server.env["SPO_ADAPTER_DIR"]
    load_conv(server)  # an adapter loaded from a file under it: /info has a host path to show or hide
    try:
        public = httpx.get(server.url + "/info").text  # no host paths, host names or pids without the token
        assert adapter_dir not in public and '"pid"' not in public and '"host"' not in public, public
        full = httpx.get(server.url + "/info", headers=AUTH).text
        assert adapter_dir in full and '"pid"' in full and '"host"' in full, full
    finally:
        unload_conv(server)


def test_bentoml_clients_get_a_pil_image(server):
    import bentoml

    with bentoml.SyncHTTPClient(server.url, token=API_TOKEN) as client:
        im = client.generate(prompt="a cat", seed=3, num_inference_steps=3)
    assert isinstance(im, Image.Image) and im.size == (64, 64)

    async def go():
        async with bentoml.AsyncHTTPClient(server.url, token=API_TOKEN) as client:
            return await client.generate(prompt="a cat", seed=3, num_inference_steps=3)

    im2 = asyncio.run(go())
    assert np.abs(np.asarray(im, dtype=np.int16) - np.asarray(im2, dtype=np.int16)).max() == 0


def test_metrics_expose_every_series(server):
    key = 'spo_images_total{scheduler="ddim",size="64x64"}'
    short = 11 - int(server.metrics().get(key, 0))  # the tests before it made them; alone, it makes its own
    while short > 0:
        r = httpx.post(server.url + "/generate_batch", json={"prompt": "a count", "n": min(8, short), "num_inference_steps": 1},
                       headers=API_AUTH, timeout=60)
        assert r.status_code == 200, r.text
        short -= min(8, short)
    if not any(k.startswith("spo_rejected_total") for k in server.metrics()):  # and a refusal: its deadline
        r = gen(server, prompt="too slow", num_inference_steps=100, timeout_s=0.05)
        assert r.status_code == 504, r.text
    m = server.metrics()
    names = {k.split("{")[0] for k in m}
    for expected in ["spo_queue_depth", "spo_batch_size_count", "spo_step_seconds_count", "spo_queue_wait_seconds_count",
                     "spo_encode_seconds_count", "spo_denoise_seconds_count", "spo_decode_seconds_count", "spo_images_total",
                     "spo_rejected_total", "spo_default_lora_scale", "spo_adapters_loaded", "spo_adapter_memory_bytes",
                     "spo_queue_cost"]:
        assert expected in names, expected
    assert m['spo_images_total{scheduler="ddim",size="64x64"}'] > 10


def test_admin_state_survives_a_restart_with_two_workers(server, tmp_path):
    """A second server started on the admin state the first one recorded (2 workers, no SPO_ADMIN_TOKEN: the
    token file the two workers share) restores it. The first one, shared, serves on: its admin_state.json
    is copied to a fresh data directory, and its state put back afterwards."""
    load_conv(server)
    try:
        r = httpx.post(server.url + "/admin/lora_scale", json={"scale": 0.6}, headers=AUTH)
        assert r.status_code == 200
        r = httpx.post(server.url + "/admin/default_adapter", json={"name": "conv"}, headers=AUTH)
        assert r.status_code == 200
        with open(server.env["SPO_DATA_DIR"] + "/admin_state.json") as fh:
            recorded = json.load(fh)
        (tmp_path / "data").mkdir()
        shutil.copy(server.env["SPO_DATA_DIR"] + "/admin_state.json", tmp_path / "data" / "admin_state.json")
    finally:
        unload_conv(server)
    assert recorded["default_lora_scale"] == 0.6 and recorded["adapters"]["conv"]["file"] == "sub/conv.safetensors"
    env = {k: v for k, v in server.env.items() if k.startswith("SPO_") and k != "SPO_ADMIN_TOKEN"}
    env["SPO_WORKERS"] = "2"
    env["SPO_DATA_DIR"] = str(tmp_path / "data")
    with Server(env, tmp_path / "restart.log") as s2:
        # /readyz answered from one worker: the other may still be loading (and would answer 503)
        ready: set[int] = set()
        deadline = time.time() + 60
        while ready != {1, 2} and time.time() < deadline:
            body = httpx.get(s2.url + "/info", timeout=10).json()
            if body.get("ready"):
                ready.add(body["worker_index"])
            time.sleep(0.05)
        assert ready == {1, 2}, f"ready workers: {sorted(ready)}"
        r = gen(s2, prompt="a fox", seed=1, num_inference_steps=3)
        assert r.headers["x-adapter"] == "conv" and r.headers["x-lora-scale"] == "0.6"
        # without SPO_ADMIN_TOKEN, loopback is not trusted: the token is the one file both workers read
        assert httpx.post(s2.url + "/admin/lora_scale", json={"scale": 0.2}).status_code == 401
        with open(env["SPO_DATA_DIR"] + "/admin_token") as fh:
            file_auth = {"Authorization": f"Bearer {fh.read().strip()}"}
        # both workers converge at their next step boundary
        assert httpx.post(s2.url + "/admin/lora_scale", json={"scale": 0.2}, headers=file_auth).status_code == 200
        deadline = time.time() + 20
        while time.time() < deadline:
            for i in range(4):
                gen(s2, prompt="tick", seed=i, num_inference_steps=1)
            workers = httpx.get(s2.url + "/info").json()["workers"]
            if len(workers) == 2 and all(w["default_lora_scale"] == 0.2 for w in workers):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"workers did not converge: {workers}")
        m = s2.metrics()
        assert m["spo_default_lora_scale"] == 0.2
        assert sum(v for k, v in m.items() if k.startswith("spo_images_total")) >= 5  # summed over both workers


def test_an_unloaded_adapter_stays_unloaded(server):
    """An unload answered 200 holds from then on: the admin-state sync does not bring the adapter back from
    the record of its load (it did for up to a second when the engine had not polled since that record)."""
    for _ in range(2):
        r = httpx.post(server.url + "/admin/adapters/load", json={"name": "flicker", "file": "sub/conv.safetensors"},
                       headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        # at once, while the idle engine has not polled since the load's record landed
        r = httpx.post(server.url + "/admin/adapters/unload", json={"name": "flicker"}, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        seen = []
        for _ in range(15):
            seen.append([a["name"] for a in httpx.get(server.url + "/admin/adapters", headers=AUTH, timeout=10).json()["adapters"]])
            time.sleep(0.1)
        assert all("flicker" not in names for names in seen), seen
