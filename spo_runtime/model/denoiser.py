"""One guided UNet step over rows of mixed parameters: each row's conditioning stacked, classifier-free
guidance only for the rows that ask for it, each row's LoRA scales, the call padded to a batch bucket, and
the sampler's per-row update. The serving loop and the trainer both go through `guided_eps`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from spo_runtime.lora.runtime import LoraRegistry
from spo_runtime.requests import ActiveRequest
from spo_runtime.sampling.sampler import model_inputs, step_rows
from spo_runtime.speed import attention, compiling


@dataclass
class StepStats:
    """What one `denoise` call did (for metrics and tests)."""

    rows: int
    unet_rows: int
    seconds: float
    adapters: list[str] = field(default_factory=list)


class Denoiser:
    """The UNet (compiled under SPO_COMPILE) with its LoRA registry, the attention kernel and batch buckets."""

    def __init__(self, unet: torch.nn.Module, registry: LoraRegistry, device: torch.device, dtype: torch.dtype):
        self.unet = unet
        self.latent_channels = unet.config.in_channels
        self.registry = registry
        self.device = device
        self.dtype = dtype
        self.sdpa = {"backend": "default", "how": "torch's dispatch", "ms": None}  # SPO_SDPA_BACKEND's pick
        self.buckets: tuple[int, ...] | None = None  # SPO_BATCH_BUCKETS: UNet batches padded to these sizes
        self.last_step: StepStats | None = None
        self._last_adapters: list[str] = []

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
        b = compiling.bucket(rows, self.buckets)
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
        x_next, x0 = step_rows(rows, x, eps)
        for i, s in enumerate(states):
            s.latents = x_next[i : i + 1]
            s.x0 = x0[i : i + 1]  # the step's clean-latent estimate (best_of's step search scores it)
        n_cfg = sum(1 for s in states if s.cfg)
        stats = StepStats(len(states), len(states) + n_cfg, time.perf_counter() - t0, self._last_adapters)
        self.last_step = stats
        return stats
