"""The door middleware (service.door.Contract) on a small Starlette app, in process: body limits, media
types, schema validation before the app runs, error reshaping, and the OpenAPI additions."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ConfigDict, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from service.door import Contract
from service.schemas import _openapi30


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(min_length=1)
    steps: int = Field(20, ge=1, le=100)


calls: list[bytes] = []


async def echo(request: Request):
    raw = await request.body()
    calls.append(raw)
    return JSONResponse({"got": json.loads(raw)})


async def boom(request: Request):
    return PlainTextResponse("An unexpected error has occurred", status_code=500)


async def framework_400(request: Request):  # the shape BentoML's validator answers
    return JSONResponse({"error": "1 validation error for Input", "detail": [{"type": "int_type", "loc": ["steps"], "msg": "bad"}]},
                        status_code=400)


async def docs(request: Request):
    return JSONResponse({"paths": {}, "components": {"schemas": {"X": {"type": "number", "exclusiveMinimum": 0}}}})


def client(limit=64):
    app = Starlette(routes=[Route("/gen", echo, methods=["POST"]), Route("/other", echo, methods=["POST"]),
                            Route("/boom", boom), Route("/fw", framework_400), Route("/docs.json", docs)])
    return TestClient(Contract(app, models={"/gen": Body}, limits={"/gen": limit}, default_limit=128,
                               docs=lambda d: {**d, "patched": True}))


def test_valid_body_reaches_the_app_unchanged():
    calls.clear()
    r = client().post("/gen", content=b'{"prompt": "a", "steps": 3}', headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json() == {"got": {"prompt": "a", "steps": 3}}
    assert calls == [b'{"prompt": "a", "steps": 3}']


@pytest.mark.parametrize("body,field,needle", [
    ({"prompt": "a", "steps": True}, "steps", "integer"),
    ({"prompt": "a", "steps": 0}, "steps", "1..100"),
    ({"steps": 3}, "prompt", "field required"),
    ({"prompt": "a", "x": 1}, "x", "unknown field"),
])
def test_invalid_body_never_reaches_the_app(body, field, needle):
    calls.clear()
    r = client().post("/gen", json=body)
    assert r.status_code == 400 and calls == []
    err = r.json()
    assert err["status"] == 400 and err["detail"][0]["loc"] == [field] and needle in err["error"]


def test_limits_and_media_types():
    c = client(limit=64)
    r = c.post("/gen", content=b'{"prompt": "' + b"a" * 100 + b'"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "at most 64 bytes" in r.json()["error"]
    r = c.post("/other", content=b"x" * 200)  # streamed past the default limit
    assert r.status_code == 400 and "at most 128 bytes" in r.json()["error"]
    r = c.post("/gen", content=b"prompt=a", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and r.json()["detail"][0]["loc"] == ["content-type"]
    r = c.post("/gen", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["body"]


def test_framework_errors_are_reshaped():
    c = client()
    r = c.get("/boom")
    assert r.status_code == 500 and r.json() == {"error": "internal error: see the server log", "status": 500,
                                                 "detail": [{"loc": [], "msg": "internal error: see the server log",
                                                             "type": "internal_server_error"}]}
    r = c.get("/fw")
    assert r.json() == {"error": "steps: bad", "status": 400, "detail": [{"loc": ["steps"], "msg": "bad", "type": "int_type"}]}
    r = c.get("/nowhere")
    assert r.status_code == 404 and r.json()["status"] == 404 and r.headers["content-length"] == str(len(r.content))


def test_docs_are_patched_and_openapi30():
    assert client().get("/docs.json").json()["patched"] is True
    assert _openapi30({"a": [{"exclusiveMinimum": 0, "maximum": 3}]}) == {"a": [{"minimum": 0, "exclusiveMinimum": True, "maximum": 3}]}


def test_the_parsed_body_is_handed_on_and_foreign_shapes_are_registered_explicitly():
    from service.door import parsed
    from service.errors import foreign_shape

    seen = []

    async def take(request: Request):
        seen.append(parsed(request.scope, Body))
        return JSONResponse({})

    theirs = foreign_shape("/theirs/", lambda status, message, field, headers: JSONResponse(
        {"message": message, "param": field}, status_code=status, headers=headers), lambda d: "message" in d)
    app = Starlette(routes=[Route("/gen", take, methods=["POST"]), Route("/other", take, methods=["POST"])])
    c = TestClient(Contract(app, models={"/gen": Body}, shapes={theirs.prefix: theirs}))
    assert c.post("/gen", json={"prompt": "a"}).status_code == 200
    assert c.post("/other", json={"prompt": "a"}).status_code == 200
    assert seen[0] == Body(prompt="a") and seen[1] is None  # validated once, at the door, for its routes only
    assert c.get("/theirs/nowhere").json() == {"message": "Not Found", "param": None}
    assert c.get("/nowhere").json()["detail"] == [{"loc": [], "msg": "Not Found", "type": "not_found"}]


def test_a_chunked_body_past_the_limit_is_refused_at_the_door_even_where_the_handler_catches_everything():
    """The door reads every route's body before its handler runs: a handler's `except Exception` (ours answer
    any exception as a 500) never sees the overflow, and the answer has the path's API shape."""
    from service.errors import foreign_shape

    async def swallow(request: Request):
        try:
            return JSONResponse({"got": len(await request.body())})
        except Exception as e:
            return JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)

    theirs = foreign_shape("/theirs/", lambda status, message, field, headers: JSONResponse(
        {"message": message, "param": field}, status_code=status, headers=headers), lambda d: "message" in d)
    app = Starlette(routes=[Route("/ours", swallow, methods=["POST"]), Route("/theirs/x", swallow, methods=["POST"])])
    c = TestClient(Contract(app, limits={"/theirs/x": 1000}, default_limit=128, shapes={theirs.prefix: theirs}))
    chunks = lambda n: iter([b"x" * 100] * n)  # no Content-Length: chunked
    assert c.post("/ours", content=chunks(1)).json() == {"got": 100}
    r = c.post("/ours", content=chunks(3))
    assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["body"] and "at most 128 bytes" in r.json()["error"]
    assert c.post("/theirs/x", content=chunks(9)).json() == {"got": 900}
    r = c.post("/theirs/x", content=chunks(11))
    assert r.status_code == 400 and r.json()["param"] == "body" and "at most 1000 bytes" in r.json()["message"]


