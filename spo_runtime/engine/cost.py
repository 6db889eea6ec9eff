"""What an image costs the engine, so that admission counts work, not images (SPO_MAX_QUEUE_COST).

The unit is one UNet pass over one image of the preset's default size (1024x1024 for SDXL, 64x64 for tiny):
an image of w x h pixels that runs s denoising steps costs (w*h / default_size**2) * s * passes, where passes
is 2 with classifier-free guidance (guidance_scale > 1: a conditional and an unconditional row) and 1 without.
A default request (the default size, 20 steps, guidance 5) costs 40; eight 2048x2048 images of 100 guided
steps cost 6400. An img2img image counts only the steps it runs; a running image only those it has left.

Sums are kept in exact integers (pixels x steps x passes) and turned into units only to compare with the
limit and to report them, so admission at the limit itself does not depend on float rounding.
"""

from __future__ import annotations

from spo_runtime.requests import ActiveRequest, GenerationRequest
from spo_runtime.sampling.sampler import img2img_start

# What "an ordinary request" costs: GenerationRequest's defaults at the default size, with guidance.
ORDINARY_STEPS = GenerationRequest.model_fields["num_inference_steps"].default
ORDINARY_COST = ORDINARY_STEPS * (2 if GenerationRequest.model_fields["guidance_scale"].default > 1.0 else 1)


def passes(guidance_scale: float) -> int:
    """UNet rows per image per step: 2 with classifier-free guidance, 1 without (denoiser.guided_eps)."""
    return 2 if guidance_scale > 1.0 else 1


def steps_run(request: GenerationRequest) -> int:
    """The denoising steps `request` runs: all of them, or the last int(steps * strength) for img2img."""
    steps = request.num_inference_steps
    strength = request.img2img_strength
    return steps if strength is None else steps - img2img_start(steps, strength)


def waiting_cost(request: GenerationRequest, height: int, width: int) -> int:
    """Pixel-passes of an image not yet started (`height` x `width`: its resolved size)."""
    return height * width * steps_run(request) * passes(request.guidance_scale)


def running_cost(active: ActiveRequest) -> int:
    """Pixel-passes a running image has left: its remaining steps."""
    left = max(0, active.row.schedule.num_steps - active.row.step)
    return active.height * active.width * left * passes(active.request.guidance_scale)


def units(pixel_passes: int, default_size: int) -> float:
    """Pixel-passes in cost units (passes over a default-size image)."""
    return pixel_passes / (default_size * default_size)
