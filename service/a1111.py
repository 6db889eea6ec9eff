"""The AUTOMATIC1111 web UI API (`/sdapi/v1/*`) over the one request model, for the clients people use
(webuiapi, ComfyUI/Krita/Photoshop plug-ins that speak it).

- POST /sdapi/v1/txt2img, /sdapi/v1/img2img: A1111's body; `<lora:NAME:SCALE>` in the prompt picks a
  loaded adapter and its scale and is removed from the text. `sampler_name` DDIM | Euler | DPM++ 2M (the
  last with scheduler automatic or Karras: our dpmpp_2m_karras). Fields we do not implement are accepted at
  values that leave the image alone and refused (400 naming the field) otherwise. batch_size x n_iter
  images (<= 8) with seeds seed..seed+n-1. The answer: `images` (base64 PNG with the `parameters` chunk),
  `parameters` (the request), `info` (a JSON string: seed, all_seeds, infotexts, ... as A1111 writes them).
- GET sd-models, samplers, loras, options (read-only), progress (the oldest running request of the
  engine: A1111 has one queue); POST interrupt (admin token): cancels that request.
- With SPO_API_TOKEN set: HTTP Basic with the token as the password (A1111's --api-auth), or Bearer.
"""

from __future__ import annotations

import base64
import json
import re
import time

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pydantic import ValidationError

from service import context
from service.context import Shape, guarded
from service.errors import foreign_shape
from service.schemas import A1111Body
from spo_runtime.errors import InvalidRequestError
from spo_runtime.limits import MAX_IMAGES, MAX_SEED
from spo_runtime.validation import validation_error

SAMPLERS = {"DDIM": "ddim", "Euler": "euler", "DPM++ 2M": "dpmpp_2m_karras"}
A1111_NAMES = {v: k for k, v in SAMPLERS.items()}
ALIASES = {"ddim": "DDIM", "k_euler": "Euler", "k_dpmpp_2m": "DPM++ 2M", "DPM++ 2M Karras": "DPM++ 2M"}
LORA_TAG = re.compile(r"<lora:([^:<>]*)(?::([^:<>]*))?((?::[^<>]*)?)>")


# -- errors in A1111's shape ----------------------------------------------------------------------


def a1_error(status: int, message: str, field: str | None = None, headers=None) -> JSONResponse:
    """A1111's error body ({"error", "detail", "body", "errors"}); `field` names the field (ours)."""
    kind = "HTTPException" if status < 500 else "RuntimeError"
    return JSONResponse({"error": kind, "detail": message, "body": "", "errors": message, "field": field},
                        status_code=status, headers=headers)


# our request model's names -> the A1111 field a client sent (a <lora:...> tag lives in the prompt)
FIELDS = {"guidance_scale": "cfg_scale", "num_inference_steps": "steps", "strength": "denoising_strength",
          "init_image": "init_images", "lora_scale": "prompt", "adapter": "prompt"}
# every error under /sdapi/ in A1111's shape, the framework's included (the app hands this to the door)
ERRORS = foreign_shape(
    "/sdapi/", a1_error, lambda d: {"error", "detail", "errors"} <= set(d) and isinstance(d["detail"], str), FIELDS)


def unauthorized() -> JSONResponse:
    return JSONResponse({"detail": "Incorrect username or password"}, status_code=401,
                        headers={"WWW-Authenticate": "Basic"})


# SPO_API_TOKEN as HTTP Basic's password (or Bearer); not ready: 503 with Retry-After 5, as always here
GUARD = Shape(unauthorized=unauthorized, error=ERRORS.from_exception, basic=True, retry_after=5)


def interrupt_unauthorized() -> JSONResponse:
    return JSONResponse({"detail": "interrupt needs the admin token (Authorization: Bearer <SPO_ADMIN_TOKEN>)"},
                        status_code=401, headers={"WWW-Authenticate": "Bearer"})


INTERRUPT = Shape(unauthorized=interrupt_unauthorized, error=ERRORS.from_exception, admin=True)  # the admin's


# -- the request ------------------------------------------------------------------------------------


def _falsy(v) -> bool:
    return v in (None, False, 0, "", [], {}) or v == 0


def _eq(value):
    return lambda v: v in (None, value)


