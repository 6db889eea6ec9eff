"""Vectorised sampler steps: every function takes one timestep (or sigma) per batch row.

The state that a diffusers scheduler object keeps (step index, schedule, multistep history,
generator) lives on each request's `SamplerRow`, so rows at different steps, with different step
counts and schedulers, share one UNet call. The arithmetic follows diffusers' DDIMScheduler,
EulerDiscreteScheduler and DPMSolverMultistepScheduler (dpmsolver++, midpoint, Karras sigmas)
operation for operation, so that `tests/test_sampler.py` can hold it to them.

Notation (Song et al. 2021, DDIM; Karras et al. 2022; Lu et al. 2022, DPM-Solver++):
    a_t      alpha-bar at training timestep t (`alphas_cumprod[t]`)
    sigma    sqrt((1 - a_t) / a_t), the noise level of the variance-exploding view
    x0       the model's estimate of the clean latent
    eps      the (guided) noise prediction
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

SCHEDULERS = ("ddim", "euler", "dpmpp_2m_karras")

# SDXL's scheduler settings (the DDIM config of stabilityai/stable-diffusion-xl-base-1.0).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "sample_max_value": 1.0,
    "trained_betas": None,
}


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule: beta_start/end, scaled_linear, T steps, leading spacing."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    steps_offset: int = 1

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        if config.get("beta_schedule", "scaled_linear") != "scaled_linear":
            raise ValueError(f"beta_schedule: only 'scaled_linear' is supported, got {config['beta_schedule']!r}")
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"prediction_type: only 'epsilon' is supported, got {config['prediction_type']!r}")
        if config.get("timestep_spacing", "leading") != "leading":
            raise ValueError(f"timestep_spacing: only 'leading' is supported, got {config['timestep_spacing']!r}")
        return cls(
            beta_start=float(config.get("beta_start", 0.00085)),
            beta_end=float(config.get("beta_end", 0.012)),
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            steps_offset=int(config.get("steps_offset", 1)),
        )

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return _alphas_cumprod(self.beta_start, self.beta_end, self.num_train_timesteps)


@lru_cache(maxsize=8)
def _alphas_cumprod(beta_start: float, beta_end: float, steps: int) -> torch.Tensor:
    # scaled_linear: betas are linear in sqrt space (float32, as diffusers computes them).
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass(frozen=True)
class Schedule:
    """One request's discretisation: what the UNet sees and what the step needs, per step index."""

    kind: str
    num_steps: int
    timesteps: torch.Tensor  # (n,) float32, the t passed to the UNet
    init_noise_sigma: float
    alpha_t: torch.Tensor | None = None  # (n,) ddim: a_t
    alpha_prev: torch.Tensor | None = None  # (n,) ddim: a_{t - T/n}, a_0 past the end
    sigmas: torch.Tensor | None = None  # (n + 1,) euler / dpm: sigma per step, 0 appended


@lru_cache(maxsize=512)
def make_schedule(kind: str, num_steps: int, noise: NoiseSchedule = NoiseSchedule()) -> Schedule:
    """The timesteps and coefficients diffusers' scheduler would set for `num_steps`."""
    if kind not in SCHEDULERS:
        raise ValueError(f"scheduler: must be one of {', '.join(SCHEDULERS)}, got {kind!r}")
    if num_steps < 1:
        raise ValueError(f"num_inference_steps: must be >= 1, got {num_steps}")
    ac = noise.alphas_cumprod
    T = noise.num_train_timesteps
    step_ratio = T // num_steps
    # leading spacing: t_i = (n - 1 - i) * (T // n) + offset
    leading = (np.arange(0, num_steps) * step_ratio).round()[::-1].copy().astype(np.int64) + noise.steps_offset
    if kind == "ddim":
        t = torch.from_numpy(leading)
        prev = t - step_ratio
        alpha_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], ac[0])  # set_alpha_to_one=False
        return Schedule(kind, num_steps, t.float(), 1.0, alpha_t=ac[t], alpha_prev=alpha_prev)

    all_sigmas = (((1 - ac) / ac) ** 0.5).numpy()  # float32, as diffusers
    if kind == "euler":
        ts = leading.astype(np.float32)
        sig = np.interp(ts, np.arange(0, len(all_sigmas)), all_sigmas)
        sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
        # leading spacing: the initial latent is scaled to sqrt(sigma_max^2 + 1)
        init = float((sigmas.max() ** 2 + 1) ** 0.5)
        return Schedule(kind, num_steps, torch.from_numpy(ts), init, sigmas=sigmas)

    # dpmpp_2m_karras: Karras et al. (2022) eq. 5 with rho = 7 between the schedule's extremes.
    log_sigmas = np.log(all_sigmas)
    flipped = np.flip(all_sigmas).copy()
    sigma_min, sigma_max = flipped[-1].item(), flipped[0].item()
    ramp = np.linspace(0, 1, num_steps)
    rho = 7.0
    sig = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    ts = np.array([_sigma_to_t(s, log_sigmas) for s in sig]).round()
    sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
    return Schedule(kind, num_steps, torch.from_numpy(ts.astype(np.float32)), 1.0, sigmas=sigmas)


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """Fractional training timestep of `sigma`, by linear interpolation in log-sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return float(((1 - w) * low + w * (low + 1)).reshape(()))


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) coefficients -> (B, 1, 1, 1) on `like`'s device."""
    return v.to(like.device).view(-1, *([1] * (like.dim() - 1)))


