"""The HTTP contract against the real `bentoml serve`: the schema /docs.json publishes (bounds, enums,
declared responses), strict JSON types, the one error body, non-JSON bodies, configuration errors at
start, and a schemathesis run over /generate and /generate_batch. The server is tests/server.py's standard one
(generation requests carry its API token)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server import ADMIN_AUTH, API_AUTH, ROOT
from spo_runtime.errors import ConfigError
from spo_runtime.settings import Settings

FUZZ_SECONDS = 60
# A short deadline bounds the fuzzer's slowest cases (100 steps at 256x256): they end as 504s that the
# request's deadline explains. The server's own is SPO_REQUEST_TIMEOUT_S's default (the standard server is
# shared), and a request's deadline is the smaller of the two: each positive case asks for at most this.
DEADLINE_S = 4.0


@pytest.fixture(scope="module")
def server(standard_server):
    return standard_server


def post(server, path, auth=True, **kw):
    """POST with the API token (`auth=False`: none), and any headers given over it."""
    headers = {**(API_AUTH if auth else {}), **kw.pop("headers", {})}
    return httpx.post(server.url + path, timeout=60, headers=headers, **kw)


def assert_error(resp, status, field):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "status", "detail"} and body["status"] == status
    assert body["detail"] and all(set(d) == {"loc", "msg", "type"} for d in body["detail"])
    if field is not None:
        assert body["detail"][0]["loc"] == [field], body
        assert body["error"].startswith(f"{field}: "), body
    return body


# -- the published schema --------------------------------------------------------------------


@pytest.mark.server
def test_docs_publish_bounds_enums_and_responses(server):
    doc = httpx.get(server.url + "/docs.json", timeout=30).json()
    for route in ("/generate", "/generate_batch"):
        post_op = doc["paths"][route]["post"]
        props = post_op["requestBody"]["content"]["application/json"]["schema"]["properties"]
        assert props["num_inference_steps"]["minimum"] == 1 and props["num_inference_steps"]["maximum"] == 100
        assert props["guidance_scale"]["minimum"] == 0 and props["guidance_scale"]["maximum"] == 30
        assert (props["prompt"]["minLength"], props["prompt"]["maxLength"]) == (1, 4000)
        assert props["scheduler"]["enum"] == ["ddim", "euler", "dpmpp_2m_karras"]
        assert props["format"]["enum"] == ["png", "jpeg", "webp"]
        assert (props["quality"]["minimum"], props["quality"]["maximum"]) == (1, 100)
        assert props["seed"]["maximum"] == 2**32 - 1
        assert "not only whitespace" in props["prompt"]["description"]
        width = props["width"]
        width = next((a for a in width.get("anyOf", [width]) if a.get("type") == "integer"), width)
        assert (width["minimum"], width["maximum"], width["multipleOf"]) == (32, 256, 8)  # the tiny preset's range
        assert "eta" in props and "'ddim'" in props["eta"]["description"]  # what the schema cannot say, said
        responses = {str(k): v for k, v in post_op["responses"].items()}
        for code in ("400", "415", "429", "500", "503", "504"):
            assert responses[code]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert set(doc["paths"]["/generate"]["post"]["responses"]["200"]["content"]) == {"image/png", "image/jpeg", "image/webp"}
    batch = doc["paths"]["/generate_batch"]["post"]
    assert batch["requestBody"]["content"]["application/json"]["schema"]["properties"]["n"]["maximum"] == 8
    assert batch["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/BatchResponse")
    assert set(doc["components"]["schemas"]["ErrorBody"]["required"]) == {"error", "status", "detail"}


# -- strict types and the one error body -----------------------------------------------------


@pytest.mark.parametrize("field,value,needle", [
    ("num_inference_steps", True, "integer"),
    ("num_inference_steps", 2.5, "integer"),
    ("seed", "7", "integer"),
    ("guidance_scale", "5", "number"),
    ("lora_scale", False, "number"),
    ("prompt", 5, "string"),
    ("quality", "90", "integer"),
    ("timeout_s", True, "number"),
    ("format", "gif", "png, jpeg, webp"),
    ("scheduler", "plms", "ddim, euler, dpmpp_2m_karras"),
    ("width", 1000, "multiple of 8 in 32..256"),
    ("quality", 0, "1..100"),
    ("timeout_s", 0, "(0, 3600]"),
    ("extra", 1, "unknown field"),
])
@pytest.mark.server
def test_strict_types_and_bounds_are_400s_naming_the_field(server, field, value, needle):
    for route, extra in (("/generate", {}), ("/generate_batch", {"n": 2})):
        body = assert_error(post(server, route, json={"prompt": "a cat", "num_inference_steps": 2, **extra, field: value}),
                            400, field)
        assert needle in body["error"], body


@pytest.mark.server
def test_cross_field_rules_are_400s_naming_the_field(server):
    assert_error(post(server, "/generate", json={"prompt": "a", "scheduler": "euler", "eta": 0.5}), 400, "eta")
    body = assert_error(post(server, "/generate_batch", json={"prompt": "a", "n": 4, "seed": 2**32 - 2}), 400, "seed")
    assert "0..4294967292" in body["error"]
    body = assert_error(post(server, "/generate", json={"prompt": "a", "adapter": "nope", "num_inference_steps": 1}), 400, "adapter")
    assert "'nope' is not loaded" in body["error"] and "loaded:" not in body["error"]  # the others: the admin's only
    body = assert_error(post(server, "/generate", json={"prompt": "a", "adapter": "nope", "num_inference_steps": 1},
                             headers=ADMIN_AUTH), 400, "adapter")
    assert "'nope' is not loaded (loaded: spo" in body["error"], body
    assert_error(post(server, "/generate_batch", json={"prompt": "a", "n": 9}), 400, "n")
    assert_error(post(server, "/generate", json={"num_inference_steps": 2}), 400, "prompt")


@pytest.mark.parametrize("content_type,data", [
    ("multipart/form-data; boundary=xyz", b"--xyz\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na cat"),
    ("multipart/form-data", b"garbage"),
    ("application/x-www-form-urlencoded", b"prompt=a+cat"),
    ("application/xml", b"<prompt>a cat</prompt>"),
    ("text/plain", b"a cat"),
])
@pytest.mark.server
def test_bodies_that_are_not_json_are_415(server, content_type, data):
    for route in ("/generate", "/generate_batch"):
        resp = post(server, route, content=data, headers={"content-type": content_type})
        assert_error(resp, 415, "content-type")


@pytest.mark.parametrize("data", [b"{", b"[1, 2]", b"\"a cat\"", b"null", b"\xff\xfe"])
@pytest.mark.server
def test_malformed_json_is_400_naming_the_body(server, data):
    resp = post(server, "/generate", content=data, headers={"content-type": "application/json"})
    assert_error(resp, 400, "body")


@pytest.mark.server
def test_framework_errors_have_the_same_shape(server):
    assert_error(httpx.get(server.url + "/no/such/route", timeout=10), 404, None)
    assert_error(httpx.get(server.url + "/generate", timeout=10), 405, None)
    # closed without the admin token (as it is by default: test_lifecycle's server has no SPO_ADMIN_TOKEN)
    assert_error(post(server, "/admin/lora_scale", auth=False, json={"scale": "1"}), 401, "authorization")
    assert_error(post(server, "/admin/lora_scale", json={"scale": "1"}, headers=ADMIN_AUTH), 400, "scale")


@pytest.mark.server
def test_valid_request_still_answers_the_image(server):
    resp = post(server, "/generate", json={"prompt": "a cat", "num_inference_steps": 2, "seed": 3, "guidance_scale": 5})
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png" and resp.headers["x-seed"] == "3"
    assert resp.content[:8] == b"\x89PNG\r\n\x1a\n"


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("env,variable,needle", [
    ({"SPO_MAX_BATCH": "0"}, "SPO_MAX_BATCH", "1..256"),
    ({"SPO_MODEL": "sd15"}, "SPO_MODEL", "auto, sdxl-spo, sdxl-random, tiny"),
    ({"SPO_REQUEST_TIMEOUT_S": "soon"}, "SPO_REQUEST_TIMEOUT_S", "number"),
    ({"SPO_LORA_FUSE": "maybe"}, "SPO_LORA_FUSE", "true or false"),
    ({"SPO_EMBED_CACHE": "-1"}, "SPO_EMBED_CACHE", ">= 0"),
])
def test_config_error_names_the_variable(env, variable, needle):
    with pytest.raises(ConfigError) as e:
        Settings.from_env(env)
    assert e.value.variable == variable and str(e.value).startswith(variable + ": ") and needle in str(e.value)


def test_config_error_never_echoes_a_token():
    with pytest.raises(ConfigError) as e:
        Settings.from_env({"SPO_ADMIN_TOKEN": "short"})
    assert "short" not in str(e.value) and e.value.variable == "SPO_ADMIN_TOKEN"


@pytest.mark.server
def test_server_exits_at_start_with_one_line_naming_the_variable(tmp_path):
    bentoml = Path(sys.executable).with_name("bentoml")
    env = {**os.environ, "SPO_MODEL": "tiny", "SPO_MAX_QUEUE": "-3", "BENTOML_DO_NOT_TRACK": "true",
           "SPO_DATA_DIR": str(tmp_path)}
    t0 = time.time()
    proc = subprocess.run([str(bentoml), "serve", "service.service:SPOService", "--port", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "SPO_MAX_QUEUE" in ln]
    assert lines == ["spo-serve: configuration error: SPO_MAX_QUEUE: must be >= 0, got '-3'"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert time.time() - t0 < 120


def test_a_damaged_admin_token_file_is_one_line_and_exit_2(tmp_path):
    """Refused in every worker, it used to restart them forever, a traceback each time."""
    bentoml = Path(sys.executable).with_name("bentoml")
    (tmp_path / "admin_token").write_text("too short\n")
    (tmp_path / "admin_token").chmod(0o600)
    env = {**os.environ, "SPO_MODEL": "tiny", "BENTOML_DO_NOT_TRACK": "true", "SPO_DATA_DIR": str(tmp_path)}
    env.pop("SPO_ADMIN_TOKEN", None)
    proc = subprocess.run([str(bentoml), "serve", "service.service:SPOService", "--port", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "SPO_ADMIN_TOKEN" in ln]
    assert lines == [f"spo-serve: configuration error: SPO_ADMIN_TOKEN: {tmp_path / 'admin_token'} must hold one token "
                     "of at least 16 characters on one line (delete it to have a new one made, or set "
                     "SPO_ADMIN_TOKEN)"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and (tmp_path / "admin_token").read_text() == "too short\n"


# -- schemathesis ----------------------------------------------------------------------------


@pytest.mark.server
def test_schemathesis_finds_no_failures(server, tmp_path, monkeypatch):
    """Positive and negative cases generated from /docs.json for both generation routes, about 60 s in
    all, with the four checks the contract promises. A 503/504 passes `not_a_server_error` only when
    overload (Retry-After) or the request's own deadline (an error naming timeout_s) explains it.
    A positive case's timeout_s is capped at DEADLINE_S, the deadline a server with SPO_REQUEST_TIMEOUT_S=4
    would give it; negative cases go as generated."""
    from hypothesis import HealthCheck, Phase, given, settings
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import (negative_data_rejection, response_schema_conformance,
                                                   status_code_conformance)

    monkeypatch.chdir(tmp_path)  # no configuration file of ours can widen what passes
    schema = schemathesis.openapi.from_url(server.url + "/docs.json")
    checks = [not_a_server_error, response_schema_conformance, negative_data_rejection, status_code_conformance]
    seen: dict[str, int] = {}
    budget = FUZZ_SECONDS / 4
    for route in ("/generate", "/generate_batch"):
        op = schema[route]["POST"]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            t_end = time.monotonic() + budget

            @settings(max_examples=60, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck), derandomize=True)
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                if time.monotonic() > t_end:
                    return  # the time budget is spent: the remaining examples are not sent
                if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
                    case.body["timeout_s"] = min(case.body.get("timeout_s") or DEADLINE_S, DEADLINE_S)
                resp = case.call(base_url=server.url, timeout=30, headers=API_AUTH)
                seen[f"{route} {mode.value} {resp.status_code}"] = seen.get(f"{route} {mode.value} {resp.status_code}", 0) + 1
                excluded = []
                if resp.status_code in (503, 504):
                    err = resp.json()
                    explained = "retry-after" in {k.lower() for k in resp.headers} or err["detail"][0]["loc"] == ["timeout_s"]
                    assert explained, resp.text
                    excluded = [not_a_server_error]
                case.validate_response(resp, checks=checks, excluded_checks=excluded)

            run()
    print("schemathesis responses:", seen)
    # it did reach the model (on a busy machine the 4 s deadline may answer every positive case 504)
    assert any(k.endswith((" 200", " 504")) and " positive " in k for k in seen), seen
    assert any(" negative 400" in k for k in seen), seen
    assert not any(k.endswith(" 500") for k in seen), seen