# Fields that change nothing here at these values (a predicate on the value: True = accepted).
# Anything else of A1111's body that is set to a value that would change the image is a 400 naming it.
_ACCEPTED = {
    "restore_faces": _falsy, "tiling": _falsy, "subseed_strength": _falsy, "styles": _falsy,
    "seed_resize_from_h": lambda v: v in (None, 0, -1), "seed_resize_from_w": lambda v: v in (None, 0, -1),
    "s_churn": _falsy, "s_min_uncond": _falsy, "s_noise": _eq(1), "override_settings": None,  # checked below
    "script_name": _falsy, "script_args": _falsy, "alwayson_scripts": _falsy, "refiner_checkpoint": _falsy,
    "infotext": _falsy, "firstpass_image": _falsy, "image_cfg_scale": lambda v: True,  # instruct-pix2pix only
    "initial_noise_multiplier": _eq(1), "mask": _falsy, "latent_mask": _falsy, "enable_hr": _falsy,
    "ddim_discretize": lambda v: v in (None, "uniform"), "extra_generation_params": lambda v: True,
}
# Accepted at any value: they do not touch the image (bookkeeping, saving, the s_* bounds without churn).
_IGNORED = {"subseed", "seed_enable_extras", "do_not_save_samples", "do_not_save_grid", "save_images", "send_images",
            "override_settings_restore_afterwards", "sampler_index", "do_not_reload_embeddings", "s_tmax", "s_tmin",
            "disable_extra_networks", "comments", "force_task_id", "overlay_images", "refiner_switch_at",
            "firstphase_width", "firstphase_height", "include_init_images", "mask_blur", "mask_blur_x", "mask_blur_y",
            "mask_round", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
            "resize_mode", "user", "batch_count"}
_HR = re.compile(r"hr(_.*)?", re.S)  # hires-fix fields: hr, hr_*
_OURS = {"prompt", "negative_prompt", "steps", "cfg_scale", "width", "height", "seed", "sampler_name", "scheduler",
         "eta", "batch_size", "n_iter", "init_images", "denoising_strength"}


