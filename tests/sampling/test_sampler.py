"""Our vectorised steps against diffusers' schedulers, step by step, on random tensors."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from spo_runtime.sampling.sampler import (
    SDXL_SCHEDULER_CONFIG,
    SamplerRow,
    ddim_step,
    ddim_transition_logprob,
    initial_noise,
    make_schedule,
    model_inputs,
    step_rows,
)


def diffusers_scheduler(kind):
    if kind == "ddim":
        return DDIMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    if kind == "euler":
        return EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    return DPMSolverMultistepScheduler.from_config(SDXL_SCHEDULER_CONFIG, use_karras_sigmas=True)


def fake_eps(x, t, salt):
    """A deterministic stand-in for the UNet: smooth in x, dependent on t and on the row."""
    return torch.tanh(0.7 * x + 0.001 * t) + 0.1 * salt


@pytest.mark.parametrize("kind", ["ddim", "euler", "dpmpp_2m_karras"])
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 30])
def test_schedule_matches_diffusers(kind, steps):
    ref = diffusers_scheduler(kind)
    ref.set_timesteps(steps)
    ours = make_schedule(kind, steps)
    assert torch.equal(ours.timesteps, ref.timesteps.float())
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    if kind != "ddim":
        assert torch.equal(ours.sigmas, ref.sigmas)


def test_sdxl_20_step_ddim_timesteps_are_the_papers():
    s = make_schedule("ddim", 20)
    assert s.timesteps.long().tolist() == list(range(951, 0, -50))


@pytest.mark.parametrize("kind", ["ddim", "euler", "dpmpp_2m_karras"])
@pytest.mark.parametrize("steps", [4, 20])
def test_trajectory_matches_diffusers_step_by_step(kind, steps):
    shape = (4, 8, 8)
    ref = diffusers_scheduler(kind)
    ref.set_timesteps(steps)
    g_ref = torch.Generator().manual_seed(7)
    x_ref = torch.randn((1, *shape), generator=g_ref) * ref.init_noise_sigma

    row = SamplerRow(make_schedule(kind, steps), torch.Generator().manual_seed(7))
    x = initial_noise(row.generator, shape, torch.float32, "cpu") * row.schedule.init_noise_sigma
    assert torch.equal(x, x_ref)
    worst = 0.0
    for t in ref.timesteps:
        inp_ref = ref.scale_model_input(x_ref, t)
        inp, t_ours = model_inputs([row], x)
        assert float(t_ours[0]) == float(t)
        assert torch.allclose(inp, inp_ref, atol=1e-6, rtol=1e-6)
        x_ref = ref.step(fake_eps(inp_ref, float(t), 0), t, x_ref).prev_sample
        x, _ = step_rows([row], x, fake_eps(inp, float(t), 0))
        worst = max(worst, float((x - x_ref).abs().max()))
    assert row.done
    assert worst < 1e-5, worst


def test_ddim_eta1_with_shared_generator_matches_diffusers():
    steps, shape = 10, (4, 8, 8)
    ref = diffusers_scheduler("ddim")
    ref.set_timesteps(steps)
    g_ref = torch.Generator().manual_seed(3)
    x_ref = torch.randn((1, *shape), generator=g_ref)
    row = SamplerRow(make_schedule("ddim", steps), torch.Generator().manual_seed(3), eta=1.0)
    x = initial_noise(row.generator, shape, torch.float32, "cpu")
    for t in ref.timesteps:
        x_ref = ref.step(fake_eps(x_ref, float(t), 0), t, x_ref, eta=1.0, generator=g_ref).prev_sample
        x, _ = step_rows([row], x, fake_eps(x, float(t), 0))
    assert torch.allclose(x, x_ref, atol=1e-5), float((x - x_ref).abs().max())


def test_mixed_batch_equals_each_row_alone():
    """Rows at different steps of different schedulers, one call, equal to each row run alone."""
    shape = (4, 8, 8)
    specs = [("ddim", 5, 0.0), ("euler", 7, 0.0), ("dpmpp_2m_karras", 6, 0.0), ("ddim", 9, 1.0), ("dpmpp_2m_karras", 3, 0.0)]

    def run(specs_subset, salts):
        rows = [SamplerRow(make_schedule(k, n), torch.Generator().manual_seed(100 + s), eta=e) for (k, n, e), s in zip(specs_subset, salts)]
        xs = [initial_noise(r.generator, shape, torch.float32, "cpu") * r.schedule.init_noise_sigma for r in rows]
        finals = [None] * len(rows)
        while any(not r.done for r in rows):
            live = [i for i, r in enumerate(rows) if not r.done]
            x = torch.cat([xs[i] for i in live])
            inp, t = model_inputs([rows[i] for i in live], x)
            salt = torch.tensor([salts[i] for i in live], dtype=torch.float32).view(-1, 1, 1, 1)
            eps = torch.tanh(0.7 * inp + 0.001 * t.view(-1, 1, 1, 1)) + 0.1 * salt
            x_next, _ = step_rows([rows[i] for i in live], x, eps)
            for j, i in enumerate(live):
                xs[i] = x_next[j : j + 1]
                if rows[i].done:
                    finals[i] = xs[i]
        return finals

    together = run(specs, list(range(len(specs))))
    for i, spec in enumerate(specs):
        alone = run([spec], [i])[0]
        assert torch.allclose(together[i], alone, atol=1e-6), (spec, float((together[i] - alone).abs().max()))


def test_ddim_logprob_matches_hand_computation():
    # One hand-computed case: x_prev = mean + std * z with z = 1 everywhere -> log N = -1/2 - log std - log sqrt(2 pi)
    mean = torch.zeros(2, 4, 2, 2)
    std = torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    x_prev = mean + std
    lp = ddim_transition_logprob(x_prev, mean, std)
    expected = torch.tensor([-0.5 - math.log(0.5) - 0.5 * math.log(2 * math.pi), -0.5 - math.log(2.0) - 0.5 * math.log(2 * math.pi)])
    assert torch.allclose(lp, expected, atol=1e-6)
    # And against torch.distributions on random tensors.
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    s = make_schedule("ddim", 20)
    a_t, a_prev = s.alpha_t[[4, 10, 19]], s.alpha_prev[[4, 10, 19]]
    noise = torch.randn(3, 4, 8, 8, generator=g)
    prev, x0, mean, std = ddim_step(x, eps, a_t, a_prev, torch.ones(3), noise)
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(prev).mean(dim=(1, 2, 3))
    assert torch.allclose(ddim_transition_logprob(prev, mean, std), ref, atol=1e-5)
    # The SPO notes' std: eta * sqrt((1 - a_prev)/(1 - a_t) * (1 - a_t/a_prev)); final step uses a_0.
    from spo_runtime.sampling.sampler import NoiseSchedule

    assert float(s.alpha_prev[-1]) == float(NoiseSchedule().alphas_cumprod[0])  # prev_t = 1 - 50 < 0
    expected_std = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    assert torch.allclose(std.flatten(), expected_std, atol=1e-7)
