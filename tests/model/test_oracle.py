"""Oracle: our images equal diffusers' StableDiffusionXLPipeline on the same saved model, within 1/255.

diffusers loads the `save-tiny` directory and its LoRA with `load_lora_weights`, at each scale via
`set_adapters`; we load the same directory through SPO_BASE_MODEL / SPO_LORA (webui layout), with the
adapter fused at 1.0, so other scales also exercise the residual branch.
"""

import itertools

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from conftest import max_pixel_diff

SCHEDULERS = {
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg),
    "euler": lambda cfg: EulerDiscreteScheduler.from_config(cfg),
    "dpmpp_2m_karras": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True),
}

# Every scheduler x guidance x scale; seeds and negative prompts alternate over the product.
CASES = [
    (sched, guidance, scale, seed, negative)
    for n, (sched, guidance, scale) in enumerate(itertools.product(SCHEDULERS, [1.0, 5.0], [0.0, 0.5, 1.0]))
    for seed, negative in [((7, 1234)[n % 2], (None, "blurry, low quality")[(n // 2) % 2])]
]
OBSERVED = {}


def diffusers_image(dp, scheduler, steps, guidance, scale, seed, negative, prompt, eta=0.0):
    base_config = dp.scheduler.config
    dp.scheduler = SCHEDULERS[scheduler](base_config)
    dp.set_adapters(["spo"], adapter_weights=[scale])
    try:
        out = dp(
            prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
            height=64, width=64, generator=torch.Generator("cpu").manual_seed(seed), eta=eta,
        ).images[0]
    finally:
        dp.scheduler = DDIMScheduler.from_config(base_config)
    return out


@pytest.mark.parametrize("scheduler,guidance,scale,seed,negative", CASES)
def test_matches_diffusers(pipe, diffusers_pipe, scheduler, guidance, scale, seed, negative):
    prompt = "a watercolor fox in a snowy forest"
    steps = 4
    ours = pipe.generate([dict(prompt=prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                               scheduler=scheduler, seed=seed, lora_scale=scale)])[0]
    ref = diffusers_image(diffusers_pipe, scheduler, steps, guidance, scale, seed, negative, prompt)
    diff = max_pixel_diff(ours.image, ref)
    OBSERVED[(scheduler, guidance, scale)] = diff
    print(f"max pixel diff {scheduler} g={guidance} s={scale}: {diff}/255")
    assert ours.seed == seed and ours.lora_scale == scale
    assert diff <= 1


def test_ddim_eta_one_matches_diffusers(pipe, diffusers_pipe):
    ours = pipe.generate([dict(prompt="an owl at night", num_inference_steps=5, seed=11, eta=1.0)])[0]
    ref = diffusers_image(diffusers_pipe, "ddim", 5, 5.0, 1.0, 11, None, "an owl at night", eta=1.0)
    assert max_pixel_diff(ours.image, ref) <= 1


def test_lora_changes_the_image(pipe):
    """The oracle would be vacuous if the LoRA did nothing: scale 0 and 1 must differ clearly."""
    a, b = pipe.generate([dict(prompt="a red car", seed=5, num_inference_steps=4, lora_scale=s) for s in (0.0, 1.0)])
    assert max_pixel_diff(a.image, b.image) > 20


def test_explicit_empty_negative_differs_from_absent(pipe, diffusers_pipe):
    """Absent negative -> zero embeddings (force_zeros_for_empty_prompt); "" is encoded, as in diffusers."""
    absent, empty = pipe.generate([dict(prompt="a cat", seed=3, num_inference_steps=4, negative_prompt=n) for n in (None, "")])
    assert max_pixel_diff(absent.image, empty.image) > 0
    ref = diffusers_image(diffusers_pipe, "ddim", 4, 5.0, 1.0, 3, "", "a cat")
    assert max_pixel_diff(empty.image, ref) <= 1