def _number(body: dict, name: str, default, integer: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise InvalidRequestError(name, f"must be {'an integer' if integer else 'a number'}, got {v!r}")
    return int(v) if integer else float(v)


def split_lora(prompt: str) -> tuple[str, str | None, float | None]:
    """`<lora:NAME:SCALE>` tags out of the prompt: (text without them, adapter, scale); one adapter only."""
    found: dict[str, float] = {}
    for m in LORA_TAG.finditer(prompt):
        name, scale, rest = m.group(1), m.group(2), m.group(3)
        if not name or rest:
            raise InvalidRequestError("prompt", f"{m.group(0)!r}: must be <lora:NAME> or <lora:NAME:SCALE>")
        try:
            value = 1.0 if scale in (None, "") else float(scale)
        except ValueError:
            raise InvalidRequestError("prompt", f"{m.group(0)!r}: the scale must be a number") from None
        if name in found and found[name] != value:
            raise InvalidRequestError("prompt", f"<lora:{name}> is given twice with different scales "
                                                f"({found[name]:g} and {value:g})")
        found[name] = value
    if len(found) > 1:
        raise InvalidRequestError("prompt", f"one LoRA adapter per request: the prompt names {', '.join(sorted(found))}")
    text = LORA_TAG.sub("", prompt).strip()
    if not found:
        return text, None, None
    [(name, scale)] = found.items()
    return text, name, scale


def sampler(body: dict) -> str:
    field = "sampler_name" if body.get("sampler_name") or not body.get("sampler_index") else "sampler_index"
    name = body.get("sampler_name") or body.get("sampler_index") or "DDIM"
    name = ALIASES.get(name, name)
    if name not in SAMPLERS:
        raise InvalidRequestError(field, f"must be one of {', '.join(SAMPLERS)} (the samplers this server "
                                                  f"implements), got {name!r}")
    schedule = body.get("scheduler") or "automatic"
    if body.get("sampler_name") == "DPM++ 2M Karras" and schedule.lower() == "automatic":
        schedule = "Karras"
    allowed = ("automatic", "karras") if name == "DPM++ 2M" else ("automatic",)
    if schedule.lower() not in allowed:
        raise InvalidRequestError("scheduler", f"with {name} must be {' or '.join(a.capitalize() for a in allowed)} "
                                               f"(DPM++ 2M runs the Karras schedule only), got {schedule!r}")
    return SAMPLERS[name]


def parse(body: dict, svc, img2img: bool) -> dict:
    """A1111's body -> {"request": the common fields, "n", "seed", "prompt", "adapter", "scale", "inits"}."""
    if not isinstance(body, dict):
        raise InvalidRequestError("body", "must be a JSON object")
    try:  # every field's JSON type first: a list sampler_name or a string seed is a 400 naming it
        body = A1111Body.model_validate(body).model_dump(exclude_unset=True)
    except ValidationError as e:
        raise validation_error(e, A1111Body) from None
    context.check_finite(body)  # a NaN where the model takes any JSON (comments, script_args, ...): not echoable
    enable_hr = bool(body.get("enable_hr"))
    for key, value in body.items():
        if key in _OURS or key in _IGNORED:
            continue
        if key == "override_settings":
            _override_settings(value or {}, svc)
            continue
        if _HR.fullmatch(key):
            if enable_hr:
                raise InvalidRequestError("enable_hr", "hires fix is not supported: send enable_hr false")
            continue
        check = _ACCEPTED.get(key, _falsy)
        if not check(value):
            what = "is not supported" if key in _ACCEPTED else "is not a field this server implements"
            raise InvalidRequestError(key, f"{what}; accepted only at a value that leaves the image unchanged, "
                                           f"got {value!r}")
    prompt = body.get("prompt", "")
    text, adapter, scale = split_lora(prompt)
    if not text:
        raise InvalidRequestError("prompt", "must hold some text besides <lora:...> tags")
    negative = body.get("negative_prompt", "")
    batch = _number(body, "batch_size", 1, True)
    iters = _number(body, "n_iter", 1, True)
    if batch < 1 or iters < 1 or batch * iters > MAX_IMAGES:
        raise InvalidRequestError("n_iter" if iters < 1 <= batch else "batch_size",
                                  f"batch_size x n_iter must be in 1..{MAX_IMAGES}, got {batch} x {iters}")
    seed = _number(body, "seed", -1, True)
    if seed < -1 or seed > MAX_SEED:
        raise InvalidRequestError("seed", f"must be -1 (random) or in 0..{MAX_SEED}, got {seed}")
    scheduler = sampler(body)
    eta = _number(body, "eta", None)
    default = svc.pipe.preset.default_size
    request = {
        "prompt": text, "negative_prompt": negative if negative is not None else "",
        "num_inference_steps": _number(body, "steps", 20, True), "guidance_scale": _number(body, "cfg_scale", 7.0),
        "width": _number(body, "width", default, True), "height": _number(body, "height", default, True),
        "scheduler": scheduler, "eta": (eta or 0.0) if scheduler == "ddim" else 0.0,  # A1111: eta is DDIM's
    }
    if adapter is not None:
        request.update(adapter=adapter, lora_scale=scale)
    inits = []
    if img2img:
        inits = _init_images(body, request, batch, iters, svc.pipe.preset.size_range)
        request["strength"] = _number(body, "denoising_strength", 0.75)
    return {"request": request, "n": batch * iters, "seed": None if seed == -1 else seed, "prompt": prompt,
            "negative": negative or "", "inits": inits, "adapter": adapter, "scale": scale, "batch": batch}


def _init_images(body: dict, request: dict, batch: int, iters: int, size_range: tuple[int, int]) -> list:
    """`init_images`, decoded once: first their number (no more than the batch_size x n_iter images use),
    then every header (the sizes the preset allows), and only then their pixels, upright by EXIF."""
    from spo_runtime.imaging import load_rgb, open_image, shown_size

    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        raise InvalidRequestError("init_images", "must be a list of at least one base64 image")
    if len(images) > batch * iters:
        raise InvalidRequestError("init_images", f"{len(images)} images were sent, but batch_size x n_iter = "
                                                 f"{batch} x {iters} uses at most {batch * iters}: send no more")
    opened = []
    for i, v in enumerate(images):
        try:
            opened.append(open_image(v, size_range, request["width"], request["height"]))
        except ValueError as e:
            raise InvalidRequestError(f"init_images[{i}]", str(e)) from None
    if body.get("resize_mode") not in (None, 0) and any(shown_size(im) != (request["width"], request["height"])
                                                        for im in opened):
        raise InvalidRequestError("resize_mode", "only 0 (just resize) is supported when an init image is not "
                                                 f"{request['width']}x{request['height']}")
    inits = []
    for i, im in enumerate(opened):
        try:
            inits.append(load_rgb(im))
        except ValueError as e:
            raise InvalidRequestError(f"init_images[{i}]", str(e)) from None
    return inits


def _override_settings(value, svc) -> None:
    if not isinstance(value, dict):
        raise InvalidRequestError("override_settings", "must be an object")
    current = options_dict(svc)
    for k, v in value.items():
        if k not in current or current[k] != v:
            raise InvalidRequestError(f"override_settings.{k}", f"this server's options are read-only; accepted only "
                                                                f"at the current value ({current.get(k)!r}), got {v!r}")


# -- the answer ----------------------------------------------------------------------------------------


def _model_name(svc) -> str:
    return svc.pipe.preset.name


def _model_hash(svc) -> str:
    info = svc.pipe.info()
    h = ((info.get("sources") or {}).get("base_model") or {}).get("sha256") or ""
    return h[:10]


def infotext(parsed: dict, r, svc) -> str:
    req = r.request
    lines = [parsed["prompt"]]
    if parsed["negative"]:
        lines.append(f"Negative prompt: {parsed['negative']}")
    sampler_name = A1111_NAMES[req.scheduler]
    parts = [f"Steps: {req.num_inference_steps}", f"Sampler: {sampler_name}"]
    if req.scheduler == "dpmpp_2m_karras":
        parts.append("Schedule type: Karras")
    parts += [f"CFG scale: {req.guidance_scale:g}", f"Seed: {r.seed}", f"Size: {r.image.width}x{r.image.height}"]
    h = _model_hash(svc)
    if h:
        parts.append(f"Model hash: {h}")
    parts.append(f"Model: {_model_name(svc)}")
    if req.init_image is not None:
        parts.append(f"Denoising strength: {req.img2img_strength:g}")
    if req.scheduler == "ddim" and req.eta:
        parts.append(f"Eta DDIM: {req.eta:g}")
    if r.adapter and r.lora_scale:
        parts.append(f'Lora hashes: "{r.adapter}: {(r.adapter_sha256 or "")[:12]}"')
    parts.append("Version: spo-serve")
    lines.append(", ".join(parts))
    return "\n".join(lines)


def _png(image, text: str) -> str:
    from spo_runtime.imaging import encode_png

    return base64.b64encode(encode_png(image, text)).decode()


def _parse_raw(raw: bytes, svc, img2img: bool) -> tuple[dict, dict]:
    """(the JSON body, `parse` of it): in a worker thread, where an img2img body's images are decoded."""
    body = context.json_body(raw or b"{}")
    return body, parse(body, svc, img2img)


async def _generate(svc, request: Request, img2img: bool) -> Response:
    body, parsed = await anyio.to_thread.run_sync(_parse_raw, await request.body(), svc, img2img)
    base = parsed["request"]
    fields = [{**base, "init_image": im} for im in parsed["inits"]] or [base]  # image i % len(inits) for image i
    t0 = time.time()
    results = await context.run(svc, request, fields, parsed["n"], parsed["seed"])
    texts = [infotext(parsed, r, svc) for r in results]
    images = [] if body.get("send_images") is False else \
        await anyio.to_thread.run_sync(lambda: [_png(r.image, t) for r, t in zip(results, texts)])
    if img2img and body.get("include_init_images") and images:
        images += [v.split(",", 1)[1] if v.startswith("data:") else v for v in body["init_images"]]
    r0 = results[0]
    info = {
        "prompt": parsed["prompt"], "all_prompts": [parsed["prompt"]] * len(results),
        "negative_prompt": parsed["negative"], "all_negative_prompts": [parsed["negative"]] * len(results),
        "seed": r0.seed, "all_seeds": [r.seed for r in results], "subseed": r0.seed,
        "all_subseeds": [r.seed for r in results], "subseed_strength": 0,
        "width": r0.image.width, "height": r0.image.height, "sampler_name": A1111_NAMES[r0.request.scheduler],
        "cfg_scale": r0.request.guidance_scale, "steps": r0.request.num_inference_steps,
        "batch_size": parsed["batch"], "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": _model_name(svc), "sd_model_hash": _model_hash(svc), "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": r0.request.img2img_strength if img2img else None,
        "extra_generation_params": ({"Lora hashes": f"{r0.adapter}: {(r0.adapter_sha256 or '')[:12]}"}
                                    if r0.adapter and r0.lora_scale else {}),
        "index_of_first_image": 0, "infotexts": texts, "styles": [], "job_timestamp": time.strftime(
            "%Y%m%d%H%M%S", time.localtime(t0)), "clip_skip": 1, "is_using_inpainting_conditioning": False,
        "version": "spo-serve", "lora": {"adapter": r0.adapter, "scale": r0.lora_scale},
    }
    params = {**body, **({"init_images": None, "mask": None} if img2img else {})}
    return JSONResponse({"images": images, "parameters": params, "info": json.dumps(info)})


@guarded(GUARD)
async def txt2img(svc, request: Request) -> Response:
    return await _generate(svc, request, img2img=False)


@guarded(GUARD)
async def img2img(svc, request: Request) -> Response:
    return await _generate(svc, request, img2img=True)


# -- the read-only routes --------------------------------------------------------------------------


def _read(handler, ready: bool = True):
    """A read-only route: `handler(svc, request)`'s value as JSON, guarded as the generation routes."""

    async def answer(svc, request: Request) -> Response:
        return JSONResponse(await handler(svc, request))

    return guarded(GUARD, ready)(answer)


def options_dict(svc) -> dict:
    title = f"{_model_name(svc)} [{_model_hash(svc)}]" if _model_hash(svc) else _model_name(svc)
    return {"sd_model_checkpoint": title, "sd_checkpoint_hash": _model_hash(svc), "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0, "samples_format": "png", "enable_pnginfo": True,
            "sd_lora": svc.pipe.default_adapter or "None", "extra_networks_default_multiplier": 1.0}


async def sd_models(svc, request):
    h = _model_hash(svc)
    name = _model_name(svc)
    return [{"title": f"{name} [{h}]" if h else name, "model_name": name, "hash": h, "sha256": None,
             "filename": name, "config": None}]


async def samplers(svc, request):
    return [{"name": "DDIM", "aliases": ["ddim"], "options": {}},
            {"name": "Euler", "aliases": ["k_euler"], "options": {}},
            {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}}]


