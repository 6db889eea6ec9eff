"""Load test for a running spo-serve: a realistic mix of /generate, /generate_batch and (opt-in) admin calls.

    locust -f benchmarks/locustfile.py -H http://127.0.0.1:3000 -u 8 -r 2 -t 60s --headless \
        --csv benchmarks/out/load --html benchmarks/out/load.html
    make load URL=http://127.0.0.1:3000 USERS=8 TIME=60s     # the same, from the Makefile

The mix is set by options, never by editing this file (locust 2.x's --help prints before it imports this
file, so it does not list them; they are all here):

    --steps 10,20,30                         step counts, drawn uniformly
    --schedulers ddim,euler,dpmpp_2m_karras  schedulers, drawn uniformly
    --guidance 5                             guidance scales, drawn uniformly
    --lora-share 0.5 --lora-max 1.5          share of requests sending lora_scale (uniform in 0..max);
                                             the others send none and get the server's default
    --batch-share 0.1 --batch-n 2,4          share of /generate_batch calls and their n (uniform in min..max)
    --width W --height H                     image size; 0 (default) sends none: the server's default
    --format png --timeout-s 0               image format; server-side deadline (0: none sent)
    --prompts-file PATH                      one prompt per line (default benchmarks/prompts.txt)
    --wait 0.5,2                             think time per user between calls, seconds (min,max)
    --mix-seed N                             make each user's random draws reproducible
    --admin-token T --admin-share 0.02       POST /admin/lora_scale with 'Authorization: Bearer T' in that share
                                             of calls; off without a token. The default scale found at the
                                             start is restored at the end (--no-admin-restore to keep it)
    --openai-weight 1 --a1111-weight 1       weights of the OpenAI Images API user (POST /v1/images/generations)
                                             and the AUTOMATIC1111 user (POST /sdapi/v1/txt2img, <lora:...> tags)
                                             beside SPOUser's 8; 0 leaves that user out. Name classes to run
                                             only those: `locust -f ... SPOUser` is the native-API mix alone

Failures are grouped by kind, so locust's failure table (and *_failures.csv) tells overload from errors:
"429 queue full", "503 unavailable", "504 deadline", "connection error: ...", "<status> <error message>",
"bad body: ...".
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import sys
import typing
from pathlib import Path

from locust import HttpUser, between, events, task
from locust.runners import WorkerRunner

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root: the request schema is the server's own
from service.schemas import generation_bodies  # noqa: E402
from spo_runtime.limits import MAX_IMAGES  # noqa: E402
from spo_runtime.requests import MAX_SEED, SIZE_RANGE, GenerationRequest  # noqa: E402

log = logging.getLogger("spo_load")
SCHEDULERS = typing.get_args(GenerationRequest.model_fields["scheduler"].annotation)
# every body this file sends is checked against the server's schema (the widest size range: the
# server's preset may still refuse a size, which the failure table then shows)
GENERATE, GENERATE_BATCH, _ = generation_bodies(SIZE_RANGE)
_user_ids = itertools.count()
_prompts: list[str] = []
_admin_initial: dict = {}


@events.init_command_line_parser.add_listener
def _add_arguments(parser):
    g = parser  # not an argument group: only the parser itself takes locust's is_secret / include_in_web_ui
    g.add_argument("--prompts-file", type=str, default=str(HERE / "prompts.txt"), help="one prompt per line")
    g.add_argument("--steps", type=str, default="10,20,30", help="comma-separated num_inference_steps, drawn uniformly")
    g.add_argument("--schedulers", type=str, default=",".join(SCHEDULERS), help="comma-separated schedulers")
    g.add_argument("--guidance", type=str, default="5", help="comma-separated guidance scales")
    g.add_argument("--lora-share", type=float, default=0.5, help="share of requests that send a lora_scale")
    g.add_argument("--lora-max", type=float, default=1.5, help="lora_scale is uniform in 0..this")
    g.add_argument("--batch-share", type=float, default=0.1, help="share of calls that go to /generate_batch")
    g.add_argument("--batch-n", type=str, default="2,4", help="n of /generate_batch: min,max")
    g.add_argument("--width", type=int, default=0, help="image width; 0 lets the server pick")
    g.add_argument("--height", type=int, default=0, help="image height; 0 lets the server pick")
    g.add_argument("--format", type=str, default="png", choices=["png", "jpeg", "webp"], help="image format")
    g.add_argument("--timeout-s", type=float, default=0.0, help="server-side deadline timeout_s; 0 sends none")
    g.add_argument("--request-timeout", type=float, default=600.0, help="client-side HTTP timeout, seconds")
    g.add_argument("--wait", type=str, default="0.5,2", help="think time between calls: min,max seconds")
    g.add_argument("--mix-seed", type=int, default=None, help="seed the random mix (per user) for reproducibility")
    g.add_argument("--admin-token", type=str, default="", is_secret=True,
                   help="bearer token for POST /admin/lora_scale; admin calls are off without it")
    g.add_argument("--admin-share", type=float, default=0.02, help="share of calls that change the default LoRA scale")
    g.add_argument("--no-admin-restore", action="store_true", default=False,
                   help="keep the last default LoRA scale set by the test instead of restoring the initial one")
    g.add_argument("--openai-weight", type=int, default=1, help="weight of OpenAIUser (SPOUser: 8); 0 leaves it out")
    g.add_argument("--a1111-weight", type=int, default=1, help="weight of A1111User (SPOUser: 8); 0 leaves it out")


def _floats(text: str) -> list[float]:
    return [float(x) for x in str(text).split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def _load_prompts(path: str) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line expected)")
    return prompts


@events.init.add_listener
def _on_init(environment, **_):
    opts = environment.parsed_options
    if opts is None:  # imported by a tool, not run by locust
        return
    _prompts[:] = _load_prompts(opts.prompts_file)
    # fail early, before any user starts, on a malformed mix
    for name, parse in (("steps", _ints), ("guidance", _floats), ("batch_n", _ints), ("wait", _floats)):
        if not parse(getattr(opts, name)):
            raise ValueError(f"--{name.replace('_', '-')}: empty")
    unknown = set(opts.schedulers.split(",")) - set(SCHEDULERS)
    if unknown:
        raise ValueError(f"--schedulers: unknown {sorted(unknown)}; known {list(SCHEDULERS)}")
    OpenAIUser.weight, A1111User.weight = max(0, opts.openai_weight), max(0, opts.a1111_weight)
    dropped = {c for c in (OpenAIUser, A1111User) if c.weight == 0}
    if dropped and environment.user_classes:
        environment.user_classes = [c for c in environment.user_classes if c not in dropped]
        environment.user_classes_by_name = {c.__name__: c for c in environment.user_classes}


def _admin_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@events.test_start.add_listener
def _remember_scale(environment, **_):
    opts = environment.parsed_options
    if not opts or not opts.admin_token or opts.no_admin_restore or isinstance(environment.runner, WorkerRunner):
        return
    import requests

    try:
        r = requests.get(environment.host.rstrip("/") + "/admin/adapters", headers=_admin_headers(opts.admin_token), timeout=10)
        r.raise_for_status()
        _admin_initial["scale"] = float(r.json()["default_lora_scale"])
    except Exception as e:  # the load test still runs; only the restore is skipped
        log.warning("could not read the default LoRA scale (%s); it will not be restored", e)


@events.test_stop.add_listener
def _restore_scale(environment, **_):
    opts = environment.parsed_options
    if "scale" not in _admin_initial or isinstance(environment.runner, WorkerRunner):
        return
    import requests

    try:
        r = requests.post(environment.host.rstrip("/") + "/admin/lora_scale", json={"scale": _admin_initial["scale"]},
                          headers=_admin_headers(opts.admin_token), timeout=30)
        r.raise_for_status()
        log.info("default LoRA scale restored to %s", _admin_initial["scale"])
    except Exception as e:
        log.warning("could not restore the default LoRA scale to %s: %s", _admin_initial["scale"], e)


def _classify(resp) -> str | None:
    """None when the status is 200, else the failure kind locust groups by."""
    code = resp.status_code
    if code == 200:
        return None
    if code == 429:
        return "429 queue full"
    if code == 503:
        return "503 unavailable"
    if code == 504:
        return "504 deadline"
    if code == 0:
        return f"connection error: {type(resp.error).__name__}" if resp.error is not None else "connection error"
    try:
        message = str(resp.json().get("error", ""))[:120]
    except (ValueError, AttributeError):
        message = (resp.text or "")[:120]
    return f"{code} {message}".strip()


class SPOUser(HttpUser):
    """One client: mostly single images, some batches, rare admin scale changes (with a token only)."""

    weight = 8
    wait_time = between(0.5, 2.0)  # replaced by --wait in on_start

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.o = o
        uid = next(_user_ids)
        self.rng = random.Random(None if o.mix_seed is None else o.mix_seed * 100_003 + uid)
        lo, hi = (_floats(o.wait) * 2)[:2]
        self.wait_time = lambda: self.rng.uniform(min(lo, hi), max(lo, hi))
        self.steps = _ints(o.steps)
        self.schedulers = [s.strip() for s in o.schedulers.split(",") if s.strip()]
        self.guidance = _floats(o.guidance)
        n = _ints(o.batch_n)
        self.batch_n = (min(n), max(n))
        self.prompts = _prompts or _load_prompts(o.prompts_file)

    def _body(self) -> dict:
        o, rng = self.o, self.rng
        body = {
            "prompt": rng.choice(self.prompts),
            "seed": rng.randrange(0, MAX_SEED - MAX_IMAGES + 2),  # leaves room for /generate_batch's seed..seed+n-1
            "num_inference_steps": rng.choice(self.steps),
            "scheduler": rng.choice(self.schedulers),
            "guidance_scale": rng.choice(self.guidance),
            "format": o.format,
        }
        if rng.random() < o.lora_share:
            body["lora_scale"] = round(rng.uniform(0.0, o.lora_max), 3)
        if o.width:
            body["width"] = o.width
        if o.height:
            body["height"] = o.height
        if o.timeout_s > 0:
            body["timeout_s"] = o.timeout_s
        return body

    def _checked(self, model, body: dict) -> dict:
        try:
            model.model_validate_json(json.dumps(body))
        except ValueError as e:  # pydantic's ValidationError
            raise ValueError(f"the load mix built a body outside the request schema: {e}") from None
        return body

    @task
    def mixed(self) -> None:
        o, x = self.o, self.rng.random()
        if o.admin_token and x < o.admin_share:
            self.set_scale()
        elif x < (o.admin_share if o.admin_token else 0.0) + o.batch_share:
            self.generate_batch()
        else:
            self.generate()

    def generate(self) -> None:
        with self.client.post("/generate", json=self._checked(GENERATE, self._body()), name="/generate", catch_response=True,
                              timeout=self.o.request_timeout) as resp:
            kind = _classify(resp)
            if kind is None and not resp.headers.get("content-type", "").startswith("image/"):
                kind = f"bad body: content-type {resp.headers.get('content-type')!r}"
            resp.failure(kind) if kind else resp.success()

    def generate_batch(self) -> None:
        body = self._checked(GENERATE_BATCH, {**self._body(), "n": self.rng.randint(*self.batch_n)})
        with self.client.post("/generate_batch", json=body, name="/generate_batch", catch_response=True,
                              timeout=self.o.request_timeout) as resp:
            kind = _classify(resp)
            if kind is None:
                try:
                    got = len(resp.json()["images"])
                    if got != body["n"]:
                        kind = f"bad body: {got} images for n={body['n']}"
                except (ValueError, KeyError, TypeError, json.JSONDecodeError):
                    kind = "bad body: not the batch JSON"
            resp.failure(kind) if kind else resp.success()

    def set_scale(self) -> None:
        scale = round(self.rng.uniform(0.0, self.o.lora_max), 3)
        with self.client.post("/admin/lora_scale", json={"scale": scale}, headers=_admin_headers(self.o.admin_token),
                              name="/admin/lora_scale", catch_response=True, timeout=60) as resp:
            kind = _classify(resp)
            if kind is None:
                try:
                    if abs(float(resp.json()["scale"]) - scale) > 1e-9:
                        kind = f"bad body: scale {resp.json()['scale']} != {scale}"
                except (ValueError, KeyError, TypeError):
                    kind = "bad body: not the scale JSON"
            resp.failure(kind) if kind else resp.success()


class _CompatUser(SPOUser):
    """A client of another API, drawing its requests from the same mix (steps, schedulers, guidance, LoRA
    share, size, prompts, seeds): the server maps each onto the one request model."""

    abstract = True
    weight = 1

    def _result(self, resp, count: int, key: str) -> None:
        kind = _classify(resp)
        if kind is not None and kind[:3].isdigit() and resp.status_code not in (429, 503, 504):
            try:  # OpenAI's {"error": {"message"}} and A1111's {"detail"} instead of our {"error"}
                data = resp.json()
                message = data["error"]["message"] if isinstance(data.get("error"), dict) else data.get("detail")
                kind = f"{resp.status_code} {str(message)[:120]}"
            except (ValueError, KeyError, TypeError, AttributeError):
                pass
        if kind is None:
            try:
                got = len(resp.json()[key])
                if got != count:
                    kind = f"bad body: {got} images for {count}"
            except (ValueError, KeyError, TypeError):
                kind = f"bad body: no {key!r} list"
        resp.failure(kind) if kind else resp.success()


class OpenAIUser(_CompatUser):
    """The OpenAI Images API, as the `openai` SDK sends it: POST /v1/images/generations (b64_json)."""

    @task
    def mixed(self) -> None:
        body, n = self._body(), 1
        if self.rng.random() < self.o.batch_share:
            n = self.rng.randint(*self.batch_n)
        req = {"model": "dall-e-3", "prompt": body["prompt"], "n": n, "response_format": "b64_json",
               "seed": body["seed"], "num_inference_steps": body["num_inference_steps"]}  # the last two: ours
        if self.o.width and self.o.height:
            req["size"] = f"{self.o.width}x{self.o.height}"
        if self.o.format != "png":
            req["output_format"] = self.o.format
        with self.client.post("/v1/images/generations", json=req, name="/v1/images/generations", catch_response=True,
                              timeout=self.o.request_timeout) as resp:
            self._result(resp, n, "data")


A1111_SAMPLERS = {"ddim": ("DDIM", "automatic"), "euler": ("Euler", "automatic"), "dpmpp_2m_karras": ("DPM++ 2M", "Karras")}


class A1111User(_CompatUser):
    """The AUTOMATIC1111 API, as webuiapi sends it: POST /sdapi/v1/txt2img with A1111's defaults and a
    `<lora:NAME:SCALE>` tag (the server's default adapter, read once from /sdapi/v1/loras) in the LoRA share."""

    def on_start(self) -> None:
        super().on_start()
        self.lora = None
        with self.client.get("/sdapi/v1/loras", name="/sdapi/v1/loras", catch_response=True, timeout=60) as resp:
            try:
                loras = resp.json()
                self.lora = next((x["name"] for x in loras if x.get("metadata", {}).get("default")), None)
                resp.success()
            except (ValueError, KeyError, TypeError, AttributeError):
                resp.failure("bad body: not the loras list")

    @task
    def mixed(self) -> None:
        body = self._body()
        sampler, schedule = A1111_SAMPLERS[body["scheduler"]]
        prompt = body["prompt"]
        if "lora_scale" in body and self.lora:
            prompt += f" <lora:{self.lora}:{body['lora_scale']}>"
        batch = self.rng.randint(*self.batch_n) if self.rng.random() < self.o.batch_share else 1
        req = {"prompt": prompt, "negative_prompt": "", "seed": body["seed"], "steps": body["num_inference_steps"],
               "cfg_scale": body["guidance_scale"], "sampler_name": sampler, "scheduler": schedule, "batch_size": batch,
               "n_iter": 1, "eta": 0, "enable_hr": False, "hr_scale": 2, "denoising_strength": 0.7, "styles": [],
               "subseed": -1, "subseed_strength": 0, "restore_faces": False, "tiling": False, "s_noise": 1,
               "override_settings": {}, "send_images": True, "save_images": False, "alwayson_scripts": {}}
        if self.o.width:
            req["width"] = self.o.width
        if self.o.height:
            req["height"] = self.o.height
        with self.client.post("/sdapi/v1/txt2img", json=req, name="/sdapi/v1/txt2img", catch_response=True,
                              timeout=self.o.request_timeout) as resp:
            self._result(resp, batch, "images")
