"""The VAE side of the pipeline: the latent scaling between the VAE's space and the UNet's (one pair of
functions, both directions), img2img's starting latent, batched decoding of finished rows (a row holding
NaN or Inf becomes a `NonFiniteError`), and the cheap per-step preview of a latent."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from spo_runtime.errors import NonFiniteError
from spo_runtime.model.vae_slices import decode_in_slices, rows_per_slice
from spo_runtime.sampling.sampler import SamplerRow, add_noise, img2img_start, initial_noise
from spo_runtime.speed import compiling


def _moments(config, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The VAE's per-channel latent mean and std as (1, C, 1, 1) tensors like `like`, when its config has them."""
    if config.get("latents_mean") is None or config.get("latents_std") is None:
        return None
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(like)
    std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(like)
    return mean, std


def to_unet(z: torch.Tensor, config) -> torch.Tensor:
    """A VAE latent in the UNet's scale (diffusers' pipelines): s * z, or (z - mean) * s / std with statistics."""
    m = _moments(config, z)
    if m is None:
        return config.scaling_factor * z
    mean, std = m
    return (z - mean) * config.scaling_factor / std


def from_unet(z: torch.Tensor, config) -> torch.Tensor:
    """The inverse of `to_unet`: z / s, or z * std / s + mean with statistics."""
    m = _moments(config, z)
    if m is None:
        return z / config.scaling_factor
    mean, std = m
    return z * std / config.scaling_factor + mean


