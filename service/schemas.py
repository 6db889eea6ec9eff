"""HTTP bodies: the generation bodies derived from the one request model, the admin, training and
evaluation bodies, the batch response and the error body, and what /docs.json declares for each route."""

from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, field_validator, model_validator

from spo_runtime.errors import InvalidRequestError
from spo_runtime.imaging import FORMATS
from spo_runtime.limits import ADAPTER_NAME, ADAPTER_NAME_RULE, LORA_SCALE_RANGE, MAX_IMAGES, MAX_SEED
from spo_runtime.requests import GenerationRequest

Format = Literal[tuple(FORMATS)]  # type: ignore[valid-type]


class OutputFields(BaseModel):
    """What the HTTP routes add to a generation request: how to encode the answer and how long to wait."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    format: Format = Field("png", description="Encoding of the image(s).")
    quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality, 1..100 (ignored for PNG).")
    timeout_s: float | None = Field(
        None, gt=0, le=3600, allow_inf_nan=False,
        description="Deadline in seconds, (0, 3600], capped by SPO_REQUEST_TIMEOUT_S; past it the answer is 504.")


class Bodies(NamedTuple):
    """The generation bodies of one size range (the served preset's)."""

    generate: type[BaseModel]
    batch: type[BaseModel]
    stream: type[BaseModel]


def generation_bodies(size_range: tuple[int, int]) -> Bodies:
    """(/generate's body, /generate_batch's, /generate/stream's) for a preset's size range: the request model
    plus the output fields; the batch body adds `n`, the stream body `preview`. Each knows its request
    model (`request_model`), which `core_request` builds."""
    request = GenerationRequest.for_sizes(*size_range)
    fields = {name: (f.annotation, f) for name, f in OutputFields.model_fields.items()}
    single = create_model("GenerateBody", __base__=request, __module__=__name__, __doc__="Body of POST /generate.",
                          **fields)
    batch = create_model(
        "GenerateBatchBody", __base__=single, __module__=__name__,
        __doc__=f"Body of POST /generate_batch: n images of one prompt with seeds seed..seed+n-1 "
                f"(seed + n - 1 must stay <= {MAX_SEED}: a 400 naming `seed`).",
        __validators__={"_seed_room": model_validator(mode="after")(_seed_room)},
        n=(int, Field(1, ge=1, le=MAX_IMAGES, description=f"Images, 1..{MAX_IMAGES}.")))
    stream = create_model(
        "GenerateStreamBody", __base__=single, __module__=__name__,
        __doc__="Body of POST /generate/stream: /generate's, answered as Server-Sent Events.",
        preview=(bool, Field(False, description="Each `step` event carries a small PNG of the latent (a fixed "
                                                "linear latent-to-RGB map, no VAE call).")))
    single.request_model = request  # inherited by the batch and stream bodies
    return Bodies(single, batch, stream)


def _as_sent(cls, v: Any) -> Any:
    if v is not None and not isinstance(v, str):
        raise ValueError(f"must be a base64 string (PNG, JPEG or WebP), got {type(v).__name__}")
    return v


def framework_spec(body: type[BaseModel]) -> type[BaseModel]:
    """`body` as BentoML's `input_spec`: the same fields, bounds and JSON schema, but init_image stays the
    string it arrives as. The door has validated the body and decoded the image once; the route takes the
    door's parsed body, so the framework's own validation must not decode it a second time."""
    return create_model(body.__name__, __base__=body, __module__=body.__module__, __doc__=body.__doc__,
                        __validators__={"_init_image": field_validator("init_image", mode="plain")(_as_sent)})


def result_fields(rid: str, r) -> dict:
    """What the X-* headers of a generation answer say, typed (the stream's `done` event carries them)."""
    t = r.timings
    return {
        "request_id": rid, "seed": r.seed, "lora_scale": float(r.lora_scale), "adapter": r.adapter or "",
        "adapter_sha256": (r.adapter_sha256 or "")[:16], "prompt_truncated": bool(r.prompt_truncated),
        "queue_ms": round(t.get("queue_ms", 0.0), 1),
        "inference_ms": round(t.get("encode_ms", 0.0) + t.get("denoise_ms", 0.0) + t.get("decode_ms", 0.0), 1),
        **(_selection_fields(r.selection) if getattr(r, "selection", None) is not None else {}),
    }


def _selection_fields(sel) -> dict:
    """best_of > 1: how many candidates ran, the chosen one's score, and the search (headers and the stream)."""
    return {"best_of": sel.best_of, "preference_score": sel.score, **({"search": sel.search} if sel.search else {})}


def result_headers(rid: str, r) -> dict[str, str]:
    f = result_fields(rid, r)
    return {
        "X-Request-Id": rid,
        "X-Seed": str(f["seed"]),
        "X-Lora-Scale": repr(f["lora_scale"]),
        "X-Adapter": f["adapter"],
        "X-Adapter-Sha256": f["adapter_sha256"],
        "X-Prompt-Truncated": "true" if f["prompt_truncated"] else "false",
        "X-Queue-Ms": f"{f['queue_ms']:.1f}",
        "X-Inference-Ms": f"{f['inference_ms']:.1f}",
        **({"X-Best-Of": str(f["best_of"]), "X-Preference-Score": repr(float(f["preference_score"]))}
           if "best_of" in f else {}),
        **({"X-Search": f["search"]} if "search" in f else {}),
    }


def _seed_room(body):
    k = body.best_of  # image i's candidates use seeds seed + i*k .. seed + i*k + k - 1
    if body.seed is not None and body.seed + body.n * k - 1 > MAX_SEED:
        raise ValueError(f"seed: with n={body.n}{f' and best_of={k}' if k > 1 else ''} must be in "
                         f"0..{MAX_SEED - body.n * k + 1} (seeds seed..seed+n{'*best_of' if k > 1 else ''}-1), "
                         f"got {body.seed}")
    return body


def request_dict(body: BaseModel) -> dict:
    """The core request of a generation body: only the request model's fields (not the output fields, `n`
    or `preview`), unset optionals dropped (an absent negative prompt stays None: SDXL's zero embedding)."""
    out = body.model_dump(include=set(GenerationRequest.model_fields))
    return {k: v for k, v in out.items() if v is not None or k == "negative_prompt"}


def core_request(body: BaseModel) -> GenerationRequest:
    """The GenerationRequest of a validated generation body, without validating again (the body's class is
    the request model plus output fields, so its values are the request's): the engine takes it as is."""
    fields = request_dict(body)
    return type(body).request_model.model_construct(_fields_set=set(fields), **fields)


def check_adapter_name(field: str, name: str) -> str:
    """An adapter name a route will write under SPO_ADAPTER_DIR or the admin state: InvalidRequestError otherwise."""
    if not ADAPTER_NAME.fullmatch(name):  # fullmatch: `$` alone would let "name\n" through
        raise InvalidRequestError(field, f"must be {ADAPTER_NAME_RULE}")
    return name


# -- admin and training bodies ---------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ScaleBody(_Strict):
    scale: float = Field(ge=LORA_SCALE_RANGE[0], le=LORA_SCALE_RANGE[1], allow_inf_nan=False)


class NameBody(_Strict):
    name: str | None = Field(max_length=64)


MAX_PATH = 1024  # a relative file name under SPO_ADAPTER_DIR / SPO_DATA_DIR


class TrainSubmitBody(_Strict):
    prompts: list[str] | None = None
    prompts_file: str | None = Field(None, max_length=MAX_PATH)
    config: dict[str, Any] = {}
    start_adapter: str | None = Field(None, max_length=MAX_PATH)
    output_adapter: str | None = Field(None, max_length=64)


class JobBody(_Strict):
    job_id: str = Field(max_length=64)


class EvalEntryBody(_Strict):
    adapter: str = Field(max_length=MAX_PATH)  # "none", a loaded adapter's name, or a .safetensors file
    scale: float | None = Field(None, allow_inf_nan=False)  # default: the server's default scale


class EvalSubmitBody(_Strict):
    """Body of POST /eval/submit; counts and ranges are checked by the route, naming the entry."""

    prompts: list[str] | None = None
    prompts_file: str | None = Field(None, max_length=MAX_PATH)
    adapters: list[EvalEntryBody]
    seeds: list[int] = [0]
    scorer: str = Field("spm", max_length=32)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = Field(None, max_length=32)
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None


class LoadBody(_Strict):
    name: str = Field(max_length=64)
    file: str = Field(max_length=MAX_PATH)
    replace: bool = False


# -- the AUTOMATIC1111 body (service/a1111.py) -------------------------------------------------


def _integral(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v  # 20.0 is 20; 1.5, "20" and true are not


Integer = Annotated[int, BeforeValidator(_integral)]
Number = Annotated[float, Field(allow_inf_nan=False)]  # an int or a float, finite; not "0.5" nor true
Text = str | None
Flag = bool | None


class A1111Body(BaseModel):
    """The JSON types of A1111's txt2img/img2img fields (its StableDiffusionProcessing API models), strict:
    a field of another type is a 400 naming it before any value is read. Only types here: which values are
    accepted (ranges, the fields accepted only at values that leave the image alone) is service/a1111.py's.
    Fields A1111 does not have are allowed through (a1111.py refuses those set to a value that matters)."""

    model_config = ConfigDict(extra="allow", strict=True)

    prompt: str = ""
    negative_prompt: Text = None
    styles: list[str] | None = None
    seed: Integer | None = None
    subseed: Integer | None = None
    subseed_strength: Number | None = None
    seed_resize_from_h: Integer | None = None
    seed_resize_from_w: Integer | None = None
    seed_enable_extras: Flag = None
    sampler_name: Text = None
    sampler_index: Text = None
    scheduler: Text = None
    batch_size: Integer | None = None
    n_iter: Integer | None = None
    steps: Integer | None = None
    cfg_scale: Number | None = None
    image_cfg_scale: Number | None = None
    width: Integer | None = None
    height: Integer | None = None
    restore_faces: Flag = None
    tiling: Flag = None
    do_not_save_samples: Flag = None
    do_not_save_grid: Flag = None
    eta: Number | None = None
    denoising_strength: Number | None = None
    s_min_uncond: Number | None = None
    s_churn: Number | None = None
    s_tmax: Number | None = None
    s_tmin: Number | None = None
    s_noise: Number | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: Flag = None
    refiner_checkpoint: Text = None
    refiner_switch_at: Number | None = None
    disable_extra_networks: Flag = None
    firstpass_image: Text = None
    comments: dict[str, Any] | None = None
    enable_hr: Flag = None
    firstphase_width: Integer | None = None
    firstphase_height: Integer | None = None
    hr_scale: Number | None = None
    hr_upscaler: Text = None
    hr_second_pass_steps: Integer | None = None
    hr_resize_x: Integer | None = None
    hr_resize_y: Integer | None = None
    hr_checkpoint_name: Text = None
    hr_sampler_name: Text = None
    hr_scheduler: Text = None
    hr_prompt: Text = None
    hr_negative_prompt: Text = None
    force_task_id: Text = None
    script_name: Text = None
    script_args: list[Any] | None = None
    send_images: Flag = None
    save_images: Flag = None
    alwayson_scripts: dict[str, Any] | None = None
    infotext: Text = None
    extra_generation_params: dict[str, Any] | None = None
    ddim_discretize: Text = None
    do_not_reload_embeddings: Flag = None
    user: Text = None
    # img2img
    init_images: list[str] | None = None
    resize_mode: Integer | None = None
    initial_noise_multiplier: Number | None = None
    mask: Text = None
    latent_mask: Text = None
    mask_blur: Integer | None = None
    mask_blur_x: Integer | None = None
    mask_blur_y: Integer | None = None
    mask_round: Flag = None
    inpainting_fill: Integer | None = None
    inpaint_full_res: Flag = None
    inpaint_full_res_padding: Integer | None = None
    inpainting_mask_invert: Integer | None = None
    include_init_images: Flag = None


# -- responses -------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    loc: list[str | int] = Field(description="Where: the field's name (or 'body', 'authorization', ...).")
    msg: str = Field(description="What is wrong and what is allowed.")
    type: str


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer of every route, ours or the framework's."""

    error: str = Field(description="One line: the field, what is wrong, what is allowed.")
    status: int
    detail: list[ErrorDetail]


class BranchInfo(BaseModel):
    step: int = Field(description="Steps done when the candidates were scored.")
    timestep: float = Field(description="The timestep their clean-image estimates were scored at.")
    scores: list[float] = Field(description="Every candidate's score, candidate order.")
    chosen: int = Field(description="The candidate that seeded the next segment.")


class PreferenceInfo(BaseModel):
    """How best_of chose the image (present only with best_of > 1)."""

    best_of: int
    index: int = Field(description="The chosen candidate (0-based).")
    score: float = Field(description="Its preference score (X-Preference-Score).")
    scores: list[float] = Field(description="Every candidate's score of its finished image, candidate order.")
    seeds: list[int] = Field(description="Every candidate's seed (image i's: seed + i*best_of + candidate).")
    search: Literal["step"] | None
    branches: list[BranchInfo] = Field(description="search \"step\": its branch points, in order.")


class BatchImage(BaseModel):
    seed: int
    format: Format
    image: str = Field(description="base64 of the encoded image")
    preference: PreferenceInfo | None = Field(None, description="best_of > 1 only: every candidate's score.")


class BatchResponse(BaseModel):
    images: list[BatchImage]
    seeds: list[int]
    lora_scale: float
    adapter: str | None
    adapter_sha256: str
    prompt_truncated: bool
    timings_ms: dict[str, float]
    request_id: str


ERROR_STATUSES = {
    400: "Invalid request (or a body over 64 KiB): the body names the field and the allowed range.",
    415: "The body is not JSON (Content-Type must be application/json).",
    429: "Queue full (SPO_MAX_QUEUE): retry after Retry-After seconds.",
    499: "The client disconnected; the request left the batch.",
    500: "Internal error (a non-finite image, or a bug: see the server log).",
    503: "Not ready, stopping, or a step failed on the device: retry after Retry-After seconds.",
    504: "The request's deadline (timeout_s, SPO_REQUEST_TIMEOUT_S) passed.",
}


def declare_responses(doc: dict, routes: dict[str, tuple[list[str], type[BaseModel] | None]],
                      stream: type[BaseModel] | None = None) -> dict:
    """BentoML's OpenAPI document (as JSON) with, for each generation route, its 200 media types and
    the error body of every status it can answer. BentoML builds the document anew on every GET
    /docs.json and declares only its own three error schemas, so the door middleware applies this."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorDetail, ErrorBody, BranchInfo, PreferenceInfo, BatchImage, BatchResponse):
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        schemas[model.__name__] = js
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    retry = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    for route, (media, model) in routes.items():
        post = doc["paths"][route]["post"]
        body = {"$ref": f"#/components/schemas/{model.__name__}"} if model else {"type": "string", "format": "binary"}
        ok = {"description": "Success; parameters and timings in the X-* headers.",
              "content": {m: {"schema": body} for m in media}}
        post["responses"] = {"200": ok, **{str(code): {**error, "description": text, **({"headers": retry} if code in (429, 503) else {})}
                                           for code, text in ERROR_STATUSES.items()}}
    if stream is not None:  # a route of the mounted app, which BentoML's document leaves out
        doc["paths"]["/generate/stream"] = {"post": {
            "description": "/generate's request answered as Server-Sent Events: queued, one step per denoising step, "
                           "then done (the image and the X-* fields) or error (the error body).",
            "requestBody": {"required": True, "content": {"application/json": {"schema": stream.model_json_schema()}}},
            "responses": {"200": {"description": "text/event-stream of queued, step, done | error events",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                          **{str(code): {**error, "description": text} for code, text in ERROR_STATUSES.items()}},
        }}
    doc["paths"].update(_compat_paths())
    return _openapi30(doc)


def _compat_paths() -> dict:
    """The OpenAI Images API and AUTOMATIC1111 routes (service/openai_api.py, service/a1111.py), declared
    briefly: their bodies are those APIs' own; errors have each API's shape."""
    obj = {"type": "object", "additionalProperties": True}
    oa_err = {"description": "OpenAI's error shape", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"error": {"type": "object", "properties": {
            k: {"type": "string", "nullable": True} for k in ("message", "type", "param", "code")}}}}}}}
    a1_err = {"description": "A1111's error shape (error, detail, body, errors) and the field",
              "content": {"application/json": {"schema": obj}}}

    def op(summary: str, tag: str, body: str | None = None, ok: str = "application/json", params=None) -> dict:
        out = {"summary": summary, "tags": [tag],
               "responses": {"200": {"description": "Success", "content": {ok: {"schema": obj if ok.endswith("json")
                                                                                    else {"type": "string", "format": "binary"}}}},
                             "default": oa_err if tag == "OpenAI" else a1_err}}
        if body:
            out["requestBody"] = {"required": True, "content": {body: {"schema": obj}}}
        if params:
            out["parameters"] = params
        return out

    file_id = [{"name": "file_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}]
    return {
        "/v1/images/generations": {"post": op("OpenAI Images API: text to image (n, size, response_format b64_json | url)",
                                              "OpenAI", "application/json")},
        "/v1/images/edits": {"post": op("OpenAI Images API: image edit as img2img at strength 0.75 (masks refused)",
                                        "OpenAI", "multipart/form-data")},
        "/v1/images/files/{file_id}": {"get": op("A `url` result, for SPO_IMAGE_TTL_S", "OpenAI", ok="image/png",
                                                 params=file_id)},
        "/v1/models": {"get": op("The served model", "OpenAI")},
        "/sdapi/v1/txt2img": {"post": op("A1111 txt2img; <lora:NAME:SCALE> in the prompt", "A1111", "application/json")},
        "/sdapi/v1/img2img": {"post": op("A1111 img2img (init_images, denoising_strength)", "A1111", "application/json")},
        **{f"/sdapi/v1/{name}": {"get": op(f"A1111 {name}", "A1111")}
           for name in ("sd-models", "samplers", "schedulers", "loras", "options", "scripts", "progress")},
        "/sdapi/v1/interrupt": {"post": op("A1111 interrupt: cancels the oldest running request (admin token)", "A1111")},
    }


def _openapi30(node):
    """The document says OpenAPI 3.0, whose exclusiveMinimum/Maximum are booleans beside minimum/maximum;
    pydantic writes JSON Schema 2020-12's numbers. Rewrite them (in place) so validators accept the document."""
    if isinstance(node, dict):
        for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
                node[plain], node[bound] = node[bound], True
        for value in node.values():
            _openapi30(value)
    elif isinstance(node, list):
        for value in node:
            _openapi30(value)
    return node
