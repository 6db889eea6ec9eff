"""The resident pipeline: SDXL + LoRA on one device, composed of its parts: prompts to embeddings
(`text.PromptEncoder`, cached), one batched denoising step over rows of mixed parameters
(`denoiser.Denoiser`), latents to and from images (`vae.VaeCodec`), and the speed settings applied to
them (`speed_paths.SpeedPaths`). This class owns what joins them: adapters and the default scale,
requests turned into running rows, and the whole loop.

`SpoPipeline.generate(requests)` runs a list of requests in one batched loop; the serving engine
drives the same three pieces (`prepare`, `denoise`, `decode`) at step granularity.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import torch
from PIL import Image

from spo_runtime.errors import AdapterNotFoundError, InvalidRequestError, NonFiniteError
from spo_runtime.limits import LORA_SCALE_RANGE, MAX_SEED
from spo_runtime.lora.format import LoraFile
from spo_runtime.lora.runtime import LoraRegistry
from spo_runtime.model.denoiser import Denoiser, StepStats
from spo_runtime.model.presets import DEFAULT_ADAPTER, Preset
from spo_runtime.model.speed_paths import SpeedPaths, set_attention
from spo_runtime.model.text import PromptEncoder
from spo_runtime.model.vae import VaeCodec
from spo_runtime.requests import ActiveRequest, GeneratedImage, GenerationRequest, Status
from spo_runtime.sampling.sampler import NoiseSchedule, SamplerRow, initial_noise, make_schedule
from spo_runtime.settings import Settings
from spo_runtime.version import __version__


class SpoPipeline:
    """SDXL + LoRA resident on one device. Not thread-safe: one loop drives it."""

    def __init__(self, parts: dict, settings: Settings, preset: Preset, device: torch.device, dtype: torch.dtype):
        self.settings = settings
        self.preset = preset
        self.device = device
        self.dtype = dtype
        unet = _place(parts["unet"], device, dtype)
        vae = parts["vae"]
        vae = _place(vae, device, torch.float32 if vae.dtype == torch.float32 and dtype == torch.float16 else dtype)
        text_encoders = [_place(parts["text_encoder"], device, dtype), _place(parts["text_encoder_2"], device, dtype)]
        self.noise = NoiseSchedule.from_config(parts["scheduler_config"])
        self.sources = parts.get("sources", {})
        set_attention(settings.attention, unet, vae)
        self.attention = settings.attention
        cap = int(settings.adapter_memory_mb * 2**20) if settings.adapter_memory_mb else None
        self.registry = LoraRegistry(unet, device, dtype, memory_limit_bytes=cap, text_encoders={
            "text_encoder": text_encoders[0], "text_encoder_2": text_encoders[1]})
        self.prompts = PromptEncoder([parts["tokenizer"], parts["tokenizer_2"]], text_encoders, self.registry, device, dtype,
                                     settings.embed_cache_size, parts.get("force_zeros_for_empty_prompt", True))
        self.denoiser = Denoiser(unet, self.registry, device, dtype)
        self.codec = VaeCodec(vae, device, dtype)
        self.codec.max_rows = settings.vae_decode_batch
        self.default_lora_scale = float(settings.lora_scale)
        self.default_adapter: str | None = None
        if parts.get("lora") is not None:
            self.load_adapter(DEFAULT_ADAPTER, parts["lora"])
            self.default_adapter = DEFAULT_ADAPTER
            if settings.lora_fuse:
                self.registry.fuse(DEFAULT_ADAPTER, self.default_lora_scale)
        self.speed = SpeedPaths(settings, preset, self.sources, self.denoiser, self.codec)

    # -- the parts, as callers name them -----------------------------------------------------

    unet = property(lambda self: self.denoiser.unet, doc="The UNet (compiled under SPO_COMPILE).")
    vae = property(lambda self: self.codec.vae, doc="The VAE (float32 when its config asks, on a float16 pipeline).")
    text_encoders = property(lambda self: self.prompts.text_encoders, doc="The two CLIP text encoders.")
    tokenizers = property(lambda self: self.prompts.tokenizers, doc="Their tokenizers.")
    last_step = property(lambda self: self.denoiser.last_step, doc="The last `denoise` call's StepStats.")
    sdpa = property(lambda self: self.denoiser.sdpa, doc="SPO_SDPA_BACKEND's pick: {backend, how, ms}.")
    unet_buckets = property(lambda self: self.denoiser.buckets, doc="UNet batch buckets (None: unpadded).")
    vae_buckets = property(lambda self: self.codec.buckets, doc="VAE batch buckets (None: unpadded).")
    quant = property(lambda self: self.speed.quant, doc="What SPO_QUANT did, for /info.")
    compiled = property(lambda self: self.speed.compiled, doc="Whether SPO_COMPILE compiled the UNet.")
    compile_why = property(lambda self: self.speed.why, doc="Why SPO_COMPILE is on or off.")
    compile_cache = property(lambda self: self.speed.cache, doc="The compile cache (None: not compiled).")

    def encode(self, states: list[ActiveRequest]) -> None:
        """Attach prompt (and, with CFG, negative) embeddings to each state (`PromptEncoder.encode`)."""
        self.prompts.encode(states)

    def conditioning(self, states: list[ActiveRequest]) -> dict[str, torch.Tensor]:
        """Per-row conditioning of `states`, stacked (`Denoiser.conditioning`)."""
        return self.denoiser.conditioning(states)

    def guided_eps(self, x_in: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], scales: list[dict[str, float]]) -> torch.Tensor:
        """One UNet call with classifier-free guidance per row; differentiable (`Denoiser.guided_eps`)."""
        return self.denoiser.guided_eps(x_in, t, cond, scales)

    def denoise(self, states: list[ActiveRequest]) -> StepStats:
        """One UNet call over `states` (same latent size), each at its own step; advances every row."""
        return self.denoiser.denoise(states)

    def images(self, latents: torch.Tensor, min_side: int | None = None) -> torch.Tensor:
        """Latents (UNet scale) -> float32 images in [-1, 1] on the device, for a preference scorer; `min_side`:
        decoded smaller, down to that short side (`VaeCodec.images`)."""
        return self.codec.images(latents, min_side)

    def preview(self, latents: torch.Tensor) -> Image.Image:
        """A small RGB picture of a (1, C, h, w) latent, no VAE call (`VaeCodec.preview`)."""
        return self.codec.preview(latents)

    def compile_vae(self, backend: str = "inductor", mode: str = "default") -> None:
        """The VAE channels-last and its decode compiled (`VaeCodec.compile`)."""
        self.codec.compile(backend, mode)

    def warm_up(self, size: int | None = None, unet_rows: tuple[int, ...] | None = None,
                vae_rows: tuple[int, ...] | None = None, into: dict | None = None) -> dict:
        """Compile the graphs requests meet, with the default adapter's fused and residual scales, before the
        first request; seconds per graph (`SpeedPaths.warm_up`)."""
        return self.speed.warm_up(self.default_adapter, self.prompts.dims, size, unet_rows, vae_rows, into)

    # -- adapters and scale ------------------------------------------------------------------

    def load_adapter(self, name: str, source: str | Path | LoraFile, replace: bool = False):
        """Load a LoRA file (diffusers or webui layout, safetensors) or a parsed LoraFile as `name`."""
        lora = source if isinstance(source, LoraFile) else self.registry.read(source)
        adapter = self.registry.load(name, lora, source=None if isinstance(source, LoraFile) else str(source), replace=replace)
        self.prompts.forget(name)
        return adapter

    def unload_adapter(self, name: str) -> None:
        self.registry.unload(name)
        self.prompts.forget(name)
        if self.default_adapter == name:
            self.default_adapter = None

    def set_default_adapter(self, name: str | None) -> None:
        if name is not None:
            self.registry.get(name)
        self.default_adapter = name

    def set_default_lora_scale(self, scale: float) -> dict:
        """Hot-swap the default scale: applies to requests prepared after the call; no weight is touched."""
        t0 = time.perf_counter()
        lo, hi = LORA_SCALE_RANGE
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not lo <= scale <= hi:  # NaN fails too
            raise InvalidRequestError("lora_scale", f"must be in {lo:g}..{hi:g}, got {scale!r}")
        previous, self.default_lora_scale = self.default_lora_scale, float(scale)
        return {"previous": previous, "scale": self.default_lora_scale, "swap_ms": (time.perf_counter() - t0) * 1e3}

    # -- requests ----------------------------------------------------------------------------

    def parse(self, request: GenerationRequest | dict) -> GenerationRequest:
        """`request` valid for this preset: a dict is validated once; a `GenerationRequest` is already
        valid, so only its sizes are checked against the preset's range and it is returned as is."""
        return GenerationRequest.parse(request, size_range=self.preset.size_range)

    def prepare(self, requests: list[GenerationRequest | dict]) -> list[ActiveRequest]:
        """Validate (dicts; parsed requests pass as they are), resolve defaults (seed, size, adapter, scale),
        encode prompts (one batched call for the uncached ones) and draw each request's initial noise from
        its own generator."""
        states = []
        for raw in requests:
            req = self.parse(raw)
            adapter = req.adapter if req.adapter is not None else self.default_adapter
            if adapter is not None and adapter not in self.registry.adapters:
                raise AdapterNotFoundError(adapter, list(self.registry.adapters))
            width, height = self._size(req)
            seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
            generator = torch.Generator("cpu").manual_seed(seed)
            row = SamplerRow(make_schedule(req.scheduler, req.num_inference_steps, self.noise), generator, eta=req.eta)
            if req.init_image is not None:
                latents = self.codec.img2img_latents(req.init_image, row, width, height, req.img2img_strength)
            else:
                f = self.codec.downscale
                shape = (self.denoiser.latent_channels, height // f, width // f)
                latents = initial_noise(generator, shape, self.dtype, self.device) * row.schedule.init_noise_sigma
            states.append(
                ActiveRequest(
                    request=req, seed=seed, width=width, height=height, adapter=adapter,
                    lora_scale=req.lora_scale if req.lora_scale is not None else self.default_lora_scale,
                    row=row, latents=latents,
                )
            )
        self.prompts.encode(states)
        return states

    def _size(self, req: GenerationRequest) -> tuple[int, int]:
        """(width, height): the request's, else the init image's rounded down to a multiple of 8, else the
        preset's default. An init image whose size falls outside the preset's range is the request's fault."""
        if req.init_image is None:
            return req.width or self.preset.default_size, req.height or self.preset.default_size
        w, h = req.init_image.size
        f = self.codec.downscale
        width, height = req.width or w - w % f, req.height or h - h % f
        lo, hi = self.preset.size_range
        if not (lo <= width <= hi and lo <= height <= hi):
            raise InvalidRequestError("init_image", f"gives a {width}x{height} image; the {self.preset.name} preset "
                                                    f"allows sides in {lo}..{hi} (send width and height to resize it)")
        return width, height

    @torch.inference_mode()
    def decode(self, states: list[ActiveRequest]) -> list[GeneratedImage | NonFiniteError]:
        """VAE-decode finished rows together; a row with NaN/Inf gets a NonFiniteError, not an image."""
        if not states:
            return []
        t0 = time.perf_counter()
        images = self.codec.decode(torch.cat([s.latents for s in states]), [s.seed for s in states])
        ms = (time.perf_counter() - t0) * 1e3
        out: list[GeneratedImage | NonFiniteError] = []
        for s, image in zip(states, images):
            s.timings["decode_ms"] = ms
            if isinstance(image, NonFiniteError):
                out.append(image)
                s.status = Status.FAILED
                continue
            s.status = Status.FINISHED
            sha = self.registry.adapters[s.adapter].sha256 if s.adapter in self.registry.adapters else None
            out.append(
                GeneratedImage(
                    image=image, seed=s.seed, lora_scale=s.lora_scale, adapter=s.adapter,
                    adapter_sha256=sha, prompt_truncated=s.prompt_truncated, request=s.request, timings=dict(s.timings),
                )
            )
        return out

    # -- the whole loop ----------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest | dict]) -> list[GeneratedImage]:
        """Run `requests` in one batched loop (one UNet call per step per image size); images in order.
        best_of > 1 needs a preference model: it runs through the engine (`spo_runtime.engine.Engine`)."""
        requests = [self.parse(r) for r in requests]
        for r in requests:
            if r.best_of > 1:
                raise InvalidRequestError("best_of", "must be 1 here: best_of runs through the engine "
                                                     "(spo_runtime.engine.Engine, with a preference scorer)")
        states = self.prepare(requests)
        results: list[GeneratedImage | None] = [None] * len(states)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(states):
            groups.setdefault((s.height, s.width), []).append(i)
        for idx in groups.values():
            t_start = time.perf_counter()
            live = list(idx)
            while live:
                self.denoise([states[i] for i in live])
                done = [i for i in live if states[i].row.done]
                if done:
                    for i in done:
                        states[i].timings["denoise_ms"] = (time.perf_counter() - t_start) * 1e3
                    for i, r in zip(done, self.decode([states[i] for i in done])):
                        if isinstance(r, Exception):
                            raise r
                        results[i] = r
                    live = [i for i in live if i not in done]
        return results  # type: ignore[return-value]

    # -- description -------------------------------------------------------------------------

    def info(self, show_paths: bool = False) -> dict:
        sources = {
            k: {"sha256": v.get("sha256"), **({"id": v["id"]} if show_paths or not _is_path(v["id"]) else {})}
            for k, v in self.sources.items()
        }
        return {
            "preset": self.preset.name,
            "sources": sources,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention": self.attention,
            "speed": self.speed.info(show_paths),
            "default_lora_scale": self.default_lora_scale,
            "default_adapter": self.default_adapter,
            "fused": {"adapter": self.registry.fused[0], "scale": self.registry.fused[1]} if self.registry.fused else None,
            "adapters": [a.info(show_source=show_paths) for a in self.registry.adapters.values()],
            "default_size": self.preset.default_size,
            "size_range": list(self.preset.size_range),
            "version": __version__,
        }


def _place(m: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    p = next(m.parameters())
    if p.device != device or p.dtype != dtype:
        m = m.to(device=device, dtype=dtype)
    return m.eval().requires_grad_(False)


def _is_path(s: str) -> bool:
    return s.startswith(("/", ".", "~")) or Path(s).exists()
