"""SPO_QUANT=fp8: the UNet's transformer Linear layers in float8 through torchao (pinned in requirements.txt).

torchao's float8 dynamic activation + weight quantization, per-row scales: each weight row and each activation
row (token) is scaled by its absolute maximum / 448 (e4m3's largest value) and multiplied in float8 with
float32 accumulation. Two things make it finite on SDXL:

- SDXL's unconditional CFG row is an all-zero text embedding: the cross-attention key/value projections
  (`attn2.to_k`, `attn2.to_v`) see rows whose absolute maximum is 0, and a per-row scale of 0 divides 0 by 0
  (measured on an H200: every latent NaN, first at `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`).
  Those two layers stay in bf16 (they see 77 tokens per row against thousands for the others, so they cost
  little), and every quantized layer gets a floor on the activation's absolute maximum (`ACTIVATION_FLOOR`,
  torchao's `activation_value_lb`): a zero row then quantizes to zeros instead of NaN. Both are needed:
  `attn2.to_out` sees the attention of that row over zero values, zero rows again.
- Per-row weight scaling needs bfloat16 weights, so fp8 runs on a bf16 pipeline only.

A LoRA wrapper (`lora.LoraLinear`) keeps its branch in the pipeline's dtype on top of the quantized base:
quantization replaces only `base_layer.weight`, so fuse the default adapter first (at load).
"""

from __future__ import annotations

import torch
from torch import nn

from spo_runtime.errors import ConfigError

TORCHAO_VERSION = "0.18.0"  # requirements.txt and `make gpu-wheels`; imports on torch 2.11 (GPU) and 2.13 (CPU)
ACTIVATION_FLOOR = 1e-6  # lower bound of a row's absolute maximum before scaling; zero rows stay zero
KEEP_BF16 = ("attn2.to_k", "attn2.to_v")  # cross-attention key/value: they see the (possibly all-zero) text embedding
MIN_CAPABILITY = (8, 9)  # Ada and Hopper have FP8 tensor cores


def check_supported(device: torch.device, dtype: torch.dtype) -> None:
    """Raise ConfigError naming SPO_QUANT unless fp8 can run here: a CUDA GPU with FP8, bf16, torchao importable."""
    if device.type != "cuda":
        raise ConfigError("SPO_QUANT", f"fp8 needs a CUDA GPU with FP8 (compute capability >= 8.9, e.g. Ada, Hopper); "
                                       f"the device is {device}: use SPO_QUANT=none")
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < MIN_CAPABILITY:
        raise ConfigError("SPO_QUANT", f"fp8 needs compute capability >= 8.9 (Ada, Hopper); {torch.cuda.get_device_name(device)} "
                                       f"has {cap[0]}.{cap[1]}: use SPO_QUANT=none")
    if dtype != torch.bfloat16:
        raise ConfigError("SPO_QUANT", f"fp8 quantizes per row from bfloat16 weights; SPO_DTYPE is {str(dtype).removeprefix('torch.')}: "
                                       "set SPO_DTYPE=bfloat16 (or leave it unset)")
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise ConfigError("SPO_QUANT", f"fp8 needs torchao=={TORCHAO_VERSION} (pip install torchao=={TORCHAO_VERSION})") from None


def selected(unet: nn.Module) -> list[str]:
    """Names of the Linear layers fp8 quantizes: inside the transformer blocks, but not `KEEP_BF16`.
    A LoRA-wrapped layer is named by its `base_layer`."""
    out = []
    for name, m in unet.named_modules():
        if type(m) is nn.Linear and ".transformer_blocks." in f".{name}" and not _kept(name):
            out.append(name)
    return out


def _kept(name: str) -> bool:
    name = name.removesuffix(".base_layer")
    return any(name.endswith(k) for k in KEEP_BF16)


def config(floor: float | None = ACTIVATION_FLOOR):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), activation_value_lb=floor)


def quantize(module: nn.Module, names: list[str], floor: float | None = ACTIVATION_FLOOR) -> int:
    """Quantize the Linear layers `names` of `module` in place; returns how many were quantized."""
    from torchao.quantization import quantize_

    wanted = set(names)
    quantize_(module, config(floor), filter_fn=lambda m, fqn: fqn in wanted)
    return sum(1 for n in names if is_quantized(module.get_submodule(n)))


def is_quantized(layer: nn.Module) -> bool:
    w = getattr(layer, "weight", None)
    return w is not None and type(w) not in (torch.Tensor, nn.Parameter)


def quantize_unet(unet: nn.Module) -> dict:
    """fp8 on `unet`'s transformer Linear layers; what it did, for /info."""
    names = selected(unet)
    n = quantize(unet, names)
    return {"quant": "fp8", "library": f"torchao {_torchao_version()}", "layers": n, "kept_bf16": list(KEEP_BF16),
            "activation_floor": ACTIVATION_FLOOR, "granularity": "per-row"}


def _torchao_version() -> str:
    import torchao

    return getattr(torchao, "__version__", "?")
