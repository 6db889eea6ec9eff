"""One typed `Settings` for every SPO_* environment variable (docs/configuration.md's table is generated from it).

Read once at start (`Settings.from_env()`) and passed down explicitly: the model loader, the engine, the
service, the admin store and the training supervisor take their values from this object, never from
`os.environ`. A bad variable raises `ConfigError` naming the variable and the allowed values; the
server turns that into one line on stderr and exit status 2.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from spo_runtime.errors import ConfigError
from spo_runtime.limits import LORA_SCALE_RANGE
from spo_runtime.faults import Faults

log = logging.getLogger("spo_runtime.settings")

# Fields whose variable is not simply SPO_<FIELD>
ENV_NAMES = {"embed_cache_size": "SPO_EMBED_CACHE"}
# SPO_* variables read by something other than this object (tools, benchmarks, later features): no warning
SECRETS = {"admin_token", "api_token"}
OTHER_VARIABLES = {"SPO_BENCH_MAX_BATCH", "SPO_BENCH_MAX_LATENCY_MS"}
_REVISION = r"^[A-Za-z0-9][A-Za-z0-9_./-]*$"  # a hub revision: commit id, tag or branch


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- the model ---------------------------------------------------------------------------
    model: Literal["auto", "sdxl-spo", "sdxl-random", "tiny"] = Field(
        "auto", description="preset: auto, sdxl-spo, sdxl-random or tiny (docs/configuration.md, Presets); auto: "
                            "sdxl-spo when CUDA is available, else tiny (logged in one line at start-up)")
    base_model: str | None = Field(
        None, description="hub id, local diffusers SDXL pipeline directory (full or fp16-variant files), or a single "
                          "SDXL checkpoint (.safetensors); unset: the preset's (pinned in spo_runtime/model/weights.py)")
    base_model_config: str | None = Field(
        None, description="for a single-file SPO_BASE_MODEL: a local diffusers SDXL pipeline directory without weights "
                          "(model_index.json, the components' configs, tokenizers, scheduler) to read the structure "
                          "from, offline; unset: SDXL base 1.0's configs at their pinned revision")
    vae: str | None = Field(
        None, description="hub id or local AutoencoderKL directory; `base`: the base pipeline's own VAE (upcast to fp32 "
                          "in fp16 when its config asks); unset: the preset's (sdxl-spo: the fp16-fix VAE, whatever "
                          "SPO_BASE_MODEL is)")
    lora: str | None = Field(None, description="LoRA file in any layout docs/api.md lists, .safetensors only; unset: "
                                               "the preset's")
    # Hub revisions: spo_runtime/model/weights.py pins each part; these override a pin on purpose.
    base_revision: str | None = Field(
        None, pattern=_REVISION, max_length=255, description="hub revision (commit, tag or branch) of the base model: of SPO_BASE_MODEL's "
                                             "hub repository, or of the preset's; unset: the pin")
    vae_revision: str | None = Field(None, pattern=_REVISION, max_length=255, description="hub revision of the VAE (SPO_VAE's hub "
                                                                          "repository, or the preset's); unset: the pin")
    lora_revision: str | None = Field(None, pattern=_REVISION, max_length=255, description="hub revision of the preset's SPO LoRA; "
                                                                            "unset: the pin")
    spm_revision: str | None = Field(None, pattern=_REVISION, max_length=255, description="hub revision of the step-aware preference "
                                                                          "model (training); unset: the pin")
    spm_tokenizer_revision: str | None = Field(None, pattern=_REVISION, max_length=255, description="hub revision of the preference "
                                                                                    "model's tokenizer; unset: the pin")
    device: str | None = Field(None, pattern=r"^(cpu|cuda(:\d+)?|mps)$",
                               description="torch device: cpu, cuda or cuda:N; unset: cuda if available, else cpu")
    dtype: Literal["float16", "bfloat16", "float32"] | None = Field(
        None, description="float16, bfloat16 or float32; unset: float16 for sdxl-spo on a GPU (bfloat16 with "
                          "SPO_QUANT=fp8), bfloat16 for sdxl-random on a GPU, float32 on CPU")
    attention: Literal["sdpa", "xformers"] = Field(
        "sdpa", description="sdpa (PyTorch scaled-dot-product attention) or xformers (install the xformers wheel built "
                            "for your torch; a clear error when it is absent)")
    lora_scale: float = Field(1.0, ge=LORA_SCALE_RANGE[0], le=LORA_SCALE_RANGE[1], allow_inf_nan=False,
                              description="default LoRA scale of requests that name none (-2..2); changeable at run "
                                          "time (POST /admin/lora_scale)")
    lora_fuse: bool = Field(True, description="fuse the default adapter into the base weights at the default scale at load")
    adapter_memory_mb: float | None = Field(None, gt=0, allow_inf_nan=False,
                                            description="cap on the memory of loaded adapters, in MB; a load past it is "
                                                        "refused; unset: unlimited")
    embed_cache_size: int = Field(512, ge=0, description="prompt embeddings kept in the LRU cache")
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads; unset: torch's (spo-serve and make serve set 1). On a shared CPU host "
                                "one thread keeps latency fair: with two busy processes on two cores the open-loop p95 grew "
                                "1.14x at 1 thread and 427x at torch's default (benchmarks/RESULTS.md, Soak and contention)")
    # GPU speed paths (issue 18; docs/performance.md). Off by default until measured on a GPU.
    compile: bool | str = Field(
        False, description="torch.compile the UNet (and the VAE decode): true, false, or auto (on with CUDA when the "
                           "compile cache under SPO_DATA_DIR is writable); caches under SPO_DATA_DIR/compile_cache, every "
                           "graph warmed at start-up (docs/performance.md)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, "
                               "max-autotune-no-cudagraphs")
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor", description="torch.compile backend; aot_eager and eager trace without code generation (CPU tests)")
    compile_vae: bool = Field(True, description="with SPO_COMPILE on: the VAE decode channels-last and compiled too")
    batch_buckets: bool | str = Field(
        "auto", description="pad each UNet and VAE call to the next power of two rows (padded rows dropped) so the "
                            "number of compiled graphs stays bounded; auto: when compiled")
    quant: Literal["none", "fp8"] = Field(
        "none", description="none or fp8: the UNet's transformer Linear layers in float8 (torchao, dynamic per-row), "
                            "on CUDA GPUs with FP8 (compute capability >= 8.9) and bfloat16")
    lora_row_subset: float = Field(
        0.0, ge=0.0, le=1.0, allow_inf_nan=False,
        description="an adapter's branch runs on only the rows that need it (a scale other than the fused one) when "
                    "they are at most this share of the batch; 0: every row (eager only; a compiled UNet runs every row)")
    sdpa_backend: Literal["default", "auto", "cudnn", "flash", "efficient", "math"] = Field(
        "default", description="attention kernel: default (torch's choice), auto (the fastest measured at start-up), "
                               "or one backend")

    @field_validator("compile", "batch_buckets", mode="before")
    @classmethod
    def _bool_or_auto(cls, v):
        """true/false (and the other boolean spellings) or auto."""
        if isinstance(v, bool):
            return v
        word = str(v).strip().lower()
        if word == "auto":
            return "auto"
        if word in ("true", "1", "yes", "on", "t", "y"):
            return True
        if word in ("false", "0", "no", "off", "f", "n"):
            return False
        raise ValueError(f"must be true, false or auto, got {v!r}")

    # -- the engine --------------------------------------------------------------------------
    max_batch: int = Field(8, ge=1, le=256, description="images per UNet call; peak GPU memory grows with it "
                                                         "(docs/performance.md, Memory)")
    vae_decode_batch: int | None = Field(None, ge=1, le=256, description="at most this many images per VAE decode call; "
                                         "unset: sized by free GPU memory (one call on the CPU), halved on out of memory")
    max_queue: int = Field(64, ge=0, description="waiting images before 429")
    max_queue_cost: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="work waiting and running before 429, in UNet passes over one image of the preset's default size "
                    "(an image costs width x height / default size squared x the steps it runs, x2 with guidance; a "
                    "running image counts the steps it has left); unset: (SPO_MAX_QUEUE + SPO_MAX_BATCH) x 40, what "
                    "that many default requests (20 steps, guidance) cost; per worker (docs/api.md, Operations, Admission)")
    request_timeout_s: float = Field(300.0, gt=0, le=86400, allow_inf_nan=False,
                                     description="longest a request may take, in seconds (a request may ask for less "
                                                 "with timeout_s)")
    batching: Literal["step", "request"] = Field(
        "step", description="step (requests join at every step) or request (a batch runs to completion; for comparison)")

    # -- the service -------------------------------------------------------------------------
    data_dir: Path = Field(Path(".data"), description="admin state, worker reports, training jobs, adapters, "
                                                      "compile caches")
    adapter_dir: Path | None = Field(None, description="the only directory adapter files are loaded from and trained "
                                                       "adapters written to; unset: SPO_DATA_DIR/adapters")
    admin_token: SecretStr | None = Field(
        None, min_length=16, description="bearer token of /admin/* and /train/* (16+ characters); unset: the one in "
                                         "SPO_DATA_DIR/admin_token, created at first start (mode 0600; a symbolic "
                                         "link there is refused)")
    api_token: SecretStr | None = Field(None, min_length=16, description="when set, the bearer token the generation "
                                                                         "routes require (16+ characters)")
    drain_s: float = Field(30.0, ge=0, le=3600, allow_inf_nan=False,
                           description="on SIGTERM, how long admitted and queued requests may take to finish (0..3600 s)")
    workers: int | str = Field(
        1, description="BentoML worker processes, each with its own engine and model copy: 1..64, or auto: one per GPU "
                       "this process sees (one without CUDA). Worker i binds cuda:(i-1) mod n within "
                       "CUDA_VISIBLE_DEVICES (3,5: workers on GPUs 3 and 5 as cuda:0, cuda:1); an explicit SPO_DEVICE "
                       "binds every worker to it. /info lists each worker's index and device")

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v):
        """SPO_WORKERS: an integer 1..64 or `auto` (service/workers.py resolves it at start-up)."""
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        n = int(v) if isinstance(v, int) and not isinstance(v, bool) else None
        if isinstance(v, str) and v.strip().isdigit():
            n = int(v.strip())
        if n is None or not 1 <= n <= 64:
            raise ValueError(f"must be an integer in 1..64 or auto, got {v!r}")
        return n

    max_image_bytes: int = Field(16 * 1024 * 1024, ge=64 * 1024, le=256 * 1024 * 1024,
                                 description="body limit of generation requests that carry images (/generate with "
                                             "init_image, /sdapi/v1/img2img, /v1/images/edits), in bytes (other "
                                             "generation bodies: 64 KiB)")
    log_prompts: bool = Field(False, description="true: access log lines include the prompt text")
    public_url: str | None = Field(None, pattern=r"^https?://[^\s?#]+$",
                                   description="absolute base URL of OpenAI `url` image results (the URL clients "
                                               "reach this server at); unset: relative URLs (/v1/images/files/{id}), "
                                               "never built from the request's Host header")
    image_ttl_s: float = Field(3600.0, gt=0, le=30 * 86400, allow_inf_nan=False,
                               description="how long an OpenAI `url` image result can be downloaded")
    image_cache_mb: float = Field(512.0, gt=0, allow_inf_nan=False,
                                  description="disk cap of OpenAI `url` image results (oldest removed first)")
    faults: str | None = Field(None, description="tests only: fault injection (spo_runtime/faults.py lists the faults); "
                                                 "never set it in production")

    # -- training ----------------------------------------------------------------------------
    train_device: str | None = Field(None, pattern=r"^(cpu|cuda(:\d+)?|mps)$",
                                     description="device of training jobs; unset: SPO_DEVICE")
    max_train_jobs: int = Field(1, ge=1, le=64, description="training jobs run at once; the rest wait queued")
    max_queued_jobs: int = Field(16, ge=1, le=10000, description="training jobs that may wait (queued, or interrupted "
                                 "by a restart); one more submission or resume gets 429 with Retry-After")
    train_nproc: int | None = Field(None, ge=1, le=64, description="data-parallel ranks of a training job (its "
                                    "config's nproc wins); unset: the training GPUs' count on CUDA, 1 on CPU")
    train_devices: str | None = Field(None, pattern=r"^\s*(cpu|(cuda:)?\d+)(\s*,\s*(cuda:)?\d+)*\s*$",
                                      description="GPUs training may use, apart from serving's: a comma list such as "
                                                  "2,3 or cuda:2,cuda:3; rank r trains on the r-th; a job asking for more "
                                                  "ranks than listed is refused with a 400 naming config.nproc; unset: "
                                                  "every visible GPU")
    spm: str | None = Field(None, description="step-aware preference model weights (.safetensors or .bin), offline: "
                                              "the default of TrainConfig.spm_path, and the SPM of best_of (SPO_SCORER=spm); "
                                              "unset: fetched from the hub at the revision weights.py pins or "
                                              "SPO_SPM_REVISION names (the tiny preset: a tiny random SPM)")
    spm_tokenizer: str | None = Field(None, description="local tokenizer directory of the SPM (CLIP-ViT-H-14), for "
                                                        "offline training and best_of; unset: fetched from the hub")
    scorer: Literal["spm", "brightness", "darkness", "none"] = Field(
        "spm", description="the preference model that ranks best_of candidates (docs/api.md, Best of): spm (loaded at "
                           "start-up from SPO_SPM, in float32: 1.3 G parameters, about 5.2 GB of device memory for the "
                           "real one; when it cannot be loaded best_of > 1 is a 400 saying why), brightness or darkness "
                           "(mean pixel: deterministic toys for tests and demos), none (best_of > 1 refused)")

    @field_validator("faults")
    @classmethod
    def _faults(cls, v: str | None) -> str | None:
        try:
            Faults.parse(v)
        except ConfigError as e:
            raise ValueError(e.message) from None
        return v

    @property
    def fault_plan(self) -> Faults:
        return Faults.parse(self.faults)

    @property
    def adapters_path(self) -> Path:
        """SPO_ADAPTER_DIR, or SPO_DATA_DIR/adapters."""
        return self.adapter_dir if self.adapter_dir is not None else self.data_dir / "adapters"

    def token(self, name: str) -> str | None:
        """A token's value (admin_token, api_token): the only way to read one; repr() shows '**********'."""
        secret = getattr(self, name)
        return secret.get_secret_value() if secret is not None else None

    @staticmethod
    def variable(name: str) -> str:
        return ENV_NAMES.get(name, f"SPO_{name.upper()}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        """Settings from SPO_* variables; `overrides` (not None) win. Raises ConfigError naming the variable."""
        from spo_runtime.validation import allowed, validation_error

        env = os.environ if environ is None else environ
        names = {cls.variable(f): f for f in cls.model_fields}
        values: dict = {}
        for var, f in names.items():
            raw = env.get(var)
            if raw is not None and raw.strip() != "":
                values[f] = raw.strip()
        unknown = sorted(k for k in env if k.startswith("SPO_") and k not in names and k not in OTHER_VARIABLES)
        if unknown:
            log.warning("unknown SPO_ variables (ignored): %s", ", ".join(unknown))
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as e:
            err = validation_error(e, cls)
            first = err.errors[0][0].split(".")[0]
            var = cls.variable(first) if first in cls.model_fields else "settings"
            message = err.message.split("; ")[0]
            if first in SECRETS:  # a token is never echoed, not even a wrong one
                message = message.split(", got ")[0]
            rule = allowed(cls, first)
            if rule and rule not in message:
                message += f" (allowed: {rule})"
            raise ConfigError(var, message) from None
