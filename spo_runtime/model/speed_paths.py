"""The speed settings applied to a loaded model: SPO_ATTENTION at construction, then SPO_QUANT, SPO_SDPA_BACKEND,
SPO_COMPILE (with SPO_COMPILE_VAE) and SPO_BATCH_BUCKETS, in that order, and the warm-up that compiles the graphs
requests will meet. The functions of `spo_runtime.speed` over the pipeline's parts (the `Denoiser`'s UNet and
the `VaeCodec`'s VAE); what they did is reported in the pipeline's info() (`/info`)."""

from __future__ import annotations

import json
import time

import torch

from spo_runtime.errors import ModelLoadError
from spo_runtime.model.denoiser import Denoiser
from spo_runtime.model.presets import Preset
from spo_runtime.model.vae import VaeCodec
from spo_runtime.settings import Settings
from spo_runtime.speed import attention, compiling, fp8


def set_attention(backend: str, unet: torch.nn.Module, vae: torch.nn.Module) -> None:
    """SPO_ATTENTION: xformers' kernels in the UNet and the VAE; sdpa: diffusers' default attention processor
    (torch scaled_dot_product_attention), nothing to do."""
    if backend == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ModelLoadError(
                "SPO_ATTENTION=xformers: the xformers package is not installed (pip install 'spo-serve[xformers]'), "
                "or set SPO_ATTENTION=sdpa"
            ) from None
        unet.enable_xformers_memory_efficient_attention()
        vae.enable_xformers_memory_efficient_attention()


