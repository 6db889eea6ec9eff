"""The policy as the trainer sees it: p_theta(x_prev | x_t), one DDIM step with eta > 0 on the job's schedule
through the serving code (`SpoPipeline.guided_eps` for the UNet with classifier-free guidance, the adapters
at per-row scales; `sampler.ddim_step`).

Both halves of a round use it: the roll-out samples with `eps` and `step`, the loss scores recorded
transitions with `logprob` under the policy's and the reference's adapter scales. Latents stay fp32 along
a trajectory; the UNet runs in the pipeline's dtype.
"""

from __future__ import annotations

import torch

from spo_runtime.model.pipeline import SpoPipeline
from spo_runtime.sampling.sampler import ddim_step, ddim_transition_logprob, make_schedule

__all__ = ["DdimPolicy"]


class DdimPolicy:
    """The pipeline's UNet as a DDIM(eta) policy over `num_inference_steps` steps. A `step` argument is a
    (B,) tensor of schedule indices, one per row; `scales` maps adapter names to their scale for every row."""

    def __init__(self, pipe: SpoPipeline, num_inference_steps: int, eta: float):
        self.pipe = pipe
        self.eta = eta
        self.schedule = make_schedule("ddim", num_inference_steps, pipe.noise)

    def eps(self, x: torch.Tensor, step: torch.Tensor, cond: dict, scales: dict[str, float]) -> torch.Tensor:
        """Guided noise prediction for latents x (B, C, h, w) at schedule indices `step`."""
        t = self.schedule.timesteps[step].to(x.device)
        # latents stay fp32 along the trajectory; the UNet runs in the pipeline's dtype
        return self.pipe.guided_eps(x.to(self.pipe.dtype), t, cond, [scales] * len(x))

    def step(self, x: torch.Tensor, eps: torch.Tensor, step: torch.Tensor, noise: torch.Tensor | None = None):
        """One DDIM step from x at `step`: (x_prev, x0, mean, std), x_prev = mean + std * noise."""
        sch = self.schedule
        return ddim_step(x, eps, sch.alpha_t[step], sch.alpha_prev[step], torch.full((len(x),), self.eta), noise)

    def logprob(self, x_t: torch.Tensor, x_prev: torch.Tensor, step: torch.Tensor, cond: dict,
                scales: dict[str, float]) -> torch.Tensor:
        """log p(x_prev | x_t) (B,) of recorded transitions (averaged over C, h, w), differentiable in the
        adapter's parameters when called with grad; `cond` holds one row per transition."""
        eps = self.eps(x_t, step, cond, scales)
        _, _, mean, std = self.step(x_t.float(), eps.float(), step)
        return ddim_transition_logprob(x_prev.float(), mean, std)