class VaeCodec:
    """The VAE resident on one device; `dtype` is the UNet's (the latents'), the VAE may run in float32."""

    def __init__(self, vae: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.downscale = 2 ** (len(vae.config.block_out_channels) - 1)  # image pixels per latent pixel, each side
        self.buckets: tuple[int, ...] | None = None  # SPO_BATCH_BUCKETS: decode batches padded to these sizes
        self.max_rows: int | None = None  # SPO_VAE_DECODE_BATCH; None: slices sized by free device memory
        self.compiled = False
        self._decoder = self._decode
        self._preview_map: torch.Tensor | None = None

    def compile(self, backend: str = "inductor", mode: str = "default") -> None:
        """The VAE channels-last (its convolutions' fast layout on tensor cores) and its decode compiled."""
        self.vae = self.vae.to(memory_format=torch.channels_last)
        self._decoder = compiling.compile_module(self._decode, backend, mode)
        self.compiled = True

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            z = z.contiguous(memory_format=torch.channels_last)
        return self.vae.decode(z, return_dict=False)[0]

    def run_decoder(self, z: torch.Tensor) -> torch.Tensor:
        """The (compiled, once `compile` ran) VAE decoder on latents in the VAE's scale: images in [-1, 1]."""
        return self._decoder(z)

    @torch.inference_mode()
    def img2img_latents(self, image: Image.Image, row: SamplerRow, width: int, height: int, strength: float) -> torch.Tensor:
        """The starting latent of an img2img row, as diffusers' SDXL img2img pipeline makes it for the same
        seed: the image resized (Lanczos) to the output size, scaled to [-1, 1], VAE-encoded with a sample
        of the posterior drawn from the row's generator, scaled, then noised (a second draw) to the level of
        the step the row starts at; the row then skips the schedule's first steps."""
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.LANCZOS)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        x = (x * 2.0 - 1.0).to(device=self.device, dtype=self.vae.dtype)
        posterior = self.vae.encode(x).latent_dist
        sample = torch.randn(posterior.mean.shape, generator=row.generator, device=row.generator.device,
                             dtype=posterior.mean.dtype).to(posterior.mean.device)
        z = to_unet((posterior.mean + posterior.std * sample).to(self.dtype), self.vae.config)
        row.step = row.start = img2img_start(row.schedule.num_steps, strength)
        noise = initial_noise(row.generator, tuple(z.shape[1:]), self.dtype, self.device)
        return add_noise(row.schedule, row.step, z, noise)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, seeds: list[int]) -> list[Image.Image | NonFiniteError]:
        """(N, C, h, w) latents in the UNet's scale -> N RGB images, in VAE calls of as many rows as free memory
        (or SPO_VAE_DECODE_BATCH) allows, each padded to a bucket, halved on out of memory (`vae_slices`); a row
        whose latent or decoded image holds NaN or Inf gets a NonFiniteError naming its seed instead."""
        n = len(latents)
        bad = ~torch.isfinite(latents).flatten(1).all(dim=1)
        z = from_unet(latents.to(self.vae.dtype), self.vae.config)
        pixels = z.shape[2] * z.shape[3] * self.downscale ** 2
        rows = rows_per_slice(n, pixels, self.vae.dtype, self.device, self.max_rows)

        def padded(zs: torch.Tensor) -> torch.Tensor:
            return self._decoder(compiling.pad_rows(zs, compiling.bucket(len(zs), self.buckets)))[: len(zs)]

        img = decode_in_slices(padded, z, rows, on_oom=_empty_cache)
        bad |= ~torch.isfinite(img).flatten(1).all(dim=1)
        # diffusers' VaeImageProcessor.postprocess: [-1, 1] -> [0, 1] -> round(x * 255)
        arr = (img / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        arr = (arr * 255).round().astype(np.uint8)
        out: list[Image.Image | NonFiniteError] = []
        for i in range(n):
            if bool(bad[i]):
                where = "latent" if not torch.isfinite(latents[i]).all() else "decoded image"
                out.append(NonFiniteError(f"request {i}: the {where} holds NaN or Inf (seed {seeds[i]})"))
            else:
                out.append(Image.fromarray(arr[i]))
        return out

    @torch.inference_mode()
    def images(self, latents: torch.Tensor, min_side: int | None = None) -> torch.Tensor:
        """(N, C, h, w) latents in the UNet's scale -> (N, 3, H, W) float32 images in [-1, 1] on the device, in one
        VAE call of the uncompiled decoder (its sizes vary). `min_side`: decode smaller, for a scorer that looks at
        `min_side` pixels: the latent area-averaged by the largest power of two that keeps the image's short side
        >= min_side (an SPM, 224 pixels, sees a 1024x1024 image decoded at 256x256: 1/16 of the decoder's work)."""
        f, short = 1, min(latents.shape[-2:])
        while min_side and short % (2 * f) == 0 and short // (2 * f) * self.downscale >= min_side:
            f *= 2
        z = torch.nn.functional.avg_pool2d(latents.float(), f) if f > 1 else latents
        img = self.vae.decode(from_unet(z.to(self.vae.dtype), self.vae.config), return_dict=False)[0]
        return img.float().clamp(-1, 1)

    def preview(self, latents: torch.Tensor) -> Image.Image:
        """A small RGB picture of a (1, C, h, w) latent, one pixel per latent pixel, through a fixed linear
        latent-to-RGB map: no VAE call per step. The map is fitted once per loaded model (least squares
        between the VAE's latents of a synthetic colour chart and the chart itself, 8x8-averaged)."""
        if self._preview_map is None:
            self._preview_map = self._fit_preview_map()
        z = latents.detach().to("cpu", torch.float32)[0]
        c, h, w = z.shape
        rgb = self._preview_map @ torch.cat([z.reshape(c, -1), torch.ones(1, h * w)])
        arr = ((rgb.reshape(3, h, w).permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return Image.fromarray(arr)

    @torch.inference_mode()
    def _fit_preview_map(self) -> torch.Tensor:
        size = 128
        y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
        hue = x * 6.0
        chart = torch.stack([(1 - (hue - k).remainder(6).sub(3).abs().sub(1).clamp(0, 1)) for k in (0, 2, 4)])  # hue bars
        chart = chart * (1 - y) + y * x  # fading to a grey ramp downwards
        img = (chart * 2 - 1)[None].to(device=self.device, dtype=self.vae.dtype)
        # the posterior mean times the scaling factor alone: the fitted affine map absorbs a per-channel mean and std
        z = self.vae.encode(img).latent_dist.mean.float().cpu()[0] * self.vae.config.scaling_factor
        c, h, w = z.shape
        target = torch.nn.functional.adaptive_avg_pool2d((chart * 2 - 1)[None], (h, w))[0].reshape(3, -1)
        a = torch.cat([z.reshape(c, -1), torch.ones(1, h * w)])  # (C + 1, N)
        return torch.linalg.lstsq(a.T, target.T).solution.T  # (3, C + 1)


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
