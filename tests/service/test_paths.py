"""service/paths.py without a server: BentoML's HTTP metrics middleware (here a stand-in under its name that
records the path it would label) sees a label from a closed set, the app inside it the real path. The live
server's count of series is tests/service/hostile_issue23.py's test_metric_series_stay_bounded."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from service.paths import METRICS_MIDDLEWARE, UNKNOWN, PathLabels, bound_app


class Recorder:
    """Stands in for BentoML's RunnerTrafficMetricsMiddleware: keeps the path it would put in `endpoint`."""

    seen: list[str] = []

    def __init__(self, app, namespace: str = "bentoml_service"):
        self.app, self.namespace = app, namespace

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            Recorder.seen.append(scope["path"])
        await self.app(scope, receive, send)


Recorder.__name__ = "RunnerTrafficMetricsMiddleware"


async def echo(request):
    return PlainTextResponse(request.url.path)


def make_app() -> Starlette:
    inner = Starlette(routes=[Route("/info", echo), Route("/v1/images/files/{file_id}", echo), Route("/ui/{name}", echo)])
    return Starlette(routes=[Route("/generate", echo, methods=["POST"]), Mount("/", inner)],
                     middleware=[Middleware(Recorder, namespace="bentoml_service")])


def test_labels_are_routes_templates_or_unknown():
    labels = PathLabels(make_app().routes)
    assert labels("/generate") == "/generate" and labels("/info") == "/info"
    assert labels("/v1/images/files/0123abcd") == labels("/v1/images/files/x") == "/v1/images/files/{file_id}"
    assert labels("/ui/app.js") == "/ui/{name}"
    assert {labels(f"/no/such/path/{i}") for i in range(500)} == {UNKNOWN}
    assert labels("/info/") == labels("/v1/images/files/a/b") == labels("") == UNKNOWN


def test_the_metrics_middleware_sees_the_label_and_the_routes_the_real_path():
    app = make_app()
    assert bound_app(app)
    Recorder.seen = []
    with TestClient(app) as client:
        answers = [client.get(p) for p in ("/info", "/v1/images/files/abc", "/no/such/path/1", "/no/such/path/2")]
        post = client.post("/generate")
    assert [(r.status_code, r.text) for r in answers[:2]] == [(200, "/info"), (200, "/v1/images/files/abc")]
    assert [r.status_code for r in answers[2:]] == [404, 404] and post.text == "/generate"
    assert Recorder.seen == ["/info", "/v1/images/files/{file_id}", UNKNOWN, UNKNOWN, "/generate"]


def test_bentoml_still_names_its_middleware_so():
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    assert RunnerTrafficMetricsMiddleware.__name__ in METRICS_MIDDLEWARE
    app = Starlette(routes=[Route("/info", echo)])
    assert not bound_app(app)  # no metrics middleware: nothing to wrap (and a warning in the log)
