"""Read, validate and write SDXL UNet LoRA files (diffusers and webui/kohya layouts, safetensors only)."""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import safetensors
import safetensors.torch
import torch

from spo_runtime.errors import LoraFormatError
from spo_runtime.fsutil import atomic_write

Layout = Literal["diffusers", "webui"]

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl"})
TEXT_ENCODER_PREFIXES = ("lora_te1_", "lora_te2_", "lora_te_", "text_encoder.", "text_encoder_2.")
_DIFFUSERS_KEY = re.compile(
    r"^unet\.(?P<module>.+?)\.(?P<suffix>lora\.down\.weight|lora\.up\.weight|lora_A\.weight|lora_B\.weight|alpha)$"
)
_WEBUI_KEY = re.compile(r"^lora_unet_(?P<module>\w+?)\.(?P<suffix>lora_down\.weight|lora_up\.weight|alpha)$")
_ROLES = {
    "lora.down.weight": "down", "lora_A.weight": "down", "lora_down.weight": "down",
    "lora.up.weight": "up", "lora_B.weight": "up", "lora_up.weight": "up",
    "alpha": "alpha",
}
_SGM_BLOCKS = ("input_blocks_", "middle_block_", "output_blocks_")


@dataclass(frozen=True)
class ModuleSpec:
    """Shape of one LoRA-targetable UNet layer."""

    kind: Literal["linear", "conv"]
    in_features: int
    out_features: int
    kernel_size: tuple[int, int] = (1, 1)


@dataclass
class LoraModuleWeights:
    """Down/up factors and alpha of one module; delta = alpha / rank * up @ down."""

    module: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class LoraFile:
    """A validated LoRA: its layout, per-module weights and the sha256 of the file bytes."""

    layout: Layout
    modules: dict[str, LoraModuleWeights]
    sha256: str = ""
    path: Path | None = None

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def targets(self) -> list[str]:
        return sorted({_leaf_name(name) for name in self.modules})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules.values() for t in (m.down, m.up))


def _leaf_name(module: str) -> str:
    """Last path component, keeping a trailing list index (`to_out.0`)."""
    parts = module.split(".")
    keep = 1
    while keep < len(parts) and parts[-keep].isdigit():
        keep += 1
    return ".".join(parts[-keep:])


def _name_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _fail(problem: str, problems: list[tuple[str, str]]) -> None:
    """Raise one LoraFormatError listing every (key, detail) pair."""
    if not problems:
        return
    keys = [k for k, _ in problems]
    lines = [f"{k}: {detail}" for k, detail in problems[:10]]
    more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
    raise LoraFormatError(f"{problem}: " + "; ".join(lines) + more, keys=keys)


