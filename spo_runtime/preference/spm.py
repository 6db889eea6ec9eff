"""Step-aware preference model (SPM) of SPO (arXiv 2406.04314), SDXL variant: the architecture, its
configurations (`spm_config`) and random construction (`build_spm`). Reading and writing its checkpoints is
`spm_weights`; the scorers that use it are `scorers` (all in `spo_runtime.preference`).

The SPM is PickScore v1 (a transformers ``CLIPModel``, CLIP ViT-H/14) whose vision tower is conditioned
on the diffusion timestep:

* ``t_embedder``: sinusoidal 256-d embedding (DiT style, max period 10000, ``[cos, sin]``) ->
  ``Linear(256, W)`` -> SiLU -> ``Linear(W, W)``, W = vision hidden size (1280).
* every vision encoder layer gets ``adaLN_modulation`` = SiLU -> ``Linear(W, 6W)`` whose output is chunked
  as ``shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp`` (DiT order, as in the public SPO code)::

      x = x + gate_msa * attn(layer_norm1(x) * (1 + scale_msa) + shift_msa)
      x = x + gate_mlp * mlp(layer_norm2(x) * (1 + scale_mlp) + shift_mlp)

* ``vision_model.adaLN_modulation`` = SiLU -> ``Linear(W, 2W)`` chunked as ``shift, scale`` and applied to
  the pooled CLS token after ``post_layernorm``: ``pooled * (1 + scale) + shift``; then ``visual_projection``.
* the text tower is plain CLIP (``CLIPModel.get_text_features``).

Score = ``logit_scale.exp() * cos(image_embeds, text_embeds)``.

The released checkpoint is an fp32 state dict of a wrapper whose only child is ``model``: every key is the
transformers ``CLIPModel`` name (plus the additions above) prefixed with ``model.``. ``spm_weights.load_spm_weights``
is strict about it (see there).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FREQUENCY_EMBEDDING_SIZE",
    "SpmPreset",
    "StepAwarePreferenceModel",
    "TimestepEmbedder",
    "build_spm",
    "spm_config",
    "timestep_embedding",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FREQUENCY_EMBEDDING_SIZE = 256
MAX_PERIOD = 10000

SpmPreset = Literal["tiny", "sdxl-random", "sdxl"]  # not model.presets.Preset: the SPM has its own sizes


# --------------------------------------------------------------------------------------------- config


def spm_config(preset: SpmPreset) -> CLIPConfig:
    """The ``CLIPConfig`` of an SPM preset.

    ``"sdxl"`` / ``"sdxl-random"``: PickScore v1 = laion/CLIP-ViT-H-14-laion2B-s32B-b79K (vision 1280 x 32
    layers, 16 heads, MLP 5120, patch 14, image 224; text 1024 x 24 layers, 16 heads, MLP 4096, vocab 49408,
    77 positions; projection 1024; ``gelu`` (not CLIP's default quick_gelu); layer_norm_eps 1e-5;
    text bos/eos/pad ids 0/2/1 as in the released config, i.e. transformers' legacy "argmax of input_ids"
    pooling of the end-of-text token).
    ``"tiny"``: same structure, small dims (vision 32 x 2, image 28 = 2x2 patches of 14; text 32 x 2,
    vocab 1000; projection 16) for fast CPU tests.
    """
    common_text = dict(
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        max_position_embeddings=77,
        attention_dropout=0.0,
        dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    common_vision = dict(
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        num_channels=3,
        attention_dropout=0.0,
        dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
    )
    if preset in ("sdxl", "sdxl-random"):
        text = dict(common_text, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, vocab_size=49408, projection_dim=1024)
        vision = dict(common_vision, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=16, patch_size=14, image_size=224, projection_dim=1024)
        projection_dim = 1024
    elif preset == "tiny":
        text = dict(common_text, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, vocab_size=1000, projection_dim=16)
        vision = dict(common_vision, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, patch_size=14, image_size=28, projection_dim=16)
        projection_dim = 16
    else:
        raise ValueError(f"preset: unknown SPM preset {preset!r} (expected 'tiny', 'sdxl-random' or 'sdxl')")
    return CLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=projection_dim,
        logit_scale_init_value=2.6592,
        initializer_factor=1.0,
    )


# ------------------------------------------------------------------------------------------- modules


def timestep_embedding(timesteps: Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE,
                       max_period: float = MAX_PERIOD) -> Tensor:
    """DiT/GLIDE sinusoidal embedding, fp32: ``[cos(t * f_i), sin(t * f_i)]``, ``f_i = exp(-ln(max_period) * i / half)``."""
    t = timesteps.reshape(-1).to(torch.float32)
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = t[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar timestep -> W-d vector: sinusoidal embedding, then ``mlp`` = Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, timesteps: Tensor) -> Tensor:
        freq = timestep_embedding(timesteps, self.frequency_embedding_size)
        weight = self.mlp[0].weight
        return self.mlp(freq.to(device=weight.device, dtype=weight.dtype))


def _adaln(hidden_size: int, n_chunks: int) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n_chunks * hidden_size, bias=True))


def _to_feature_tensor(out) -> Tensor:
    """``get_*_features`` returns a tensor in transformers 4.x and a ``BaseModelOutputWithPooling`` in 5.x."""
    if isinstance(out, Tensor):
        return out
    return out.pooler_output


def _l2_normalize(x: Tensor) -> Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True)


class StepAwarePreferenceModel(nn.Module):
    """PickScore with a timestep-conditioned vision tower. ``self.model.state_dict()`` keys are the
    released checkpoint keys without the ``model.`` prefix."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.model = CLIPModel(config)
        width = config.vision_config.hidden_size
        vision = self.model.vision_model
        for layer in vision.encoder.layers:
            layer.adaLN_modulation = _adaln(width, 6)
        vision.adaLN_modulation = _adaln(width, 2)
        self.model.t_embedder = TimestepEmbedder(width)
        self.reset_timestep_parameters()

    # -- init ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_timestep_parameters(self, std: float = 0.02) -> None:
        """Random init of the added modules (uses the global RNG): linear weights ~ N(0, std); biases such
        that a zero time condition is the identity: shift = scale = 0, gate = 1 (per layer), shift =
        scale = 0 (final). ``std=0`` makes every adaLN exactly the identity, i.e. the model equals plain
        CLIP whatever the timestep."""
        width = self.config.vision_config.hidden_size
        for layer in self.model.vision_model.encoder.layers:
            lin = layer.adaLN_modulation[1]
            nn.init.normal_(lin.weight, std=std) if std > 0 else nn.init.zeros_(lin.weight)
            bias = torch.zeros(6, width, dtype=lin.bias.dtype, device=lin.bias.device)
            bias[2] = 1.0  # gate_msa
            bias[5] = 1.0  # gate_mlp
            lin.bias.copy_(bias.reshape(-1))
        lin = self.model.vision_model.adaLN_modulation[1]
        nn.init.normal_(lin.weight, std=std) if std > 0 else nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
        for idx in (0, 2):
            lin = self.model.t_embedder.mlp[idx]
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    # -- helpers ------------------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        return int(self.config.vision_config.image_size)

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale

    def _param(self) -> Tensor:
        return self.model.visual_projection.weight

    def _timesteps(self, timesteps, batch: int, device) -> Tensor:
        t = torch.as_tensor(timesteps, device=device).reshape(-1)
        if t.numel() == 1 and batch != 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"timesteps: expected 1 or {batch} values, got {t.numel()}")
        return t

    # -- forward pieces ----------------------------------------------------------------------------

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] images (B, 3, H, W) -> CLIP pixel values (B, 3, S, S), S = vision image_size, fp32.

        Same steps as SPO's ``get_preference_score``: bicubic resize (no antialias) so the short side is S
        (long side ``int(L * S / short + 0.5)``), centre crop (torchvision rounding), ``x / 2 + 0.5``
        clamped to [0, 1], CLIP mean/std normalisation. Pure torch, differentiable, on the input's device.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected (B, 3, H, W), got {tuple(images.shape)}")
        size = self.image_size
        x = images.to(torch.float32)
        h, w = x.shape[-2:]
        scale = size / min(h, w)
        new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False)
        if (new_h, new_w) != (size, size):
            top = int(round((new_h - size) / 2.0))
            left = int(round((new_w - size) / 2.0))
            x = x[..., top:top + size, left:left + size]
        x = (x / 2 + 0.5).clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def image_embeds(self, pixel_values: Tensor, timesteps) -> Tensor:
        """Normalised (B, projection_dim) image embeddings of CLIP pixel values at the given timesteps."""
        clip = self.model
        vision = clip.vision_model
        dtype = self._param().dtype
        pixel_values = pixel_values.to(dtype)
        batch = pixel_values.shape[0]
        t = self._timesteps(timesteps, batch, pixel_values.device)
        cond = clip.t_embedder(t)  # (B, W)

        hidden = vision.embeddings(pixel_values)
        hidden = vision.pre_layrnorm(hidden)
        for layer in vision.encoder.layers:
            mod = layer.adaLN_modulation(cond).unsqueeze(1)  # (B, 1, 6W)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
            h = layer.layer_norm1(hidden) * (1 + scale_msa) + shift_msa
            h = layer.self_attn(hidden_states=h)[0]
            hidden = hidden + gate_msa * h
            h = layer.layer_norm2(hidden) * (1 + scale_mlp) + shift_mlp
            h = layer.mlp(h)
            hidden = hidden + gate_mlp * h

        pooled = vision.post_layernorm(hidden[:, 0, :])
        shift, scale = vision.adaLN_modulation(cond).chunk(2, dim=-1)
        pooled = pooled * (1 + scale) + shift
        return _l2_normalize(clip.visual_projection(pooled))

    def text_embeds(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Normalised (B, projection_dim) text embeddings (plain ``CLIPModel.get_text_features``)."""
        input_ids = input_ids.to(self._param().device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(input_ids.device)
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return _l2_normalize(_to_feature_tensor(out))

    def scores_from_embeds(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """(B,) scores of normalised embeddings; text rows broadcast (1 row scores every image)."""
        text_embeds = text_embeds.to(device=image_embeds.device, dtype=image_embeds.dtype)
        return self.model.logit_scale.exp() * (image_embeds * text_embeds).sum(dim=-1)

    def forward(self, images: Tensor, timesteps, input_ids: Tensor,
                attention_mask: Tensor | None = None) -> Tensor:
        """Preference scores (B,) of [-1, 1] images at ``timesteps`` for the tokenised prompts."""
        image = self.image_embeds(self.preprocess(images), timesteps)
        text = self.text_embeds(input_ids, attention_mask)
        return self.scores_from_embeds(image, text)


# --------------------------------------------------------------------------------------------- build


def build_spm(preset: SpmPreset, device="cpu", dtype: torch.dtype = torch.float32,
              seed: int = 0) -> StepAwarePreferenceModel:
    """A randomly initialised SPM, deterministic in ``seed`` (built on CPU under a forked RNG, then moved;
    the global RNG is left untouched). ``device="meta"`` builds the structure only, without memory."""
    config = spm_config(preset)
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            model = StepAwarePreferenceModel(config)
        return model.to(dtype=dtype).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = StepAwarePreferenceModel(config)
    return model.to(device=device, dtype=dtype).eval()
