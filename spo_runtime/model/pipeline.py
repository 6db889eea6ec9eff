"""The resident pipeline: SDXL + LoRA on one device. Text encoding (cached), one batched denoising step
over rows of mixed parameters, and VAE decoding.

`SpoPipeline.generate(requests)` runs a list of requests in one batched loop; the serving engine
drives the same three pieces (`prepare`, `denoise`, `decode`) at step granularity.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spo_runtime.errors import AdapterNotFoundError, InvalidRequestError, ModelLoadError, NonFiniteError
from spo_runtime.limits import LORA_SCALE_RANGE, MAX_SEED
from spo_runtime.lora.format import LoraFile
from spo_runtime.lora.runtime import LoraRegistry
from spo_runtime.model.presets import DEFAULT_ADAPTER, Preset
from spo_runtime.requests import ActiveRequest, GeneratedImage, GenerationRequest, Status
from spo_runtime.sampling.sampler import (NoiseSchedule, SamplerRow, add_noise, img2img_start, initial_noise, make_schedule,
                                          model_inputs, step_rows)
from spo_runtime.settings import Settings
from spo_runtime.speed import attention, compiling, fp8
from spo_runtime.version import __version__

log = logging.getLogger("spo_runtime")


@dataclass
class _Embedding:
    hidden: torch.Tensor  # (1, 77, D1 + D2)
    pooled: torch.Tensor  # (1, P)
    truncated: bool


@dataclass
class StepStats:
    """What one `denoise` call did (for metrics and tests)."""

    rows: int
    unet_rows: int
    seconds: float
    adapters: list[str] = field(default_factory=list)


class SpoPipeline:
    """SDXL + LoRA resident on one device. Not thread-safe: one loop drives it."""

    def __init__(self, parts: dict, settings: Settings, preset: Preset, device: torch.device, dtype: torch.dtype):
        self.settings = settings
        self.preset = preset
        self._preview_map: torch.Tensor | None = None
        self.device = device
        self.dtype = dtype
        self.unet = _place(parts["unet"], device, dtype)
        vae = parts["vae"]
        vae_dtype = torch.float32 if vae.dtype == torch.float32 and dtype == torch.float16 else dtype
        self.vae = _place(vae, device, vae_dtype)
        self.text_encoders = [_place(parts["text_encoder"], device, dtype), _place(parts["text_encoder_2"], device, dtype)]
        self.tokenizers = [parts["tokenizer"], parts["tokenizer_2"]]
        self.noise = NoiseSchedule.from_config(parts["scheduler_config"])
        self.force_zeros_for_empty_prompt = parts.get("force_zeros_for_empty_prompt", True)
        self.sources = parts.get("sources", {})
        self.latent_channels = self.unet.config.in_channels
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self._set_attention(settings.attention)
        cap = int(settings.adapter_memory_mb * 2**20) if settings.adapter_memory_mb else None
        self.registry = LoraRegistry(self.unet, device, dtype, memory_limit_bytes=cap, text_encoders={
            "text_encoder": self.text_encoders[0], "text_encoder_2": self.text_encoders[1]})
        self.default_lora_scale = float(settings.lora_scale)
        self.default_adapter: str | None = None
        # prompt -> embedding; with an adapter's text-encoder layers: (prompt, adapter, sha256, scale) -> embedding
        self._cache: OrderedDict[str | tuple, _Embedding] = OrderedDict()
        self.last_step: StepStats | None = None
        self._last_adapters: list[str] = []
        if parts.get("lora") is not None:
            self.load_adapter(DEFAULT_ADAPTER, parts["lora"])
            self.default_adapter = DEFAULT_ADAPTER
            if settings.lora_fuse:
                self.registry.fuse(DEFAULT_ADAPTER, self.default_lora_scale)
        self._setup_speed_paths(settings)

    def _setup_speed_paths(self, settings: Settings) -> None:
        """SPO_QUANT, SPO_SDPA_BACKEND, SPO_COMPILE (with SPO_COMPILE_VAE) and SPO_BATCH_BUCKETS, in that order:
        quantize after the default adapter is fused, measure attention before compiling around it."""
        self.quant = {"quant": "none"}
        if settings.quant == "fp8":
            fp8.check_supported(self.device, self.dtype)
            self.quant = fp8.quantize_unet(self.unet)
            self.registry.requantize = lambda m: fp8.quantize(m, [""])
        self.sdpa = {"backend": self.attention, "how": "SPO_ATTENTION", "ms": None}
        if self.attention == "sdpa":
            shape = attention.probe_shape(self.unet.config, self.preset.default_size, self.vae_scale)
            self.sdpa = attention.choose(settings.sdpa_backend, shape, self.device, self.dtype)
        self.registry.row_subset_share = settings.lora_row_subset
        cache_root = settings.data_dir / "compile_cache"
        self.compiled, why = compiling.enabled(settings.compile, self.device, cache_root)
        self.compile_cache: compiling.CompileCache | None = None
        self.vae_compiled = False
        self._vae_decode = self._decode_latents
        if self.compiled:
            key = {"torch": torch.__version__, "device": _device_name(self.device), "dtype": str(self.dtype),
                   "preset": self.preset.name, "sources": json.dumps(self.sources, sort_keys=True, default=str),
                   "mode": settings.compile_mode, "backend": settings.compile_backend, "quant": settings.quant,
                   "sdpa": self.sdpa["backend"], "vae": settings.compile_vae}
            self.compile_cache = compiling.CompileCache(cache_root, key)
            self.compile_cache.activate()
            # static shapes; the LoRA layers stay inside the graph (their scales are inputs)
            self.unet = compiling.compile_module(self.unet, settings.compile_backend, settings.compile_mode)
            self.registry.row_subset_share = 0.0  # a row subset's size would be a new graph
            if settings.compile_vae:
                self.compile_vae(settings.compile_backend, settings.compile_mode)
        on = settings.batch_buckets is True or (settings.batch_buckets == "auto" and self.compiled)
        self.unet_buckets = compiling.buckets(2 * settings.max_batch) if on else None  # CFG doubles the rows
        self.vae_buckets = compiling.buckets(settings.max_batch) if on else None
        self.compile_why = why
        self.warm_up_s: float | None = None

    def compile_vae(self, backend: str = "inductor", mode: str = "default") -> None:
        """The VAE channels-last (its convolutions' fast layout on tensor cores) and its decode compiled."""
        self.vae = self.vae.to(memory_format=torch.channels_last)
        self._vae_decode = compiling.compile_module(self._decode_latents, backend, mode)
        self.vae_compiled = True

    def _decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae_compiled:
            z = z.contiguous(memory_format=torch.channels_last)
        return self.vae.decode(z, return_dict=False)[0]

    @torch.inference_mode()
    def warm_up(self, size: int | None = None, unet_rows: tuple[int, ...] | None = None,
                vae_rows: tuple[int, ...] | None = None, into: dict | None = None) -> dict:
        """Compile the graphs requests meet at `size` (default: the preset's) before the first request: each
        UNet bucket of `unet_rows` (default: those a batch with CFG lands in, 2 and up; a batch of only
        unguided rows compiles bucket 1 when it first comes) with the fused scale (no LoRA branch) and with a
        residual scale (the branch), and each VAE bucket of `vae_rows` (default: all); then save the cache
        artifacts. Seconds per graph, for the log and the GPU suite (filled into `into` as each finishes)."""
        size = size or self.preset.default_size
        if unet_rows is None:
            unet_rows = tuple(b for b in self.unet_buckets if b >= 2) if self.unet_buckets else (2,)
        if vae_rows is None:
            vae_rows = self.vae_buckets or (1,)
        t_all = time.perf_counter()
        out = into if into is not None else {}
        out.update(unet={}, vae={})
        name = self.default_adapter
        fused = self.registry.fused[1] if self.registry.fused and self.registry.fused[0] == name else 0.0
        graphs = {"fused": {name: fused} if name else {}}
        if name:
            graphs["residual"] = {name: 0.5 if fused != 0.5 else 0.25}
        h = w = size // self.vae_scale
        d = self.text_encoders[0].config.hidden_size + self.text_encoders[1].config.hidden_size
        p = self.text_encoders[1].config.projection_dim
        for b in unet_rows:
            for kind, row in graphs.items():
                t0 = time.perf_counter()
                x = torch.randn(b, self.latent_channels, h, w, device=self.device, dtype=self.dtype)
                enc = torch.randn(b, 77, d, device=self.device, dtype=self.dtype)
                pooled = torch.randn(b, p, device=self.device, dtype=self.dtype)
                time_ids = torch.tensor([[size, size, 0, 0, size, size]] * b, dtype=self.dtype, device=self.device)
                t = torch.full((b,), 999.0, device=self.device)  # float32, as model_inputs makes it
                with self.registry.row_scales([row] * b), attention.context(self.sdpa["backend"]):
                    self.unet(x, t, encoder_hidden_states=enc, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                              return_dict=False)
                _sync(self.device)
                out["unet"][f"{kind}_b{b}"] = round(time.perf_counter() - t0, 3)
        if self.vae_compiled:
            for b in vae_rows:
                t0 = time.perf_counter()
                self._vae_decode(torch.randn(b, self.latent_channels, h, w, device=self.device, dtype=self.vae.dtype))
                _sync(self.device)
                out["vae"][f"b{b}"] = round(time.perf_counter() - t0, 3)
        if self.compile_cache is not None:
            out["cache_saved_bytes"] = self.compile_cache.save()
        out["total_s"] = self.warm_up_s = round(time.perf_counter() - t_all, 3)
        return out

    def _set_attention(self, backend: str) -> None:
        if backend == "xformers":
            try:
                import xformers  # noqa: F401
            except ImportError:
                raise ModelLoadError(
                    "SPO_ATTENTION=xformers: the xformers package is not installed (pip install 'spo-serve[xformers]'), "
                    "or set SPO_ATTENTION=sdpa"
                ) from None
            self.unet.enable_xformers_memory_efficient_attention()
            self.vae.enable_xformers_memory_efficient_attention()
        # sdpa: diffusers' default attention processor (torch scaled_dot_product_attention)
        self.attention = backend

    # -- adapters and scale ------------------------------------------------------------------

    def load_adapter(self, name: str, source: str | Path | LoraFile, replace: bool = False):
        """Load a LoRA file (diffusers or webui layout, safetensors) or a parsed LoraFile as `name`."""
        lora = source if isinstance(source, LoraFile) else self.registry.read(source)
        adapter = self.registry.load(name, lora, source=None if isinstance(source, LoraFile) else str(source), replace=replace)
        self._forget_embeddings(name)
        return adapter

    def _forget_embeddings(self, adapter: str) -> None:
        """Drop cached prompt embeddings computed with `adapter`'s text-encoder layers."""
        for key in [k for k in list(self._cache) if isinstance(k, tuple) and k[1] == adapter]:
            self._cache.pop(key, None)

    def unload_adapter(self, name: str) -> None:
        self.registry.unload(name)
        self._forget_embeddings(name)
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
        return GenerationRequest.parse(request, size_range=self.preset.size_range)

    def prepare(self, requests: list[GenerationRequest | dict]) -> list[ActiveRequest]:
        """Validate, resolve defaults (seed, size, adapter, scale), encode prompts (one batched call
        for the uncached ones) and draw each request's initial noise from its own generator."""
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
                latents = self._img2img_latents(req, row, width, height)
            else:
                shape = (self.latent_channels, height // self.vae_scale, width // self.vae_scale)
                latents = initial_noise(generator, shape, self.dtype, self.device) * row.schedule.init_noise_sigma
            states.append(
                ActiveRequest(
                    request=req, seed=seed, width=width, height=height, adapter=adapter,
                    lora_scale=req.lora_scale if req.lora_scale is not None else self.default_lora_scale,
                    row=row, latents=latents,
                )
            )
        self.encode(states)
        return states

    def _size(self, req: GenerationRequest) -> tuple[int, int]:
        """(width, height): the request's, else the init image's rounded down to a multiple of 8, else the
        preset's default. An init image whose size falls outside the preset's range is the request's fault."""
        if req.init_image is None:
            return req.width or self.preset.default_size, req.height or self.preset.default_size
        w, h = req.init_image.size
        width, height = req.width or w - w % self.vae_scale, req.height or h - h % self.vae_scale
        lo, hi = self.preset.size_range
        if not (lo <= width <= hi and lo <= height <= hi):
            raise InvalidRequestError("init_image", f"gives a {width}x{height} image; the {self.preset.name} preset "
                                                    f"allows sides in {lo}..{hi} (send width and height to resize it)")
        return width, height

    @torch.inference_mode()
    def _img2img_latents(self, req: GenerationRequest, row: SamplerRow, width: int, height: int) -> torch.Tensor:
        """The starting latent of an img2img row, as diffusers' SDXL img2img pipeline makes it for the same
        seed: the image resized (Lanczos) to the output size, scaled to [-1, 1], VAE-encoded with a sample
        of the posterior drawn from the row's generator, scaled, then noised (a second draw) to the level of
        the step the row starts at; the row then skips the schedule's first steps."""
        image = req.init_image
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.LANCZOS)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        x = (x * 2.0 - 1.0).to(device=self.device, dtype=self.vae.dtype)
        posterior = self.vae.encode(x).latent_dist
        sample = torch.randn(posterior.mean.shape, generator=row.generator, device=row.generator.device,
                             dtype=posterior.mean.dtype).to(posterior.mean.device)
        z = (posterior.mean + posterior.std * sample).to(self.dtype)
        cfg = self.vae.config
        if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(z)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(z)
            z = (z - mean) * cfg.scaling_factor / std
        else:
            z = cfg.scaling_factor * z
        row.step = row.start = img2img_start(row.schedule.num_steps, req.img2img_strength)
        noise = initial_noise(row.generator, tuple(z.shape[1:]), self.dtype, self.device)
        return add_noise(row.schedule, row.step, z, noise)

    def _text_key(self, text: str, s: ActiveRequest) -> str | tuple:
        """Cache key of `text` encoded for row `s`: the text alone, or with the adapter (name, sha256) and
        scale when the row's adapter has text-encoder layers and a non-zero scale."""
        a = s.adapter
        if a is None or s.lora_scale == 0.0 or not self.registry.get(a).has_text_encoder:
            return text
        return (text, a, self.registry.get(a).sha256, float(s.lora_scale))

    @torch.inference_mode()
    def encode(self, states: list[ActiveRequest]) -> None:
        """Attach prompt (and, with CFG, negative) embeddings to each state. An adapter's text-encoder
        layers run at the row's LoRA scale (as diffusers' `set_adapters` scales them); one batched call
        per encoder covers every uncached (prompt, adapter, scale)."""
        t0 = time.perf_counter()
        keys = []
        for s in states:
            keys.append(self._text_key(s.request.prompt, s))
            if s.cfg and not (s.request.negative_prompt is None and self.force_zeros_for_empty_prompt):
                keys.append(self._text_key(s.request.negative_prompt or "", s))
        missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
        fresh = {}
        if missing:
            texts = [k if isinstance(k, str) else k[0] for k in missing]
            if all(isinstance(k, str) for k in missing):
                fresh = dict(zip(missing, self._encode_texts(texts)))
            else:
                rows = [{} if isinstance(k, str) else {k[1]: k[3]} for k in missing]
                fresh = dict(zip(missing, self._encode_texts(texts, rows)))
        for s in states:
            e = self._lookup(self._text_key(s.request.prompt, s), fresh)
            s.prompt_embeds, s.pooled, s.prompt_truncated = e.hidden, e.pooled, e.truncated
            if s.cfg:
                if s.request.negative_prompt is None and self.force_zeros_for_empty_prompt:
                    s.negative_embeds, s.negative_pooled = torch.zeros_like(e.hidden), torch.zeros_like(e.pooled)
                else:
                    n = self._lookup(self._text_key(s.request.negative_prompt or "", s), fresh)
                    s.negative_embeds, s.negative_pooled = n.hidden, n.pooled
        ms = (time.perf_counter() - t0) * 1e3
        for s in states:
            s.timings["encode_ms"] = ms

    def _lookup(self, key: str | tuple, fresh: dict) -> _Embedding:
        e = fresh.get(key) or self._cache[key]
        if self.settings.embed_cache_size:
            self._cache[key] = e
            self._cache.move_to_end(key)
            while len(self._cache) > self.settings.embed_cache_size:
                self._cache.popitem(last=False)
        return e

    def _encode_texts(self, texts: list[str], rows: list[dict[str, float]] | None = None) -> list[_Embedding]:
        """Both CLIP encoders over `texts` in one call each; penultimate hidden states, concatenated,
        and the second encoder's projected pooled output (as diffusers' SDXL pipeline). `rows`: each
        text's {adapter: scale} for the adapters' text-encoder layers (absent: none)."""
        hidden, truncated, pooled = [], [False] * len(texts), None
        with self.registry.text_scales(rows or [{} for _ in texts]):
            for tok, enc in zip(self.tokenizers, self.text_encoders):
                ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
                full = tok(texts, padding=False, truncation=False).input_ids
                truncated = [t or len(f) > tok.model_max_length for t, f in zip(truncated, full)]
                out = enc(ids.to(self.device), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                if pooled is None and out[0].ndim == 2:
                    pooled = out[0]
        h = torch.cat(hidden, dim=-1).to(self.dtype)
        pooled = pooled.to(self.dtype)
        return [_Embedding(h[i : i + 1], pooled[i : i + 1], truncated[i]) for i in range(len(texts))]

    # -- one step ----------------------------------------------------------------------------

    def conditioning(self, states: list[ActiveRequest]) -> dict[str, torch.Tensor]:
        """Per-row conditioning of `states`, stacked: prompt/negative embeddings, time ids, guidance."""
        def neg(s, attr, like):
            v = getattr(s, attr)
            return v if v is not None else torch.zeros_like(like)  # rows without CFG never use it

        return {
            "prompt_embeds": torch.cat([s.prompt_embeds for s in states]),
            "pooled": torch.cat([s.pooled for s in states]),
            "negative_embeds": torch.cat([neg(s, "negative_embeds", s.prompt_embeds) for s in states]),
            "negative_pooled": torch.cat([neg(s, "negative_pooled", s.pooled) for s in states]),
            # SDXL micro-conditioning: original size, crop top-left, target size (diffusers' add_time_ids)
            "time_ids": torch.tensor([[s.height, s.width, 0, 0, s.height, s.width] for s in states], dtype=self.dtype, device=self.device),
            "guidance": torch.tensor([s.request.guidance_scale for s in states], dtype=torch.float32),
        }

    def guided_eps(self, x_in: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], scales: list[dict[str, float]]) -> torch.Tensor:
        """One UNet call with classifier-free guidance per row (rows with guidance <= 1 run unguided).

        UNet batch: [uncond of the CFG rows] + [cond of every row], as diffusers' cat([uncond, cond]).
        `scales` holds each row's LoRA scales over the loaded adapters. Differentiable (the trainer
        calls it with grad; serving calls it under inference_mode). The scales are in force for this
        call only; a backward that recomputes the forward (gradient checkpointing enabled through the
        registry) re-enters them.
        """
        g = cond["guidance"]
        cfg = [i for i in range(len(g)) if float(g[i]) > 1.0]
        c = torch.tensor(cfg, dtype=torch.long, device=x_in.device)
        unet_x = torch.cat([x_in.index_select(0, c), x_in])
        unet_t = torch.cat([t.index_select(0, c), t])
        enc = torch.cat([cond["negative_embeds"].index_select(0, c), cond["prompt_embeds"]])
        pooled = torch.cat([cond["negative_pooled"].index_select(0, c), cond["pooled"]])
        time_ids = torch.cat([cond["time_ids"].index_select(0, c), cond["time_ids"]])
        row_scales = [scales[i] for i in cfg] + list(scales)
        rows = len(row_scales)
        b = compiling.bucket(rows, self.unet_buckets)
        if b > rows:  # pad to the bucket (a compiled graph per bucket, not per size); padded rows are dropped
            unet_x, unet_t, enc, pooled, time_ids = (compiling.pad_rows(v, b) for v in (unet_x, unet_t, enc, pooled, time_ids))
            row_scales += [row_scales[-1]] * (b - rows)
        with self.registry.row_scales(row_scales) as terms, attention.context(self.sdpa["backend"]):
            self._last_adapters = list(terms)
            pred = self.unet(
                unet_x, unet_t, encoder_hidden_states=enc,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False,
            )[0][:rows]
        n = len(cfg)
        eps = pred[n:]
        if n:
            gs = g[cfg].to(pred.dtype).to(pred.device).view(-1, 1, 1, 1)
            uncond, text = pred[:n], eps.index_select(0, c)
            eps = eps.index_copy(0, c, uncond + gs * (text - uncond))
        return eps

    @torch.inference_mode()
    def denoise(self, states: list[ActiveRequest]) -> StepStats:
        """One UNet call over `states` (same latent size), each at its own step; advances every row."""
        t0 = time.perf_counter()
        rows = [s.row for s in states]
        x = torch.cat([s.latents for s in states])
        x_in, t = model_inputs(rows, x)
        eps = self.guided_eps(x_in, t, self.conditioning(states), [s.scales for s in states])
        x_next, _ = step_rows(rows, x, eps)
        for i, s in enumerate(states):
            s.latents = x_next[i : i + 1]
        n_cfg = sum(1 for s in states if s.cfg)
        stats = StepStats(len(states), len(states) + n_cfg, time.perf_counter() - t0, self._last_adapters)
        self.last_step = stats
        return stats

    # -- decoding ----------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, states: list[ActiveRequest]) -> list[GeneratedImage | NonFiniteError]:
        """VAE-decode finished rows together; a row with NaN/Inf gets a NonFiniteError, not an image."""
        if not states:
            return []
        t0 = time.perf_counter()
        lat = torch.cat([s.latents for s in states])
        bad = ~torch.isfinite(lat).flatten(1).all(dim=1)
        cfg = self.vae.config
        z = lat.to(self.vae.dtype)
        if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(z)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(z)
            z = z * std / cfg.scaling_factor + mean
        else:
            z = z / cfg.scaling_factor
        b = compiling.bucket(len(states), self.vae_buckets)
        img = self._vae_decode(compiling.pad_rows(z, b))[: len(states)]
        bad |= ~torch.isfinite(img).flatten(1).all(dim=1)
        # diffusers' VaeImageProcessor.postprocess: [-1, 1] -> [0, 1] -> round(x * 255)
        arr = (img / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        arr = (arr * 255).round().astype(np.uint8)
        ms = (time.perf_counter() - t0) * 1e3
        out: list[GeneratedImage | NonFiniteError] = []
        for i, s in enumerate(states):
            s.timings["decode_ms"] = ms
            if bool(bad[i]):
                out.append(NonFiniteError(f"request {i}: the {'latent' if not torch.isfinite(lat[i]).all() else 'decoded image'} holds NaN or Inf (seed {s.seed})"))
                s.status = Status.FAILED
                continue
            s.status = Status.FINISHED
            sha = self.registry.adapters[s.adapter].sha256 if s.adapter in self.registry.adapters else None
            out.append(
                GeneratedImage(
                    image=Image.fromarray(arr[i]), seed=s.seed, lora_scale=s.lora_scale, adapter=s.adapter,
                    adapter_sha256=sha, prompt_truncated=s.prompt_truncated, request=s.request, timings=dict(s.timings),
                )
            )
        return out

    # -- previews ----------------------------------------------------------------------------

    def preview(self, latents: torch.Tensor) -> Image.Image:
        """A small RGB picture of a (1, C, h, w) latent, one pixel per latent pixel, through a fixed linear
        latent-to-RGB map: no VAE call per step. The map is fitted once per loaded model (least squares
        between the VAE's latents of a synthetic colour chart and the chart itself, 8x8-averaged)."""
        if self._preview_map is None:
            self._preview_map = self._fit_preview_map()
        z = latents.detach().to("cpu", torch.float32)[0]
        c, h, w = z.shape
        rgb = self._preview_map @ torch.cat([z.reshape(c, -1), torch.ones(1, h * w)])
        arr = ((rgb.reshape(3, h, w).permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return Image.fromarray(arr)

    @torch.inference_mode()
    def _fit_preview_map(self) -> torch.Tensor:
        size = 128
        y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
        hue = x * 6.0
        chart = torch.stack([(1 - (hue - k).remainder(6).sub(3).abs().sub(1).clamp(0, 1)) for k in (0, 2, 4)])  # hue bars
        chart = chart * (1 - y) + y * x  # fading to a grey ramp downwards
        img = (chart * 2 - 1)[None].to(device=self.device, dtype=self.vae.dtype)
        z = self.vae.encode(img).latent_dist.mean.float().cpu()[0] * self.vae.config.scaling_factor
        c, h, w = z.shape
        target = torch.nn.functional.adaptive_avg_pool2d((chart * 2 - 1)[None], (h, w))[0].reshape(3, -1)
        a = torch.cat([z.reshape(c, -1), torch.ones(1, h * w)])  # (C + 1, N)
        return torch.linalg.lstsq(a.T, target.T).solution.T  # (3, C + 1)

    # -- the whole loop ----------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest | dict]) -> list[GeneratedImage]:
        """Run `requests` in one batched loop (one UNet call per step per image size); images in order."""
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
            "speed": {
                "sdpa": self.sdpa,
                "compile": {"on": self.compiled, "why": self.compile_why, "mode": self.settings.compile_mode,
                            "backend": self.settings.compile_backend, "vae": self.vae_compiled,
                            "warm_up_s": self.warm_up_s,
                            "cache": self.compile_cache.info(show_paths) if self.compile_cache else None},
                "batch_buckets": {"unet": list(self.unet_buckets) if self.unet_buckets else None,
                                  "vae": list(self.vae_buckets) if self.vae_buckets else None},
                "quant": self.quant,
                "lora_row_subset": self.registry.row_subset_share,
            },
            "default_lora_scale": self.default_lora_scale,
            "default_adapter": self.default_adapter,
            "fused": {"adapter": self.registry.fused[0], "scale": self.registry.fused[1]} if self.registry.fused else None,
            "adapters": [a.info(show_source=show_paths) for a in self.registry.adapters.values()],
            "default_size": self.preset.default_size,
            "size_range": list(self.preset.size_range),
            "version": __version__,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _place(m: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    p = next(m.parameters())
    if p.device != device or p.dtype != dtype:
        m = m.to(device=device, dtype=dtype)
    return m.eval().requires_grad_(False)


def _is_path(s: str) -> bool:
    return s.startswith(("/", ".", "~")) or Path(s).exists()