def test_not_ready_answers_name_the_failures_type_only():
    """A model that failed to load, or an engine thread that died: the 503 names the exception's type, never
    its text (a path, a host name); the log and /info with the admin token carry the text."""
    from types import SimpleNamespace

    from service import context

    svc = SimpleNamespace(draining=None, engine=None, failure="OSError: [Errno 2] /srv/secret/unet missing", ready=False)
    e = context.not_ready(svc)
    assert e.retry_after == 30 and "OSError" in str(e) and "/srv/secret" not in str(e), str(e)
    from spo_runtime.engine.engine import Engine

    died = "RuntimeError: /srv/secret/x.safetensors"  # the engine's own died_type, on an engine that died so
    svc.failure, svc.engine = None, SimpleNamespace(alive=False, died=died, died_type=Engine.died_type.fget(SimpleNamespace(died=died)))
    e = context.not_ready(svc)
    assert "engine thread died (RuntimeError)" in str(e) and "/srv/secret" not in str(e), str(e)


def test_the_guard_of_the_longest_prefix_refuses_before_the_body_is_read():
    import anyio

    def need(token):
        return lambda h: None if h.get("authorization") == token else JSONResponse({"detail": "who"}, status_code=401)

    app = Starlette(routes=[Route("/a/x", echo, methods=["POST"]), Route("/a/open", echo, methods=["POST"])])
    door = Contract(app, guards={"/a/": need("t"), "/a/open": lambda h: None})

    def call(path, headers):
        reads, sent = [], []

        async def receive():
            reads.append(path)
            return {"type": "http.request", "body": b'{"k": 1}', "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [(k.encode(), v.encode()) for k, v in headers.items()], "scheme": "http",
                 "server": ("t", 80), "root_path": "", "http_version": "1.1", "client": ("c", 1)}
        anyio.run(door, scope, receive, send)
        return reads, sent[0]["status"]

    assert call("/a/x", {}) == ([], 401)  # refused without reading the body
    assert call("/a/x", {"authorization": "t"}) == (["/a/x"], 200)
    assert call("/a/open", {}) == (["/a/open"], 200)  # the longer prefix lets it in
    assert call("/b", {})[1] == 404  # no guard: read and routed
