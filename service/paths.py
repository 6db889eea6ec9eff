"""Bounded labels for BentoML's own HTTP metrics.

BentoML 1.4 labels `bentoml_service_request_total`, `_request_duration_seconds` and `_request_in_progress`
with the request's raw path: `RunnerTrafficMetricsMiddleware` (bentoml/_internal/server/http/instruments.py),
the outermost middleware of the app BentoML builds, outside the door, reads `scope["path"]`. Every path anyone
asks for would add series that live as long as the process: a scanner's thousand probes, every
`/v1/images/files/<id>`. Here that middleware is shown a label from a closed set instead: the exact path of
a route without parameters, the template of one with them (`/v1/images/files/{file_id}`, `/ui/{name}`), or
`/{unknown}` for a path no route matches. Everything inside it (BentoML's access log, the door, the routes)
still sees the real path.

`bound_http_metrics(service)` arranges it for the app `bentoml serve`'s worker gets from `service.to_asgi()`:
the metrics middleware's entry in that Starlette app's middleware list is wrapped before the first request
builds the stack. Nothing in site-packages is changed.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Iterable

from starlette.middleware import Middleware
from starlette.routing import Mount, Route, WebSocketRoute, compile_path

log = logging.getLogger("spo_serve")

UNKNOWN = "/{unknown}"  # the label of every path no route matches
METRICS_MIDDLEWARE = ("RunnerTrafficMetricsMiddleware", "HTTPTrafficMetricsMiddleware")  # BentoML's names
_REAL = "spo.real_path"  # the scope key that carries the real path past the metrics middleware


class PathLabels:
    """path -> its label: the route's path, its template, `{mount}/{path}` under a static mount, or UNKNOWN."""

    def __init__(self, routes: Iterable[Any]):
        self.exact: set[str] = set()
        self.templates: list[tuple[re.Pattern, str]] = []
        self._add(routes, "")

    def _add(self, routes: Iterable[Any], prefix: str) -> None:
        for route in routes:
            if isinstance(route, Mount):
                base = prefix + route.path
                if route.routes:  # a mounted app with a route table (ours, under BentoML's "/")
                    self._add(route.routes, base)
                else:  # static files and the like: one label for the mount
                    self.templates.append((re.compile("^" + re.escape(base) + "/"), base + "/{path}"))
            elif isinstance(route, (Route, WebSocketRoute)):
                path = prefix + route.path
                if route.param_convertors:
                    self.templates.append((compile_path(path)[0], path))
                else:
                    self.exact.add(path)

    def __call__(self, path: str) -> str:
        if path in self.exact:
            return path
        return next((label for regex, label in self.templates if regex.match(path)), UNKNOWN)


class BoundedHTTPMetrics:
    """BentoML's HTTP metrics middleware (`metrics_cls`, built with its own options) shown the label of the
    path; the app inside it gets the real path back."""

    def __init__(self, app, metrics_cls: type, labels: Callable[[str], str], *args, **options):
        self.labels = labels
        self.inner = metrics_cls(_RealPath(app), *args, **options)

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            path = scope["path"]
            label = self.labels(path)
            if label != path:
                scope[_REAL], scope["path"] = path, label
        await self.inner(scope, receive, send)


class _RealPath:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if _REAL in scope:
            scope["path"] = scope.pop(_REAL)
        await self.app(scope, receive, send)


def bound_app(app) -> bool:
    """Wrap the metrics middleware of BentoML's Starlette `app` (before its stack is built); False when the
    app has none (metrics off, or a BentoML that names it otherwise: then logged)."""
    for i, m in enumerate(app.user_middleware):
        if getattr(m.cls, "__name__", "") in METRICS_MIDDLEWARE:
            if app.middleware_stack is not None:
                raise RuntimeError("the app's middleware stack is already built: bound its metrics before serving")
            app.user_middleware[i] = Middleware(BoundedHTTPMetrics, m.cls, PathLabels(app.routes), *m.args, **m.kwargs)
            return True
    log.warning("BentoML's HTTP metrics middleware (%s) not found: its endpoint label is not bounded",
                " or ".join(METRICS_MIDDLEWARE))
    return False


def bound_http_metrics(service) -> None:
    """Make `service` (a `bentoml.Service`) serve an app whose HTTP metrics are labelled from a closed set.
    BentoML's worker asks the service for its app with `to_asgi()`: the service becomes an instance of a
    subclass (no new fields) whose `to_asgi()` bounds the app it returns."""
    base = type(service)

    class BoundedService(base):  # type: ignore[misc, valid-type]
        __slots__ = ()

        def to_asgi(self, *args, **kwargs):
            app = super().to_asgi(*args, **kwargs)
            bound_app(app)
            return app

    BoundedService.__name__ = BoundedService.__qualname__ = base.__name__
    service.__class__ = BoundedService
