"""Step-aware preference model (SPM) of SPO (arXiv 2406.04314), SDXL variant, and pluggable scorers.

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
transformers ``CLIPModel`` name (plus the additions above) prefixed with ``model.``. ``load_spm_weights`` is
strict about it (see there).
"""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Literal, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel

from spo_runtime.errors import CheckpointFormatError
from spo_runtime.model import weights

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FREQUENCY_EMBEDDING_SIZE",
    "BrightnessScorer",
    "PreferenceScorer",
    "SpmScorer",
    "StepAwarePreferenceModel",
    "TimestepEmbedder",
    "build_spm",
    "load_spm_weights",
    "save_spm_weights",
    "spm_config",
    "timestep_embedding",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FREQUENCY_EMBEDDING_SIZE = 256
MAX_PERIOD = 10000
CHECKPOINT_PREFIX = "model."

Preset = Literal["tiny", "sdxl-random", "sdxl"]


# --------------------------------------------------------------------------------------------- config


def spm_config(preset: Preset) -> CLIPConfig:
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


def build_spm(preset: Preset, device="cpu", dtype: torch.dtype = torch.float32,
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


# ---------------------------------------------------------------------------------------- checkpoint


def _format_keys(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _read_state_dict(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # SafetensorError, OSError on a truncated file, ...
            raise CheckpointFormatError(f"{path}: not a readable safetensors file ({exc})") from exc
    if suffix in (".bin", ".pt", ".pth"):
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointFormatError(
                f"{path}: not a plain tensor state dict loadable with torch.load(weights_only=True): {first}"
            ) from exc
    raise CheckpointFormatError(f"{path}: unsupported checkpoint extension {path.suffix!r} "
                                "(expected .safetensors, .bin, .pt or .pth)")


def load_spm_weights(model: StepAwarePreferenceModel, path) -> None:
    """Strictly load a released SPM checkpoint (keys ``model.<CLIPModel name>``) into ``model``.

    ``.safetensors`` is read with safetensors, ``.bin``/``.pt``/``.pth`` only with
    ``torch.load(weights_only=True, map_location="cpu")``. Keys may all carry the ``model.`` prefix (the
    released format) or all lack it. The only tolerated extras are the ``position_ids`` buffers that older
    transformers saved (``model.{text,vision}_model.embeddings.position_ids``); any other missing or
    unexpected key, a non-tensor value or a shape mismatch raises ``CheckpointFormatError`` naming the keys,
    and nothing is loaded. Values are cast to the model's dtype and device; a model on the ``meta`` device
    is materialised on CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SPM checkpoint not found: {path}")
    raw = _read_state_dict(path)
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"{path}: expected a dict of tensors, got {type(raw).__name__}")
    bad = [str(k) for k, v in raw.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointFormatError(f"{path}: entries that are not str -> tensor: {_format_keys(bad)}", keys=bad)

    prefixed = [k.startswith(CHECKPOINT_PREFIX) for k in raw]
    use_prefix = any(prefixed)
    prefix = CHECKPOINT_PREFIX if use_prefix else ""

    expected = model.model.state_dict()
    # non-persistent buffers (position_ids) are not in state_dict but old checkpoints carry them
    tolerated = {name for name, _ in model.model.named_buffers()
                 if name.rsplit(".", 1)[-1] == "position_ids" and name not in expected}

    state: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in raw.items():
        if use_prefix and not key.startswith(CHECKPOINT_PREFIX):
            unexpected.append(key)
            continue
        name = key[len(prefix):]
        if name in expected:
            state[name] = value
        elif name not in tolerated:
            unexpected.append(key)
    missing = [prefix + name for name in expected if name not in state]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_format_keys(unexpected)}")
        raise CheckpointFormatError(f"{path}: checkpoint does not match the SPM architecture; "
                                    + "; ".join(parts), keys=missing + unexpected)

    mismatched = [prefix + name for name, value in state.items() if value.shape != expected[name].shape]
    if mismatched:
        details = "; ".join(f"{k}: checkpoint {tuple(state[k[len(prefix):]].shape)} vs model "
                            f"{tuple(expected[k[len(prefix):]].shape)}" for k in mismatched[:12])
        raise CheckpointFormatError(f"{path}: shape mismatch: {details}", keys=mismatched)

    on_meta = any(t.is_meta for t in expected.values())
    if on_meta:
        state = {name: value.to(dtype=expected[name].dtype) for name, value in state.items()}
    model.model.load_state_dict(state, strict=True, assign=on_meta)
    if on_meta:
        # non-persistent buffers are not in the state dict: rebuild them off the meta device
        for module in model.model.modules():
            for bname, buf in list(module.named_buffers(recurse=False)):
                if buf is not None and buf.is_meta and bname == "position_ids":
                    n = buf.shape[-1]
                    module.register_buffer(bname, torch.arange(n).expand((1, -1)), persistent=False)


def save_spm_weights(model: StepAwarePreferenceModel, path) -> None:
    """Write the released format: fp32 CPU tensors keyed ``model.<name>``; ``.safetensors`` via safetensors,
    ``.bin``/``.pt``/``.pth`` via ``torch.save`` of the plain dict."""
    path = Path(path)
    state = {}
    for name, value in model.model.state_dict().items():
        if value.is_meta:
            raise ValueError(f"model: cannot save {name}, the model is on the meta device")
        value = value.detach().to("cpu")
        if value.is_floating_point():
            value = value.to(torch.float32)
        state[CHECKPOINT_PREFIX + name] = value.contiguous().clone()
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "pt"})
    elif suffix in (".bin", ".pt", ".pth"):
        torch.save(state, str(path))
    else:
        raise ValueError(f"path: unsupported extension {path.suffix!r} (expected .safetensors, .bin, .pt or .pth)")


# ------------------------------------------------------------------------------------------- scorers


@runtime_checkable
class PreferenceScorer(Protocol):
    """A preference function: [-1, 1] images (B, 3, H, W), B prompts, timesteps (B,) -> scores (B,)."""

    def __call__(self, images: Tensor, prompts: list[str], timesteps: Tensor) -> Tensor: ...


def _check_prompts(prompts: Iterable[str], batch: int) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if len(prompts) == 1 and batch != 1:
        prompts = prompts * batch
    if len(prompts) != batch:
        raise ValueError(f"prompts: expected 1 or {batch} prompts, got {len(prompts)}")
    return prompts


class SpmScorer:
    """``PreferenceScorer`` backed by a ``StepAwarePreferenceModel`` and a transformers tokenizer.

    Prompts are tokenised to ``max_length`` (default: the text tower's 77 positions, truncated and padded)
    and their normalised text embeddings cached per prompt (LRU, ``cache_size`` entries; cleared by
    ``clear_cache()``, e.g. after reloading weights). Scoring runs under ``torch.no_grad()`` unless
    ``grad=True``, in which case gradients flow to the images (text embeddings are always cached detached).
    """

    def __init__(self, model: StepAwarePreferenceModel, tokenizer, *, grad: bool = False,
                 max_length: int | None = None, cache_size: int = 4096):
        self.model = model
        self.tokenizer = tokenizer
        self.grad = grad
        self.max_length = int(max_length or model.config.text_config.max_position_embeddings)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    def clear_cache(self) -> None:
        self._cache.clear()

    @property
    def cache_len(self) -> int:
        return len(self._cache)

    def _text_embeds(self, prompts: list[str]) -> Tensor:
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if todo:
            tokens = self.tokenizer(todo, padding="max_length", max_length=self.max_length,
                                    truncation=True, return_tensors="pt")
            with torch.no_grad():
                emb = self.model.text_embeds(tokens["input_ids"]).detach()
            for prompt, row in zip(todo, emb):
                self._cache[prompt] = row
        rows = []
        for p in prompts:
            self._cache.move_to_end(p)
            rows.append(self._cache[p])
        out = torch.stack(rows)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def __call__(self, images: Tensor, prompts: list[str], timesteps: Tensor) -> Tensor:
        prompts = _check_prompts(prompts, images.shape[0])
        text = self._text_embeds(prompts)
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            image = self.model.image_embeds(self.model.preprocess(images), timesteps)
            return self.model.scores_from_embeds(image, text)


class BrightnessScorer:
    """Toy preference: ``sign * mean(image)`` over (C, H, W) of [-1, 1] images; prompts and timesteps are
    ignored. ``sign=+1`` prefers bright images, ``-1`` dark ones."""

    def __init__(self, sign: int = 1):
        if sign not in (1, -1):
            raise ValueError(f"sign: expected +1 or -1, got {sign!r}")
        self.sign = sign

    def __call__(self, images: Tensor, prompts: list[str], timesteps: Tensor) -> Tensor:
        if images.ndim != 4:
            raise ValueError(f"images: expected (B, C, H, W), got {tuple(images.shape)}")
        _check_prompts(prompts, images.shape[0])
        return self.sign * images.float().mean(dim=(1, 2, 3))


# ---------------------------------------------------------------------------------------------
# Offline SPM: SPO_SPM (weights) and SPO_SPM_TOKENIZER (a local tokenizer directory)

SPM_REPO = weights.PARTS["spm"].repo  # repositories, files and revisions: spo_runtime/model/weights.py
SPM_FILE = weights.PARTS["spm"].files[0]
SPM_TOKENIZER_REPO = weights.PARTS["spm_tokenizer"].repo


def default_spm_path() -> str | None:
    """SPO_SPM (through Settings): the default of `TrainConfig.spm_path`; a job's config overrides it."""
    import os

    from spo_runtime.settings import Settings

    return Settings.from_env({k: v for k, v in os.environ.items() if k == "SPO_SPM"}).spm


def spm_weights_file(path: str | None) -> str:
    """The SPM weights to load: `path` (TrainConfig.spm_path, default SPO_SPM), else the released file from the
    hub; the error says which variable to set."""
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"SPO_SPM / config.spm_path: SPM checkpoint not found: {path}")
        return str(path)
    try:
        return str(weights.download(weights.fetch_for("spm", weights.env_settings())))
    except Exception as e:  # offline, gated, missing, not pinned
        raise CheckpointFormatError(
            f"SPO_SPM: could not fetch {SPM_REPO}/{SPM_FILE} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "set SPO_SPM to a local .safetensors or .bin file of the step-aware preference model"
        ) from e


def load_spm_tokenizer(directory: str | None):
    """The SPM's tokenizer: from `directory` (SPO_SPM_TOKENIZER), else CLIP-ViT-H-14's from the hub; the error
    says which variable to set."""
    from transformers import CLIPTokenizer

    try:
        if directory and not any((Path(directory) / f).is_file() for f in ("vocab.json", "tokenizer.json")):
            raise FileNotFoundError("no vocab.json or tokenizer.json in it")
        source = directory or str(weights.download(weights.fetch_for("spm_tokenizer", weights.env_settings())))
        return CLIPTokenizer.from_pretrained(source, local_files_only=True)
    except Exception as e:
        what = f"the tokenizer directory {directory!r}" if directory else f"{SPM_TOKENIZER_REPO} from the Hugging Face hub"
        raise CheckpointFormatError(
            f"SPO_SPM_TOKENIZER: could not load {what} ({type(e).__name__}: {e}); set SPO_SPM_TOKENIZER to a local "
            "directory holding the SPM's CLIP tokenizer (vocab.json, merges.txt, tokenizer_config.json)"
        ) from e
