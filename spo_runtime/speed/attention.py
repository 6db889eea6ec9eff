"""SPO_SDPA_BACKEND: which scaled-dot-product-attention kernel the UNet uses, picked by measurement.

`auto` times each backend torch offers (cuDNN, flash, memory-efficient, math) on the UNet's largest
self-attention at the preset's default size, and keeps the fastest; `default` leaves torch's own dispatch
(its priority order, no measurement); a backend name forces that one. The choice is applied around every
UNet call with `torch.nn.attention.sdpa_kernel` (the math kernel stays allowed as a fallback for shapes the
chosen one does not support) and reported in the pipeline's info() (`/info`).
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def probe_shape(unet_config, default_size: int, vae_scale: int = 8) -> tuple[int, int, int, int]:
    """(batch, heads, tokens, head_dim) of the UNet's first transformer level at the default size, CFG batch 2."""
    blocks = list(unet_config.block_out_channels)
    types = list(unet_config.down_block_types)
    level = next((i for i, t in enumerate(types) if "CrossAttn" in t), 0)
    channels = blocks[level]
    head_dim = unet_config.attention_head_dim
    head_dim = head_dim[level] if isinstance(head_dim, (list, tuple)) else head_dim
    # diffusers' SDXL config names the head *count* attention_head_dim; channels / heads is the head size
    heads = head_dim
    side = default_size // vae_scale // (2 ** level)
    return 2, heads, side * side, max(channels // heads, 1)


def measure(shape, device: torch.device, dtype: torch.dtype, names=None, reps: int = 5) -> dict[str, float | None]:
    """Milliseconds per call of each backend on `shape` (None: unsupported here)."""
    b, h, n, d = shape
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype) for _ in range(3))
    out: dict[str, float | None] = {}
    for name in names or BACKENDS:
        try:
            with sdpa_kernel([BACKENDS[name]]):
                F.scaled_dot_product_attention(q, k, v)  # warm-up (and the unsupported check)
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(reps):
                    F.scaled_dot_product_attention(q, k, v)
                _sync(device)
            out[name] = (time.perf_counter() - t0) / reps * 1e3
        except RuntimeError:  # "No available kernel" for this device, dtype or shape
            out[name] = None
    return out


def choose(setting: str, shape, device: torch.device, dtype: torch.dtype) -> dict:
    """What SPO_SDPA_BACKEND resolves to: {"backend", "how", "ms"} (ms: the measurements of `auto`)."""
    if setting == "default":
        return {"backend": "default", "how": "torch's dispatch", "ms": None}
    if setting != "auto":
        return {"backend": setting, "how": "SPO_SDPA_BACKEND", "ms": None}
    ms = measure(shape, device, dtype)
    ok = {k: v for k, v in ms.items() if v is not None}
    best = min(ok, key=ok.get) if ok else "default"
    return {"backend": best, "how": f"fastest of {len(ok)} measured on (batch, heads, tokens, head_dim) {tuple(shape)}",
            "ms": {k: (round(v, 4) if v is not None else None) for k, v in ms.items()}}


def context(backend: str):
    """The context every UNet call runs in: the chosen kernel (math allowed as fallback), or nothing."""
    if backend == "default":
        return contextlib.nullcontext()
    chosen = BACKENDS[backend]
    return sdpa_kernel([chosen] if chosen == SDPBackend.MATH else [chosen, SDPBackend.MATH], set_priority=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