# ---------------------------------------------------------------------------------------------
# Pure step functions. Each takes per-row coefficients of shape (B,).


def ddim_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_prev: torch.Tensor,
    eta: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DDIM (Song et al. 2021, eq. 12). Returns (x_prev, x0, mean, std); x_prev = mean + std * noise."""
    a_t, a_prev = _rows(alpha_t, x), _rows(alpha_prev, x)
    beta_t = 1 - a_t
    x0 = (x - beta_t ** (0.5) * eps) / a_t ** (0.5)  # eq. 12, "predicted x0"
    # eq. 16: sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    variance = ((1 - a_prev) / beta_t) * (1 - a_t / a_prev)
    std = _rows(eta, x) * variance ** (0.5)
    mean = a_prev ** (0.5) * x0 + (1 - a_prev - std**2) ** (0.5) * eps  # "direction pointing to x_t"
    prev = mean if noise is None else mean + std * noise
    return prev, x0, mean, std


def ddim_transition_logprob(x_prev: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x_prev; mean, std^2) of the DDIM(eta > 0) transition, averaged over C, H, W -> (B,)."""
    logp = -((x_prev - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return logp.mean(dim=tuple(range(1, x_prev.dim())))


def euler_step(
    x: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler (Karras et al. 2022, Alg. 2 without churn) on the ODE dx/dsigma = (x - x0) / sigma."""
    s, s_next = _rows(sigma, x), _rows(sigma_next, x)
    x0 = x - s * eps
    derivative = (x - x0) / s
    return x + derivative * (s_next - s), x0


def dpmpp_2m_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sigma_prev: torch.Tensor,
    x0_prev: torch.Tensor,
    second_order: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, midpoint form) on VP latents.

    Rows with `second_order` False take the first-order step (the first and the last step).
    Returns (x_next, x0) where x0 becomes the row's `x0_prev` for its next step.
    """

    def alpha_sigma(s):  # VE sigma -> VP (alpha_t, sigma_t)
        a = 1 / ((s**2 + 1) ** 0.5)
        return a, s * a

    a_s0, s_s0 = alpha_sigma(_rows(sigma, x))
    a_t, s_t = alpha_sigma(_rows(sigma_next, x))
    a_s1, s_s1 = alpha_sigma(_rows(sigma_prev, x))
    x0 = (x - s_s0 * eps) / a_s0  # data prediction
    lam_t, lam_s0, lam_s1 = (torch.log(a) - torch.log(s) for a, s in ((a_t, s_t), (a_s0, s_s0), (a_s1, s_s1)))
    h = lam_t - lam_s0
    first = (s_t / s_s0) * x - (a_t * (torch.exp(-h) - 1.0)) * x0
    r0 = (lam_s0 - lam_s1) / h
    d1 = (1.0 / r0) * (x0 - x0_prev)
    second = first - 0.5 * (a_t * (torch.exp(-h) - 1.0)) * d1
    # torch.where keeps the unselected branch's inf/nan (final sigma 0, missing history) out.
    return torch.where(_rows(second_order, x), second, first), x0


# ---------------------------------------------------------------------------------------------
# Per-request state and the batched step over rows of mixed schedulers.


@dataclass
class SamplerRow:
    """One row's place in its schedule: the schedule, the step index, its generator and multistep memory."""

    schedule: Schedule
    generator: torch.Generator
    eta: float = 0.0
    step: int = 0
    x0_prev: torch.Tensor | None = field(default=None, repr=False)  # dpm++ 2M history, (1, C, h, w)
    start: int = 0  # the step it started at (img2img rows skip the schedule's first steps)

    @property
    def done(self) -> bool:
        return self.step >= self.schedule.num_steps

    @property
    def timestep(self) -> float:
        return float(self.schedule.timesteps[self.step])

    @property
    def input_scale(self) -> float:
        """Factor applied to x before the UNet (Euler's c_in = 1 / sqrt(sigma^2 + 1); 1 otherwise)."""
        if self.schedule.kind == "euler":
            return float(1 / ((self.schedule.sigmas[self.step] ** 2 + 1) ** 0.5))
        return 1.0


def add_noise(schedule: Schedule, step: int, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The latent an img2img row starts from: `x0` noised to the level of `step` of `schedule`, as the
    scheduler's `add_noise` does once the pipeline has set its begin index to `step`.
    DDIM: sqrt(a_t) x0 + sqrt(1 - a_t) noise; Euler: x0 + sigma noise; DPM++ (VP form): alpha (x0 + sigma noise)."""
    if schedule.kind == "ddim":
        a = schedule.alpha_t[step].to(x0.dtype)
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise
    sigma = schedule.sigmas[step].to(x0.dtype)
    if schedule.kind == "euler":
        return x0 + noise * sigma
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha * x0 + sigma * alpha * noise


def img2img_start(num_steps: int, strength: float) -> int:
    """The step an img2img row starts at: the last int(num_steps * strength) steps run (diffusers' get_timesteps)."""
    return num_steps - min(int(num_steps * strength), num_steps)


def initial_noise(
    generator: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """One row's starting noise, drawn as diffusers' randn_tensor does for a CPU generator."""
    return torch.randn((1, *shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def model_inputs(rows: list[SamplerRow], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled x, per-row timesteps) for the UNet call over `rows`."""
    scale = torch.tensor([r.input_scale for r in rows], dtype=torch.float32)
    t = torch.tensor([r.timestep for r in rows], dtype=torch.float32, device=x.device)
    if bool((scale != 1.0).any()):
        x = (x.float() * _rows(scale, x)).to(x.dtype)
    return x, t


def step_rows(rows: list[SamplerRow], x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance every row by one step of its own scheduler. Returns (x_next, x0), both (B, C, h, w).

    Mutates each row's step index (and DPM history). Noise for DDIM eta > 0 comes from each row's
    own generator, in the order diffusers draws it for that request alone.
    """
    out = torch.empty_like(x)
    x0_all = torch.empty_like(x)
    for kind in SCHEDULERS:
        idx = [i for i, r in enumerate(rows) if r.schedule.kind == kind]
        if not idx:
            continue
        sel = [rows[i] for i in idx]
        index = torch.tensor(idx, device=x.device)
        xs, es = x.index_select(0, index), eps.index_select(0, index)
        if kind == "ddim":
            a_t = torch.stack([r.schedule.alpha_t[r.step] for r in sel])
            a_prev = torch.stack([r.schedule.alpha_prev[r.step] for r in sel])
            eta = torch.tensor([r.eta for r in sel], dtype=torch.float32)
            noise = None
            if any(r.eta > 0 for r in sel):
                noise = torch.cat(
                    [
                        initial_noise(r.generator, tuple(xs.shape[1:]), es.dtype, x.device)
                        if r.eta > 0
                        else torch.zeros((1, *xs.shape[1:]), dtype=es.dtype, device=x.device)
                        for r in sel
                    ]
                )
            prev, x0, _, _ = ddim_step(xs, es, a_t, a_prev, eta, noise)
        elif kind == "euler":
            sigma = torch.stack([r.schedule.sigmas[r.step] for r in sel])
            sigma_next = torch.stack([r.schedule.sigmas[r.step + 1] for r in sel])
            prev, x0 = euler_step(xs.float(), es, sigma, sigma_next)
        else:
            sigma = torch.stack([r.schedule.sigmas[r.step] for r in sel])
            sigma_next = torch.stack([r.schedule.sigmas[r.step + 1] for r in sel])
            sigma_prev = torch.stack([r.schedule.sigmas[max(r.step - 1, 0)] for r in sel])
            # first order without history (the row's first step: step 0, or an img2img row's start) and on
            # the last (final sigma 0), second order between
            second = torch.tensor([r.x0_prev is not None and r.step < r.schedule.num_steps - 1 for r in sel])
            history = torch.cat([r.x0_prev if r.x0_prev is not None else torch.zeros_like(xs[:1]) for r in sel])
            prev, x0 = dpmpp_2m_step(xs.float(), es, sigma, sigma_next, sigma_prev, history.float(), second)
            for j, r in enumerate(sel):
                r.x0_prev = x0[j : j + 1]
        out.index_copy_(0, index, prev.to(x.dtype))
        x0_all.index_copy_(0, index, x0.to(x.dtype))
    for r in rows:
        r.step += 1
    return out, x0_all
