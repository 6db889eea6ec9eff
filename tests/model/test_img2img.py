"""Oracle: our img2img rows equal diffusers' StableDiffusionXLImg2ImgPipeline on the saved tiny model
within 1/255 for each scheduler, start where it starts, and batch with text-to-image rows unchanged."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline
from PIL import Image

from conftest import max_pixel_diff
from spo_runtime import GenerationRequest, InvalidRequestError
from spo_runtime.sampling.sampler import img2img_start
from test_oracle import SCHEDULERS


@pytest.fixture(scope="module")
def img2img_ref(tiny_dir, diffusers_pipe):
    p = StableDiffusionXLImg2ImgPipeline(**diffusers_pipe.components, requires_aesthetics_score=False,
                                         force_zeros_for_empty_prompt=True)
    p.set_progress_bar_config(disable=True)
    p.base_scheduler_config = dict(p.scheduler.config)  # from_config carries a scheduler's options to the next
    return p


@pytest.fixture(scope="module")
def init_image():
    rng = np.random.default_rng(3)
    return Image.fromarray((rng.random((72, 84, 3)) * 255).astype(np.uint8))  # 84 -> 80: rounded down to 8


def b64(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def reference(ref, scheduler, image, strength, seed, steps=10, scale=1.0, **kw):
    ref.scheduler = SCHEDULERS[scheduler](ref.base_scheduler_config)
    ref.set_adapters(["spo"], adapter_weights=[scale])
    return ref(prompt="a fox in snow", image=image, strength=strength, num_inference_steps=steps, guidance_scale=5.0,
               generator=torch.Generator("cpu").manual_seed(seed), **kw).images[0]


# each scheduler at a strength that starts it mid-schedule; DPM++ also from the very first step (1.0)
@pytest.mark.parametrize("scheduler,strength", [("ddim", 0.3), ("euler", 0.75), ("dpmpp_2m_karras", 0.5),
                                                ("dpmpp_2m_karras", 1.0)])
def test_img2img_matches_diffusers(pipe, img2img_ref, init_image, scheduler, strength):
    [ours] = pipe.generate([dict(prompt="a fox in snow", seed=11, num_inference_steps=6, scheduler=scheduler,
                                 init_image=b64(init_image), strength=strength)])
    theirs = reference(img2img_ref, scheduler, init_image, strength, 11, steps=6)
    assert ours.image.size == theirs.size == (80, 72)
    assert max_pixel_diff(ours.image, theirs) <= 1


def test_img2img_resizes_to_the_requested_size_like_diffusers(pipe, img2img_ref, init_image):
    [ours] = pipe.generate([dict(prompt="a fox in snow", seed=5, num_inference_steps=4, init_image=init_image,
                                 width=64, height=96, lora_scale=0.5)])
    # diffusers' img2img takes its size from the image: the user resizes first (PIL, Lanczos)
    theirs = reference(img2img_ref, "ddim", init_image.resize((64, 96), Image.LANCZOS), 0.75, 5, steps=4, scale=0.5)
    assert ours.image.size == (64, 96) and max_pixel_diff(ours.image, theirs) <= 1


def test_rows_start_where_diffusers_starts():
    # diffusers' get_timesteps: int(n * strength) steps run, the last ones
    assert [img2img_start(10, s) for s in (0.3, 0.75, 1.0, 0.1)] == [7, 3, 0, 9]
    assert img2img_start(20, 0.999) == 1


def test_mixed_batch_equals_each_row_alone(pipe, init_image):
    reqs = [
        dict(prompt="a cat", seed=1, num_inference_steps=4, width=80, height=72, scheduler="dpmpp_2m_karras"),
        dict(prompt="a fox in snow", seed=2, num_inference_steps=4, init_image=init_image, strength=0.5, scheduler="euler"),
        dict(prompt="a fox in snow", seed=4, num_inference_steps=4, init_image=init_image, strength=0.8,
             scheduler="dpmpp_2m_karras"),
    ]
    together = pipe.generate(reqs)
    for r, t in zip(reqs, together):
        assert max_pixel_diff(t.image, pipe.generate([r])[0].image) <= 1  # batch-size kernel noise, as for txt2img


def test_img2img_parameters_text_records_the_strength(pipe, init_image):
    [r] = pipe.generate([dict(prompt="a fox", seed=1, num_inference_steps=4, init_image=init_image, strength=0.5)])
    assert "Denoising strength: 0.5" in r.parameters_text()


@pytest.mark.parametrize("image,needle", [
    ("not base64!", "not valid base64"),
    (base64.b64encode(b"GIF89a....").decode(), "not decodable"),
    (12, "base64 string"),
])
def test_bad_images_are_refused_naming_init_image(pipe, image, needle):
    with pytest.raises(InvalidRequestError) as e:
        pipe.prepare([dict(prompt="a", init_image=image)])
    assert e.value.field == "init_image" and needle in str(e.value)


def test_image_sizes_the_preset_does_not_allow(pipe):
    big = Image.new("RGB", (512, 64))
    with pytest.raises(InvalidRequestError) as e:
        pipe.prepare([dict(prompt="a", init_image=b64(big))])
    assert e.value.field == "init_image" and "32..256" in str(e.value)
    assert pipe.prepare([dict(prompt="a", init_image=b64(big), width=128, height=64)])[0].width == 128  # resized
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    with pytest.raises(InvalidRequestError, match="init_image"):
        pipe.prepare([dict(prompt="a", init_image=base64.b64encode(gif.getvalue()).decode())])


def test_the_init_image_is_decoded_once_and_never_copied(pipe, init_image):
    """A decoded image is fresh and a library caller's PIL image is used as given: the request and the row keep
    that very object through parse and prepare (no copy of up to MAX_IMAGE_PIXELS per pass)."""
    assert GenerationRequest(prompt="a fox", init_image=init_image).init_image is init_image
    req = pipe.parse(dict(prompt="a fox", seed=2, num_inference_steps=4, init_image=b64(init_image)))
    decoded = req.init_image
    assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), np.asarray(init_image))
    [state] = pipe.prepare([req])
    assert state.request is req and state.request.init_image is decoded


def test_the_latent_scaling_pair_is_diffusers_and_inverts():
    """VAE -> UNet scale as diffusers' SDXL pipelines write it, with and without per-channel statistics, and back."""
    from diffusers.configuration_utils import FrozenDict

    from spo_runtime.model.vae import from_unet, to_unet

    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = FrozenDict(scaling_factor=0.13025)
    stats = FrozenDict(scaling_factor=0.5, latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
    mean, std = (torch.tensor(stats[k]).view(1, -1, 1, 1) for k in ("latents_mean", "latents_std"))
    assert torch.equal(to_unet(z, plain), 0.13025 * z) and torch.equal(from_unet(z, plain), z / 0.13025)
    assert torch.equal(to_unet(z, stats), (z - mean) * 0.5 / std) and torch.equal(from_unet(z, stats), z * std / 0.5 + mean)
    for cfg in (plain, stats):
        assert torch.allclose(from_unet(to_unet(z, cfg), cfg), z, atol=1e-6)


def test_too_many_pixels_refused_before_decoding(pipe):
    huge = io.BytesIO()
    Image.new("L", (5000, 4000)).save(huge, format="PNG")  # a few KB compressed, 20 M pixels
    with pytest.raises(InvalidRequestError) as e:
        pipe.prepare([dict(prompt="a", init_image=base64.b64encode(huge.getvalue()).decode())])
    assert "16,777,216 pixels" in str(e.value)


def test_sizes_are_refused_from_the_header_before_decoding(pipe, monkeypatch):
    """A PNG of 4096x4096 grey pixels is 20 KB; its size is read from the header and refused for the tiny preset
    (sides 32..256) whether the output would take its size or resize it: its pixels are never decoded."""
    import zlib

    side = 4096
    raw = zlib.compress(b"".join(b"\x00" + b"\x80" * side for _ in range(side)), 9)
    chunk = lambda kind, data: len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    bomb = base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0]))
                            + chunk(b"IDAT", raw) + chunk(b"IEND", b"")).decode()
    decoded = []
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", lambda self: decoded.append(self.size))
    for extra, needle in [({}, "sides in 32..256"), ({"width": 64, "height": 64}, "at most 256x256 = 65,536 pixels")]:
        with pytest.raises(InvalidRequestError) as e:
            pipe.parse(dict(prompt="a", init_image=bomb, **extra))
        assert e.value.field == "init_image" and "4096x4096" in str(e.value) and needle in str(e.value)
    assert decoded == []


def test_exif_orientation_is_applied_once_and_a_callers_image_is_not_changed(pipe):
    shown = Image.new("RGB", (64, 32), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter clockwise: 32 wide, 64 high
    buf = io.BytesIO()
    shown.save(buf, format="JPEG", exif=exif)
    req = pipe.parse(dict(prompt="a", init_image=base64.b64encode(buf.getvalue()).decode()))
    assert req.init_image.size == (32, 64) and req.init_image.mode == "RGB"
    assert pipe.parse(dict(prompt="a", init_image=req.init_image)).init_image is req.init_image  # not turned twice
    theirs = Image.open(io.BytesIO(buf.getvalue()))
    assert pipe.parse(dict(prompt="a", init_image=theirs)).init_image.size == (32, 64) and theirs.size == (64, 32)
    assert pipe.prepare([req])[0].width == 32


def test_strength_rules(pipe, init_image):
    with pytest.raises(InvalidRequestError, match="strength: only with init_image"):
        pipe.prepare([dict(prompt="a", strength=0.5)])
    with pytest.raises(InvalidRequestError, match="strength: with num_inference_steps=2 must be >= 0.5"):
        pipe.prepare([dict(prompt="a", init_image=init_image, num_inference_steps=2, strength=0.3)])
