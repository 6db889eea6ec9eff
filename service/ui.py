"""GET /ui: the playground page, three static files shipped beside this module (service/ui/). No build
step and nothing fetched from elsewhere: the page reads its bounds from /docs.json and its adapters from
/info, and generates through POST /generate/stream. Open like /docs.json; the page itself sends the
API token (kept in its sessionStorage) on its calls."""

from __future__ import annotations

import functools
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.errors import error_response

FILES = Path(__file__).with_name("ui")
# name under /ui/ -> media type; only these are served (no path from the URL reaches the file system)
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# the page's own origin only; inline images are the stream's base64 previews and the blobs of results
POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
          "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'self'")


@functools.cache
def _read(name: str) -> bytes:
    return (FILES / name).read_bytes()


def _file(name: str, media_type: str) -> Response:
    return Response(_read(name), media_type=media_type,
                    headers={"Cache-Control": "no-cache", "Content-Security-Policy": POLICY,
                             "X-Content-Type-Options": "nosniff"})


async def page(request: Request) -> Response:
    return _file("index.html", "text/html; charset=utf-8")


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in ASSETS:
        return error_response(404, f"path: /ui/{name} is not a file of the page ({', '.join(ASSETS)})", "path",
                              kind="not_found")
    return _file(name, ASSETS[name])


ROUTES = [
    Route("/ui", page, methods=["GET"]),
    Route("/ui/{name}", asset, methods=["GET"]),
]
