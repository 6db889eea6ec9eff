"""best_of and search "step" over HTTP against the real `bentoml serve` (tests/server.py's standard server: the
tiny preset, whose default scorer, SPO_SCORER=spm, is the tiny random SPM): the headers, the batch JSON's scores
of every candidate, the chosen candidate equal to its seed generated alone, best_of=1 byte-identical to a body
without it, the stream's one step event per step, OpenAI's extra_body, A1111's refusal and the 400s naming the
field and range in each API's shape."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from httpx_sse import connect_sse

from conftest import max_pixel_diff
from server import API_AUTH

pytestmark = pytest.mark.server
SMALL = {"width": 32, "height": 32, "num_inference_steps": 4}


@pytest.fixture(scope="module")
def server(standard_server):
    return standard_server


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, headers=API_AUTH, timeout=120, **kw)


def test_generate_answers_the_best_candidate_with_its_score(server):
    body = {"prompt": "a watercolor fox", "seed": 500, "best_of": 3, **SMALL}
    r = post(server, "/generate", body)
    assert r.status_code == 200, r.text
    assert r.headers["x-best-of"] == "3" and "x-search" not in r.headers
    score, seed = float(r.headers["x-preference-score"]), int(r.headers["x-seed"])
    assert seed in (500, 501, 502) and score == score  # a number, not NaN
    # the same batch's scores, and the chosen candidate is its seed generated alone
    batch = post(server, "/generate_batch", {**body, "n": 1}).json()
    pref = batch["images"][0]["preference"]
    assert pref["seeds"] == [500, 501, 502] and len(pref["scores"]) == 3 and pref["search"] is None
    assert pref["index"] == max(range(3), key=lambda i: pref["scores"][i]) and pref["score"] == pytest.approx(score)
    assert batch["seeds"] == [seed] and batch["images"][0]["seed"] == seed
    alone = post(server, "/generate", {"prompt": "a watercolor fox", "seed": seed, **SMALL})
    assert "x-best-of" not in alone.headers and max_pixel_diff(r.content, alone.content) <= 1


def test_best_of_1_is_byte_identical_to_a_body_without_it(server):
    body = {"prompt": "a red owl", "seed": 77, **SMALL}
    a, b = post(server, "/generate", body), post(server, "/generate", {**body, "best_of": 1})
    assert a.status_code == b.status_code == 200 and a.content == b.content
    assert "x-best-of" not in b.headers and "x-preference-score" not in b.headers


def test_batch_json_lists_every_candidates_score_and_the_search(server):
    body = {"prompt": "a castle", "seed": 40, "n": 2, "best_of": 2, "search": "step", "search_steps": 2, **SMALL}
    r = post(server, "/generate_batch", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["seeds"] == [40, 42] and r.headers["x-search"] == "step" and r.headers["x-best-of"] == "2"
    for i, image in enumerate(out["images"]):
        pref = image["preference"]
        assert pref["seeds"] == [40 + 2 * i, 41 + 2 * i] and image["seed"] == 40 + 2 * i  # search: the image's seed
        assert len(pref["scores"]) == 2 and pref["index"] in (0, 1) and pref["search"] == "step"
        assert [b["step"] for b in pref["branches"]] == [1, 3]  # round(4/3), round(8/3)
        assert all(len(b["scores"]) == 2 and b["chosen"] == max((0, 1), key=lambda c: b["scores"][c])
                   for b in pref["branches"])
        assert base64.b64decode(image["image"])[:4] == b"\x89PNG"
    assert float(r.headers["x-preference-score"]) == pytest.approx(out["images"][0]["preference"]["score"])


def test_the_stream_steps_once_per_step_and_its_done_event_has_the_score(server):
    events = []
    with httpx.Client(base_url=server.url, headers=API_AUTH, timeout=120) as client:
        with connect_sse(client, "POST", "/generate/stream", json={"prompt": "a moon", "seed": 9, "best_of": 3,
                                                                   "search": "step", **SMALL}) as source:
            events = [(sse.event, json.loads(sse.data)) for sse in source.iter_sse()]
    assert [e for e, _ in events] == ["queued", "step", "step", "step", "step", "done"]
    assert [d["i"] for e, d in events if e == "step"] == [1, 2, 3, 4]
    done = events[-1][1]
    assert done["best_of"] == 3 and done["search"] == "step" and isinstance(done["preference_score"], float)


@pytest.mark.parametrize("body, field, says", [
    ({"best_of": 9}, "best_of", "1..8"),
    ({"best_of": 3, "search": "x"}, "search", "step"),
    ({"search": "step"}, "search", "best_of > 1"),
    ({"best_of": 2, "search": "step", "search_steps": 4}, "search_steps", "1..3"),
])
def test_bad_values_are_400s_naming_the_field(server, body, field, says):
    r = post(server, "/generate", {"prompt": "a", **SMALL, **body})
    assert r.status_code == 400 and r.json()["detail"][0]["loc"] == [field] and says in r.json()["error"], r.text
    batch = post(server, "/generate_batch", {"prompt": "a", "n": 2, **SMALL, **body})
    assert batch.status_code == 400 and batch.json()["detail"][0]["loc"] == [field]


def test_openai_extra_body_and_a1111s_refusal(server):
    r = post(server, "/v1/images/generations", {"prompt": "a blue bird", "n": 2, "size": "32x32", "seed": 3,
                                                "num_inference_steps": 4, "best_of": 2})
    assert r.status_code == 200, r.text
    assert all(isinstance(d["preference_score"], float) for d in r.json()["data"]) and len(r.json()["data"]) == 2
    bad = post(server, "/v1/images/generations", {"prompt": "a", "best_of": 9})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "best_of" and "1..8" in bad.json()["error"]["message"]
    a1 = post(server, "/sdapi/v1/txt2img", {"prompt": "a", "steps": 2, "best_of": 2})
    assert a1.status_code == 400 and a1.json()["field"] == "best_of", a1.text
