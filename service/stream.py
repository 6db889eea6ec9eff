"""POST /generate/stream: /generate's request, answered as Server-Sent Events.

    event: queued   data: {"position", "request_id"}          images ahead in the queue at submission
    event: step     data: {"i", "n", "eta_s"[, "preview"]}    one per denoising step (n: steps this image runs)
    event: done     data: {"image", "format", "seed", ...}    the encoded image and what /generate's X-* headers say
    event: error    data: {"error", "status", "detail"}       /generate's error body

Errors before the stream starts (validation, queue full, not ready) are ordinary HTTP answers with
/generate's status codes. Closing the stream cancels the request at the next step boundary. The same
engine and sampler as /generate: the engine calls back after each step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from service import context
from service.errors import map_error
from service.schemas import core_request, result_fields
from spo_runtime.errors import AdapterNotFoundError


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def generate_stream(request: Request) -> Response:
    svc = context.bound()
    rid = context.request_id(request.headers)
    reason = context.not_ready(svc)
    if reason is not None:
        resp = map_error(reason)
        resp.headers["X-Request-Id"] = rid
        return resp
    admin = context.credentials_ok(svc, request.headers, admin=True)  # only then an unknown adapter names the others
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    try:
        body = await context.body(request, svc.bodies.stream)  # the door's parsed body
        loaded = svc.pipe.registry.adapters
        if body.adapter is not None and body.adapter not in loaded:  # a 400 now rather than an error event later
            raise AdapterNotFoundError(body.adapter, list(loaded))
        sub = svc.engine.submit([core_request(body)], timeout_s=body.timeout_s, preview=body.preview,
                                progress=lambda p: loop.call_soon_threadsafe(events.put_nowait, ("step", p)))
    except Exception as e:
        resp = map_error(e, admin)
        resp.headers["X-Request-Id"] = rid
        return resp
    answer = asyncio.wrap_future(sub.future)
    answer.add_done_callback(lambda f: events.put_nowait(("done", f)))

    async def stream():
        from spo_runtime.imaging import encode_image, encode_png

        svc.inflight += 1
        t0 = time.perf_counter()
        try:
            yield _sse("queued", {"position": sub.position, "request_id": rid})
            while True:
                kind, item = await events.get()
                if kind == "step":
                    data = {"i": item.i, "n": item.n, "eta_s": round(item.eta_s, 3)}
                    if item.latents is not None:
                        png = await anyio.to_thread.run_sync(lambda: encode_png(svc.pipe.preview(item.latents)))
                        data["preview"] = base64.b64encode(png).decode()
                    yield _sse("step", data)
                    continue
                try:
                    [r] = item.result()
                except Exception as e:
                    yield _sse("error", json.loads(map_error(e, admin).body))
                    return
                data = await anyio.to_thread.run_sync(encode_image, r, body.format, body.quality)
                yield _sse("done", {"image": base64.b64encode(data).decode(), "format": body.format,
                                    **result_fields(rid, r), "ms": round((time.perf_counter() - t0) * 1e3, 1)})
                return
        finally:
            svc.inflight -= 1
            if not sub.future.done():  # the client went away: leave the batch at the next step boundary
                sub.cancel()
                svc.engine.metrics.rejected.labels("disconnected").inc()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"X-Request-Id": rid, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


ROUTES = [Route("/generate/stream", generate_stream, methods=["POST"])]
