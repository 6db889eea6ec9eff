"""The VAE decode of a batch in slices, so a 24 GB card (L4, A10G, 4090) decodes 8 images at 1024 without
running out of memory: each slice is sized by the device's free memory (or SPO_VAE_DECODE_BATCH), and a slice
that still runs out of memory is decoded in halves, recursively, as the engine halves a denoising step.

The per-row memory is an estimate: the SDXL decoder's widest activations at full resolution are 128 channels
x H x W, a few alive at once; 1536 bytes per output pixel in half precision (about 1.5 GiB at 1024x1024, 3 GiB
in float32) bounds what the H200 measured for batch 8 (benchmarks/RESULTS.md) with room for the convolution
workspace. On the CPU the host's memory is not probed: one slice, unless SPO_VAE_DECODE_BATCH says otherwise.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from spo_runtime.errors import is_oom

log = logging.getLogger("spo_runtime")

BYTES_PER_PIXEL_HALF = 1536  # estimate, see the module docstring
FREE_SHARE = 0.8  # of the free device memory one slice may take


def rows_per_slice(n: int, pixels: int, dtype: torch.dtype, device: torch.device, limit: int | None = None,
                   free_bytes: int | None = None) -> int:
    """How many of `n` rows (each `pixels` output pixels) one decode call takes: `limit` (SPO_VAE_DECODE_BATCH)
    when set, else on CUDA what FREE_SHARE of the free memory holds at the estimated bytes per pixel, at least 1."""
    if limit is not None:
        return max(1, min(n, limit))
    if device.type != "cuda" and free_bytes is None:
        return n
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    per_row = pixels * BYTES_PER_PIXEL_HALF * (2 if dtype == torch.float32 else 1)
    return max(1, min(n, int(free_bytes * FREE_SHARE) // per_row))


def decode_in_slices(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, rows: int,
                     on_oom: Callable[[], None] | None = None) -> torch.Tensor:
    """decode(z) in slices of at most `rows` rows, concatenated; a slice that runs out of memory is retried
    in halves (down to one row, which then raises). `on_oom` runs before each retry (e.g. empty the cache)."""
    if z.shape[0] <= rows:
        try:
            return decode(z)
        except Exception as e:
            if not is_oom(e) or z.shape[0] == 1:
                raise
            log.warning("VAE decode out of memory at %d rows: retrying in halves", z.shape[0])
            if on_oom is not None:
                on_oom()
            half = (z.shape[0] + 1) // 2
            return torch.cat([decode_in_slices(decode, z[:half], half, on_oom),
                              decode_in_slices(decode, z[half:], half, on_oom)])
    return torch.cat([decode_in_slices(decode, z[i:i + rows], rows, on_oom) for i in range(0, z.shape[0], rows)])
