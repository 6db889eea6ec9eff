"""Closed by default, drained on stop, supervised, against the real `bentoml serve`: the admin token file,
SPO_API_TOKEN, hostile inputs, SIGTERM drain, and a dead engine thread (injected with SPO_FAULTS)."""

from __future__ import annotations

import io
import signal
import stat
import threading
import time

import httpx
import pytest
from PIL import Image

from server import Server

pytestmark = pytest.mark.server
API = "api-token-123456"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tmp_path_factory.mktemp("lifecycle")


@pytest.fixture(scope="module")
def server(data):
    s = Server({"SPO_DATA_DIR": str(data), "SPO_API_TOKEN": API, "SPO_DRAIN_S": "30"}, data / "server.log").start()
    yield s
    s.stop(signal.SIGKILL)  # the drain test stops it first; this only cleans up after a failure


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def admin_token(data) -> str:
    return (data / "admin_token").read_text().strip()


def test_admin_token_file_is_created_private_and_required(server, data):
    path = data / "admin_token"
    text = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert text.endswith("\n") and text.count("\n") == 1 and len(text.strip()) >= 32
    token = text.strip()
    # loopback is no longer trusted
    r = httpx.get(server.url + "/admin/adapters", timeout=10)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and r.json()["detail"][0]["loc"] == ["authorization"]
    assert set(r.json()) == {"error", "status", "detail"} and r.json()["status"] == 401  # the one error body
    assert httpx.get(server.url + "/admin/adapters", headers=bearer("wrong-token-1234"), timeout=10).status_code == 401
    assert httpx.get(server.url + "/train/list", timeout=10).status_code == 401
    r = httpx.get(server.url + "/admin/adapters", headers=bearer(token), timeout=10)
    assert r.status_code == 200 and token not in r.text
    assert token not in httpx.get(server.url + "/info", headers=bearer(token), timeout=10).text
    log = (data / "server.log").read_text()
    assert str(path) in log and token not in log and API not in log


def test_api_token_guards_generation_only(server, data):
    body = {"prompt": "a cat", "num_inference_steps": 1, "seed": 1}
    r = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["detail"][0]["loc"] == ["authorization"] and API not in r.text
    assert httpx.post(server.url + "/generate_batch", json=body, headers=bearer("nope-nope-nope"), timeout=60).status_code == 401
    assert httpx.post(server.url + "/generate", json=body, headers=bearer(API), timeout=60).status_code == 200
    assert httpx.post(server.url + "/generate", json=body, headers=bearer(admin_token(data)), timeout=60).status_code == 200
    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(server.url + path, timeout=10).status_code == 200, path


@pytest.mark.parametrize("body,field", [
    ({"name": "x", "file": "a" * 5000 + ".safetensors"}, "file"),
    ({"name": "x", "file": "a/" * 600 + "b.safetensors"}, "file"),
    ({"name": "n" * 5000, "file": "a.safetensors"}, "name"),
])
def test_long_names_are_400s(server, data, body, field):
    r = httpx.post(server.url + "/admin/adapters/load", json=body, headers=bearer(admin_token(data)), timeout=10)
    assert r.status_code == 400 and r.json()["detail"][0]["loc"] == [field], r.text


@pytest.mark.parametrize("field,text", [("prompt", "a\x00cat"), ("prompt", "\x1b[31mred"), ("negative_prompt", "bad\x07"),
                                        ("prompt", "\x7f")])
def test_control_characters_are_refused(server, field, text):
    body = {"prompt": "a cat", "num_inference_steps": 1, field: text}
    r = httpx.post(server.url + "/generate", json=body, headers=bearer(API), timeout=60)
    assert r.status_code == 400 and r.json()["detail"][0]["loc"] == [field] and "control characters" in r.text


def test_multiline_prompt_keeps_a_valid_parameters_chunk(server):
    prompt = "a cat\n\tin a hat, ünïcödé 猫"
    r = httpx.post(server.url + "/generate", json={"prompt": prompt, "negative_prompt": "blur", "num_inference_steps": 1,
                                                   "seed": 4}, headers=bearer(API), timeout=60)
    assert r.status_code == 200
    text = Image.open(io.BytesIO(r.content)).info["parameters"]
    # A1111's PNG-info reading: the prompt lines up to "Negative prompt:", then the key: value line last
    lines = text.split("\n")
    neg = next(i for i, ln in enumerate(lines) if ln.startswith("Negative prompt: "))
    assert "\n".join(lines[:neg]) == prompt and lines[neg] == "Negative prompt: blur"
    assert lines[-1].startswith("Steps: 1, Sampler: ddim") and "Seed: 4" in lines[-1]


def test_sigterm_drains_in_flight_requests_then_exits_0(server):
    """Four requests in the engine when SIGTERM arrives all return their images; /readyz turns 503 at
    once; a request sent after SIGTERM does not run; the server exits 0."""
    results: list = [None] * 4

    def go(i):
        results[i] = httpx.post(server.url + "/generate", json={"prompt": f"drain {i}", "num_inference_steps": 30, "seed": i},
                                headers=bearer(API), timeout=120)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    t0 = time.time()
    while time.time() - t0 < 30:
        e = httpx.get(server.url + "/info", timeout=10).json()["engine"]
        if e["running"] + e["waiting"] == 4:
            break
        time.sleep(0.02)
    else:
        raise AssertionError("the four requests never reached the engine")
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    ready = httpx.get(server.url + "/readyz", timeout=10)
    assert ready.status_code == 503
    late = httpx.post(server.url + "/generate", json={"prompt": "late", "num_inference_steps": 1}, headers=bearer(API), timeout=30)
    assert late.status_code == 503 and int(late.headers["retry-after"]) >= 1 and "SIGTERM" in late.json()["error"]
    for t in threads:
        t.join()
    for r in results:
        assert r is not None and r.status_code == 200, r and r.text
        assert r.headers["content-type"] == "image/png" and Image.open(io.BytesIO(r.content)).size == (64, 64)
    assert server.proc.wait(60) == 0
    log = server.log_path.read_text()
    assert "SIGTERM: draining" in log and "drained in" in log


def test_dead_engine_answers_503_and_livez_fails(server, data):
    """A restart on the same data dir keeps the admin token; an engine thread that dies (injected after
    3 steps) answers every request 503 at once and /livez turns 503."""
    token = admin_token(data)
    with Server({"SPO_DATA_DIR": str(data), "SPO_FAULTS": "engine_crash:step=3"}, data / "server2.log") as s:
        assert admin_token(data) == token
        assert httpx.get(s.url + "/admin/adapters", headers=bearer(token), timeout=10).status_code == 200
        out: list = [None] * 3

        def go(i):
            out[i] = httpx.post(s.url + "/generate", json={"prompt": f"x{i}", "num_inference_steps": 50}, timeout=60)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert time.time() - t0 < 30
        for r in out:
            assert r.status_code == 503 and "engine thread died" in r.json()["error"] and r.headers["retry-after"], r.text
        assert httpx.get(s.url + "/livez", timeout=10).status_code == 503
        r = httpx.post(s.url + "/generate", json={"prompt": "after", "num_inference_steps": 1}, timeout=30)
        assert r.status_code == 503 and "engine thread died (InjectedFault)" in r.json()["error"]
        # the exception's type only, to every caller: its text (which may hold paths) stays in the log and /info
        assert all("SPO_FAULTS" not in x.text for x in [*out, r]), [x.text for x in out]
