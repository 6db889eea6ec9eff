"""The route table of the Starlette app mounted on the BentoML service (which itself serves /generate and
/generate_batch): each route module's ROUTES, and the error shape of each foreign API it mounts, which
the door applies to every answer under that API's prefix (the framework's 404/405 included)."""

from __future__ import annotations

from starlette.applications import Starlette

from service import a1111, admin, openai_api, stream, train, ui
from service import eval as evaluation  # not to shadow the builtin
from service.context import ADMIN, Shape
from service.errors import ForeignShape

ROUTES = [
    *stream.ROUTES,  # /generate/stream: /generate's request as Server-Sent Events
    *train.ROUTES,  # /train/*
    *evaluation.ROUTES,  # /eval/*: adapter evaluation jobs
    *admin.ROUTES,  # /info, /admin/*
    *openai_api.ROUTES,  # /v1/*: the OpenAI Images API
    *a1111.ROUTES,  # /sdapi/v1/*: the AUTOMATIC1111 API
    *ui.ROUTES,  # /ui: the playground page
]
# the credential each POST route needs, by path prefix (the longest applies), which the door checks before it
# reads a body: a caller without it never has a body read (the routes check it again)
GUARDS: dict[str, Shape] = {"/v1/": openai_api.GUARD, "/sdapi/v1/": a1111.GUARD, "/sdapi/v1/interrupt": a1111.INTERRUPT,
                            "/admin/": ADMIN, "/train/": ADMIN, "/eval/": ADMIN}
ERROR_SHAPES: dict[str, ForeignShape] = {shape.prefix: shape for shape in (openai_api.ERRORS, a1111.ERRORS)}
# the body limits of the compatibility routes (the door's; other routes: door.DEFAULT_BODY_LIMIT): their JSON
# bodies have our generation limit, those that carry images SPO_MAX_IMAGE_BYTES
JSON_ROUTES = ("/v1/images/generations", "/sdapi/v1/txt2img")
IMAGE_ROUTES = ("/v1/images/edits", "/sdapi/v1/img2img")

app = Starlette(routes=ROUTES)
