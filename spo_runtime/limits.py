"""Every bound of the public contract, declared once: the request model, Settings, the HTTP bodies, the
admin state's check and the compatibility routes (OpenAI, A1111) all read them from here, and /docs.json
publishes them through the request model."""

from __future__ import annotations

import re

MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 4000
STEPS_RANGE = (1, 100)  # num_inference_steps
GUIDANCE_RANGE = (0.0, 30.0)  # guidance_scale
LORA_SCALE_RANGE = (-2.0, 2.0)  # a request's lora_scale, SPO_LORA_SCALE, /admin/lora_scale, admin_state.json
BEST_OF_RANGE = (1, 8)  # best_of: candidates per image, scored by the preference model (engine/selection.py)
SEARCH_STEPS_RANGE = (1, 20)  # search_steps: branch points of search "step"
DEFAULT_SEARCH_STEPS = 3  # search_steps unset: 3, or fewer when the image runs fewer than 4 steps
MAX_IMAGES = 8  # images of one request: /generate_batch's n, OpenAI's n, A1111's batch_size x n_iter
SIZE_RANGE = (32, 2048)  # the widest any preset allows; `GenerationRequest.for_sizes` narrows it to a preset's
MAX_IMAGE_PIXELS = 4096 * 4096  # an init_image larger than this is refused before it is decoded
DEFAULT_STRENGTH = 0.75  # img2img, as A1111's default denoising strength
# `^...$` for JSON Schema and pydantic (whose `$` is the end of the text); in Python use ADAPTER_NAME.fullmatch,
# as re's `$` also matches before a trailing newline ("x\n" would pass `.match`)
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ADAPTER_NAME_RULE = "1..64 characters of letters, digits, '_', '.', '-', starting with a letter or digit"
EVAL_MAX_PROMPTS = 256  # an evaluation job's prompts (/eval/submit)
EVAL_MAX_ADAPTERS = 8  # its entries (adapter and scale; "none" is the base model)
EVAL_MAX_SEEDS = 16  # its seeds per prompt