async def schedulers(svc, request):
    return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
            {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}]


async def loras(svc, request):
    return [{"name": a.name, "alias": a.name, "path": a.name, "metadata": {"sha256": (a.sha256 or "")[:16],
                                                                             "default": a.name == svc.pipe.default_adapter}}
            for a in svc.pipe.registry.adapters.values()]


async def options(svc, request):
    return options_dict(svc)


async def scripts(svc, request):
    return {"txt2img": [], "img2img": []}


def _oldest(engine):
    """The oldest running request, as the progress route reports it, or None."""
    o = engine.oldest_running()
    if o is None:
        return None
    sub = o.submission
    return {"step": o.step, "steps": o.steps, "sub": sub, "count": len(sub.requests), "index": o.index,
            "ewma": o.step_seconds, "t": sub.t_submit}


async def progress(svc, request):
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    idle = {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None,
            "current_task": None}
    if svc is None or svc.engine is None:
        return idle
    o = _oldest(svc.engine)
    if o is None:
        return idle
    done = o["step"] / max(1, o["steps"])
    state.update(job=f"request {o['sub'].id}", job_count=o["count"], job_no=o["index"], sampling_step=o["step"],
                 sampling_steps=o["steps"], interrupted=o["sub"].cancelled, job_timestamp=time.strftime(
                     "%Y%m%d%H%M%S", time.localtime(time.time() - (time.perf_counter() - o["t"]))))
    return {**idle, "progress": round(done, 4), "eta_relative": round((o["steps"] - o["step"]) * o["ewma"], 3),
            "state": state, "current_task": o["sub"].id}