def module_specs(unet: torch.nn.Module) -> dict[str, ModuleSpec]:
    """Every nn.Linear / nn.Conv2d of `unet` by module path; a LoRA wrapper is reported with its base layer."""
    specs: dict[str, ModuleSpec] = {}
    inside: str | None = None  # named_modules is pre-order: a wrapper's submodules follow it directly
    for name, module in unet.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(getattr(module, "base_layer", None), torch.nn.Module):
            inside = name + "."
            while isinstance(getattr(module, "base_layer", None), torch.nn.Module):
                module = module.base_layer
        if isinstance(module, torch.nn.Linear):
            specs[name] = ModuleSpec("linear", module.in_features, module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            specs[name] = ModuleSpec("conv", module.in_channels, module.out_channels, (int(kh), int(kw)))
    return specs


def detect_layout(keys: Iterable[str]) -> Layout:
    """'webui' if every key starts with `lora_unet_`, 'diffusers' if every key starts with `unet.`."""
    keys = list(keys)
    if not keys:
        raise LoraFormatError("the LoRA holds no keys")
    text_encoder = [k for k in keys if k.startswith(TEXT_ENCODER_PREFIXES)]
    if text_encoder:
        raise LoraFormatError(
            f"text-encoder LoRA is not supported (UNet only): {_name_keys(text_encoder)}", keys=text_encoder
        )
    webui = [k for k in keys if k.startswith("lora_unet_")]
    diffusers = [k for k in keys if k.startswith("unet.")]
    if len(webui) == len(keys):
        return "webui"
    if len(diffusers) == len(keys):
        return "diffusers"
    unknown = [k for k in keys if k not in set(webui) | set(diffusers)]
    if unknown:
        raise LoraFormatError(
            f"keys with an unknown prefix (expected 'unet.' or 'lora_unet_'): {_name_keys(unknown)}", keys=unknown
        )
    minority = min(webui, diffusers, key=len)
    raise LoraFormatError(
        f"mixed layouts: {len(diffusers)} 'unet.' keys and {len(webui)} 'lora_unet_' keys, e.g. {_name_keys(minority)}",
        keys=minority,
    )


def _webui_names(specs: dict[str, ModuleSpec]) -> dict[str, str]:
    flat: dict[str, str] = {}
    for name in specs:
        other = flat.setdefault(name.replace(".", "_"), name)
        if other != name:
            raise LoraFormatError(f"UNet modules {other!r} and {name!r} share the webui name", keys=[other, name])
    return flat


def _expected(spec: ModuleSpec, role: str, rank: str | int) -> tuple:
    if role == "down":
        return (rank, spec.in_features) + (spec.kernel_size if spec.kind == "conv" else ())
    return (spec.out_features, rank) + ((1, 1) if spec.kind == "conv" else ())


def _check_shape(tensor: torch.Tensor, spec: ModuleSpec, role: str, rank: int) -> str | None:
    expected = _expected(spec, role, rank)
    if tuple(tensor.shape) == expected:
        return None
    shown = _expected(spec, role, "r") if tensor.ndim != len(expected) else expected
    return (
        f"{role} weight of {spec.kind} {spec.in_features}->{spec.out_features}: "
        f"expected shape [{', '.join(map(str, shown))}], got {list(tensor.shape)}"
    )


def parse_lora_state_dict(
    state_dict: dict[str, torch.Tensor], specs: dict[str, ModuleSpec]
) -> tuple[Layout, dict[str, LoraModuleWeights]]:
    """Validate a LoRA state dict against the UNet's specs and return its layout and per-module weights."""
    if not state_dict:
        raise LoraFormatError("the LoRA holds no keys (empty file)")
    layout = detect_layout(state_dict)
    grammar, flat = (_DIFFUSERS_KEY, None) if layout == "diffusers" else (_WEBUI_KEY, _webui_names(specs))
    parts: dict[str, dict[str, str]] = {}
    problems: list[tuple[str, str]] = []
    for key, tensor in state_dict.items():
        match = grammar.match(key)
        if match is None:
            hint = "unet.<module>.lora.down.weight / lora.up.weight / lora_A.weight / lora_B.weight / alpha"
            if layout == "webui":
                hint = "lora_unet_<module>.lora_down.weight / lora_up.weight / alpha"
            problems.append((key, f"does not fit the {layout} layout ({hint})"))
            continue
        raw, role = match["module"], _ROLES[match["suffix"]]
        module = raw if flat is None else flat.get(raw)
        if module not in specs:
            hint = " (LDM/sgm block names are not supported)" if raw.startswith(_SGM_BLOCKS) else ""
            problems.append((key, f"names no nn.Linear or nn.Conv2d module of the UNet{hint}"))
        elif not isinstance(tensor, torch.Tensor):
            problems.append((key, f"is a {type(tensor).__name__}, not a tensor"))
        elif role in parts.setdefault(module, {}):
            other = parts[module][role]
            problems += [(k, f"{role} of {module!r} given twice") for k in (other, key)]
        else:
            parts[module][role] = key
    _fail("LoRA keys do not match the UNet", problems)

    for module, roles in parts.items():
        if "down" not in roles or "up" not in roles:
            missing = "up" if "down" in roles else "down"
            present = [roles[r] for r in ("down", "up", "alpha") if r in roles]
            problems += [(k, f"module {module!r} has no {missing} weight") for k in present]
        elif layout == "webui" and "alpha" not in roles:
            alpha_key = roles["down"].split(".", 1)[0] + ".alpha"
            problems.append((roles["down"], f"module {module!r} lacks its {alpha_key!r} key (required in webui)"))
    _fail("incomplete LoRA modules", problems)

    order = {name: i for i, name in enumerate(specs)}
    modules: dict[str, LoraModuleWeights] = {}
    for module, roles in sorted(parts.items(), key=lambda item: order[item[0]]):
        spec, down, up = specs[module], state_dict[roles["down"]], state_dict[roles["up"]]
        rank = int(down.shape[0]) if down.ndim else 0
        for role, tensor in (("down", down), ("up", up)):
            key = roles[role]
            if not tensor.is_floating_point():
                problems.append((key, f"dtype {tensor.dtype} is not floating point"))
            elif (issue := _check_shape(tensor, spec, role, rank)) is not None:
                problems.append((key, issue))
            elif rank < 1:
                problems.append((key, "rank must be at least 1"))
            elif not bool(torch.isfinite(tensor).all()):
                problems.append((key, "holds NaN or Inf"))
        alpha = float(rank)
        if "alpha" in roles:
            key, value = roles["alpha"], state_dict[roles["alpha"]]
            if value.numel() != 1 or value.ndim > 1:
                problems.append((key, f"alpha must be a scalar, got shape {list(value.shape)}"))
            elif not math.isfinite(alpha := float(value.reshape(()).item())) or alpha <= 0:
                problems.append((key, f"alpha must be finite and > 0, got {alpha}"))
        modules[module] = LoraModuleWeights(module, down, up, alpha)
    _fail("invalid LoRA weights", problems)
    return layout, modules


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFormatError(
            f"{path}: pickle files ({', '.join(sorted(PICKLE_SUFFIXES))}) are refused; convert to safetensors"
        )


def read_lora_file(path: str | os.PathLike, specs: dict[str, ModuleSpec]) -> LoraFile:
    """Load a safetensors LoRA on CPU, validate it against `specs` and hash its bytes."""
    path = Path(path)
    _refuse_pickle(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LoraFormatError(f"{path}: cannot read the LoRA file ({e.strerror or e})") from e
    # Parse the very bytes that were hashed, so a concurrent os.replace cannot split hash and content.
    try:
        state_dict = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise LoraFormatError(f"{path}: not a readable safetensors file ({e})") from e
    layout, modules = parse_lora_state_dict(state_dict, specs)
    return LoraFile(layout, modules, hashlib.sha256(data).hexdigest(), path)


def lora_state_dict(modules: dict[str, LoraModuleWeights], layout: Layout) -> dict[str, torch.Tensor]:
    """Serialisable state dict; the diffusers layout has no alpha keys, so alpha/rank is baked into `up`."""
    if layout not in ("diffusers", "webui"):
        raise ValueError(f"layout: expected 'diffusers' or 'webui', got {layout!r}")
    out: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        down, up = m.down.detach().contiguous(), m.up.detach().contiguous()
        if layout == "diffusers":
            if m.alpha != m.rank:
                up = (up.to(torch.float64) * m.scale).to(up.dtype)
            out[f"unet.{name}.lora.down.weight"] = down
            out[f"unet.{name}.lora.up.weight"] = up
        else:
            base = "lora_unet_" + name.replace(".", "_")
            out[f"{base}.lora_down.weight"] = down
            out[f"{base}.lora_up.weight"] = up
            out[f"{base}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    return out


def save_lora_file(
    path: str | os.PathLike,
    modules: dict[str, LoraModuleWeights],
    layout: Layout,
    metadata: dict[str, str] | None = None,
) -> str:
    """Atomically write `modules` as a safetensors LoRA at `path`; return the file's sha256."""
    path = Path(path)
    _refuse_pickle(path)
    if not modules:
        raise LoraFormatError(f"{path}: refusing to write a LoRA without modules")
    data = safetensors.torch.save(lora_state_dict(modules, layout), metadata=metadata)
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()