class SpeedPaths:
    """Applies the speed settings to `denoiser` and `codec` (after the default adapter is fused: quantization
    replaces base weights; attention is measured before compiling around it) and keeps what they did."""

    def __init__(self, settings: Settings, preset: Preset, sources: dict, denoiser: Denoiser, codec: VaeCodec):
        self.settings = settings
        self.preset = preset
        self.denoiser = denoiser
        self.codec = codec
        registry, device, dtype = denoiser.registry, denoiser.device, denoiser.dtype
        self.quant = {"quant": "none"}
        if settings.quant == "fp8":
            fp8.check_supported(device, dtype)
            self.quant = fp8.quantize_unet(denoiser.unet)
            registry.requantize = lambda m: fp8.quantize(m, [""])
        denoiser.sdpa = {"backend": settings.attention, "how": "SPO_ATTENTION", "ms": None}
        if settings.attention == "sdpa":
            shape = attention.probe_shape(denoiser.unet.config, preset.default_size, codec.downscale)
            denoiser.sdpa = attention.choose(settings.sdpa_backend, shape, device, dtype)
        registry.row_subset_share = settings.lora_row_subset
        cache_root = settings.data_dir / "compile_cache"
        self.compiled, self.why = compiling.enabled(settings.compile, device, cache_root)
        self.cache: compiling.CompileCache | None = None
        if self.compiled:
            key = {"torch": torch.__version__, "device": _device_name(device), "dtype": str(dtype),
                   "preset": preset.name, "sources": json.dumps(sources, sort_keys=True, default=str),
                   "mode": settings.compile_mode, "backend": settings.compile_backend, "quant": settings.quant,
                   "sdpa": denoiser.sdpa["backend"], "vae": settings.compile_vae}
            self.cache = compiling.CompileCache(cache_root, key)
            self.cache.activate()
            # static shapes; the LoRA layers stay inside the graph (their scales are inputs)
            denoiser.unet = compiling.compile_module(denoiser.unet, settings.compile_backend, settings.compile_mode)
            registry.row_subset_share = 0.0  # a row subset's size would be a new graph
            if settings.compile_vae:
                codec.compile(settings.compile_backend, settings.compile_mode)
        on = settings.batch_buckets is True or (settings.batch_buckets == "auto" and self.compiled)
        denoiser.buckets = compiling.buckets(2 * settings.max_batch) if on else None  # CFG doubles the rows
        codec.buckets = compiling.buckets(settings.max_batch) if on else None
        self.warm_up_s: float | None = None

    @torch.inference_mode()
    def warm_up(self, adapter: str | None, text_dims: tuple[int, int], size: int | None = None,
                unet_rows: tuple[int, ...] | None = None, vae_rows: tuple[int, ...] | None = None,
                into: dict | None = None) -> dict:
        """Compile the graphs requests meet at `size` (default: the preset's) before the first request: each
        UNet bucket of `unet_rows` (default: those a batch with CFG lands in, 2 and up; a batch of only
        unguided rows compiles bucket 1 when it first comes) with the fused scale of `adapter` (the default
        one: no LoRA branch) and with a residual scale (the branch), and each VAE bucket of `vae_rows`
        (default: all); then save the cache artifacts. `text_dims`: the (D, P) widths of the text embeddings.
        Seconds per graph, for the log and the GPU suite (filled into `into` as each finishes)."""
        den, codec = self.denoiser, self.codec
        device, dtype, registry = den.device, den.dtype, den.registry
        size = size or self.preset.default_size
        if unet_rows is None:
            unet_rows = tuple(b for b in den.buckets if b >= 2) if den.buckets else (2,)
        if vae_rows is None:
            vae_rows = codec.buckets or (1,)
        t_all = time.perf_counter()
        out = into if into is not None else {}
        out.update(unet={}, vae={})
        fused = registry.fused[1] if registry.fused and registry.fused[0] == adapter else 0.0
        graphs = {"fused": {adapter: fused} if adapter else {}}
        if adapter:
            graphs["residual"] = {adapter: 0.5 if fused != 0.5 else 0.25}
        h = w = size // codec.downscale
        d, p = text_dims
        channels = den.latent_channels
        for b in unet_rows:
            for kind, row in graphs.items():
                t0 = time.perf_counter()
                x = torch.randn(b, channels, h, w, device=device, dtype=dtype)
                enc = torch.randn(b, 77, d, device=device, dtype=dtype)
                pooled = torch.randn(b, p, device=device, dtype=dtype)
                time_ids = torch.tensor([[size, size, 0, 0, size, size]] * b, dtype=dtype, device=device)
                t = torch.full((b,), 999.0, device=device)  # float32, as model_inputs makes it
                with registry.row_scales([row] * b), attention.context(den.sdpa["backend"]):
                    den.unet(x, t, encoder_hidden_states=enc, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                             return_dict=False)
                _sync(device)
                out["unet"][f"{kind}_b{b}"] = round(time.perf_counter() - t0, 3)
        if codec.compiled:
            for b in vae_rows:
                t0 = time.perf_counter()
                codec.run_decoder(torch.randn(b, channels, h, w, device=device, dtype=codec.vae.dtype))
                _sync(device)
                out["vae"][f"b{b}"] = round(time.perf_counter() - t0, 3)
        if self.cache is not None:
            out["cache_saved_bytes"] = self.cache.save()
        out["total_s"] = self.warm_up_s = round(time.perf_counter() - t_all, 3)
        return out

    def info(self, show_paths: bool = False) -> dict:
        """The `speed` section of /info."""
        s, den, codec = self.settings, self.denoiser, self.codec
        why = self.why if show_paths else self.why.replace(str(s.data_dir), "$SPO_DATA_DIR")  # "<cache> is not writable"
        return {
            "sdpa": den.sdpa,
            "compile": {"on": self.compiled, "why": why, "mode": s.compile_mode, "backend": s.compile_backend,
                        "vae": codec.compiled, "warm_up_s": self.warm_up_s,
                        "cache": self.cache.info(show_paths) if self.cache else None},
            "batch_buckets": {"unet": list(den.buckets) if den.buckets else None,
                              "vae": list(codec.buckets) if codec.buckets else None},
            "quant": self.quant,
            "lora_row_subset": den.registry.row_subset_share,
            "vae_decode_batch": codec.max_rows,  # None: slices sized by free device memory
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