async def interrupt(request: Request) -> Response:
    svc = context.bound()
    if svc is None or svc.engine is None:
        return a1_error(503, "the server is starting", headers={"Retry-After": "5"})
    if not context.credentials_ok(svc, request.headers, admin=True):
        return interrupt_unauthorized()
    o = _oldest(svc.engine)
    if o is not None:
        o["sub"].cancel()  # leaves the batch at the next step boundary; its caller gets a 499
    return JSONResponse({"interrupted": o["sub"].id if o else None})


ROUTES = [
    Route("/sdapi/v1/txt2img", txt2img, methods=["POST"]),
    Route("/sdapi/v1/img2img", img2img, methods=["POST"]),
    Route("/sdapi/v1/sd-models", _read(sd_models), methods=["GET"]),
    Route("/sdapi/v1/samplers", _read(samplers), methods=["GET"]),
    Route("/sdapi/v1/schedulers", _read(schedulers), methods=["GET"]),
    Route("/sdapi/v1/loras", _read(loras), methods=["GET"]),
    Route("/sdapi/v1/options", _read(options), methods=["GET"]),
    Route("/sdapi/v1/scripts", _read(scripts), methods=["GET"]),
    Route("/sdapi/v1/progress", _read(progress, ready=False), methods=["GET"]),  # idle while loading
    Route("/sdapi/v1/interrupt", interrupt, methods=["POST"]),
]
