"""Read, validate and write SDXL LoRA files (safetensors only): UNet and text-encoder parts.

Reading takes the steps `StableDiffusionXLPipeline.load_lora_weights` takes, through the same diffusers
functions in the same order (`convert.to_diffusers_names`): `lora_state_dict` (kohya/webui names with
diffusers-style or SGM block names, text-encoder parts), then per part the renaming to the PEFT names peft
matches against the model's modules (UNet: `convert_unet_state_dict_to_peft`; text encoders:
`convert_state_dict_to_diffusers`, `convert_state_dict_to_peft`, and no `text_model.` prefix on an encoder
without that submodule). So a file diffusers loads we load, and one it refuses we refuse. We keep no key map of our own: we follow every tensor
through the converters by identity, so each error still names the key of the file, and a key the converters
drop or overwrite is an error, never a silent omission. Then the strict whole-file checks: every key names a
layer, every down has its up, every shape fits. Layouts our runtime cannot express (LoHa, LoKr, DoRA
magnitudes, full-weight diffs) are refused by name before conversion.

Alphas are read from the file per module (kohya `.alpha`, and `.alpha` next to diffusers/PEFT names, which
diffusers itself refuses); without them alpha = rank, as in kohya and diffusers.

Module names: UNet layers by their path in the UNet (`down_blocks.1...to_q`); text-encoder layers as
`text_encoder.<path>` / `text_encoder_2.<path>`.
"""

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
from spo_runtime.lora.convert import SGM_BLOCKS, TEXT_ENCODERS, fail, to_diffusers_names

Layout = Literal["diffusers", "webui"]  # layouts we write
# layouts we read: diffusers (diffusers or PEFT names), webui (kohya, diffusers-style block names),
# webui-sgm (kohya with SGM/LDM block names: input_blocks / middle_block / output_blocks)
SourceLayout = Literal["diffusers", "webui", "webui-sgm"]
# formats whose update is not up @ down: (marker in a key, name of the format)
UNSUPPORTED = (
    ("hada_w1_", "LoHa (LyCORIS Hadamard product)"), ("hada_w2_", "LoHa (LyCORIS Hadamard product)"),
    ("hada_t1", "LoHa (LyCORIS Hadamard product)"), ("hada_t2", "LoHa (LyCORIS Hadamard product)"),
    ("lokr_w1", "LoKr (LyCORIS Kronecker product)"), ("lokr_w2", "LoKr (LyCORIS Kronecker product)"),
    ("lokr_t2", "LoKr (LyCORIS Kronecker product)"),
    ("dora_scale", "DoRA (weight-decomposed LoRA: magnitude vectors)"),
    ("lora_magnitude_vector", "DoRA (weight-decomposed LoRA: magnitude vectors)"),
    ("lora_mid", "LoCon with a Tucker core (lora_mid)"),
    ("oft_blocks", "OFT (orthogonal fine-tuning)"), ("oft_diag", "OFT (orthogonal fine-tuning)"),
)
_FULL_DIFF = re.compile(r"\.(diff|diff_b|weight_diff|bias_diff)\Z")  # \Z: not before a trailing newline

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl"})
TEXT_ENCODER_PREFIXES = ("lora_te1_", "lora_te2_", "lora_te_", "text_encoder.", "text_encoder_2.")
_ROLES = {"lora_A.weight": "down", "lora_B.weight": "up"}  # of a PEFT name, after diffusers' renaming


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

    layout: str  # a SourceLayout
    modules: dict[str, LoraModuleWeights]
    sha256: str = ""
    path: Path | None = None

    @property
    def unet_modules(self) -> list[str]:
        return [m for m in self.modules if not is_text_encoder_module(m)]

    @property
    def text_encoder_modules(self) -> list[str]:
        return [m for m in self.modules if is_text_encoder_module(m)]

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def targets(self) -> list[str]:
        return sorted({_leaf_name(name) for name in self.modules})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules.values() for t in (m.down, m.up))


def is_text_encoder_module(module: str) -> bool:
    return module.split(".", 1)[0] in TEXT_ENCODERS


PARTS = ("unet",) + TEXT_ENCODERS


def module_part(module: str) -> str:
    """The model part a module name lies in: 'unet', 'text_encoder' or 'text_encoder_2'."""
    head = module.split(".", 1)[0]
    return head if head in TEXT_ENCODERS else "unet"


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


def module_specs_of(unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module] | None = None) -> dict[str, ModuleSpec]:
    """UNet layers by path, plus each text encoder's as `<text_encoder name>.<path>`."""
    specs = module_specs(unet)
    for prefix, model in (text_encoders or {}).items():
        specs.update({f"{prefix}.{name}": spec for name, spec in module_specs(model).items()})
    return specs


_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.")


def detect_layout(keys: Iterable[str]) -> Layout:
    """'webui' if every key is kohya-named (`lora_unet_`, `lora_te1_`, ...), 'diffusers' if every key starts
    with `unet.`, `text_encoder.` or `text_encoder_2.`."""
    keys = list(keys)
    if not keys:
        raise LoraFormatError("the LoRA holds no keys")
    webui = [k for k in keys if k.startswith(_KOHYA_PREFIXES)]
    diffusers = [k for k in keys if k.startswith(_DIFFUSERS_PREFIXES)]
    if len(webui) == len(keys):
        return "webui"
    if len(diffusers) == len(keys):
        return "diffusers"
    unknown = [k for k in keys if k not in set(webui) | set(diffusers)]
    if unknown:
        raise LoraFormatError(
            "keys with an unknown prefix (expected 'unet.', 'text_encoder.', 'text_encoder_2.', 'lora_unet_', "
            f"'lora_te1_' or 'lora_te2_'): {_name_keys(unknown)}", keys=unknown
        )
    minority = min(webui, diffusers, key=len)
    raise LoraFormatError(
        f"mixed layouts: {len(diffusers)} diffusers keys and {len(webui)} kohya/webui keys, e.g. {_name_keys(minority)}",
        keys=minority,
    )


def _refuse_unsupported(keys: Iterable[str]) -> None:
    for key in keys:
        for marker, name in UNSUPPORTED:
            if marker in key:
                raise LoraFormatError(
                    f"{name} is not supported: our runtime applies low-rank updates (up @ down) only; key {key!r}",
                    keys=[key])
        if _FULL_DIFF.search(key):
            raise LoraFormatError(
                f"full-weight differences (.diff / .diff_b) are not supported: our runtime applies low-rank updates "
                f"(up @ down) only; key {key!r}", keys=[key])


_PEFT_KEY = re.compile(
    r"^(?P<prefix>unet|text_encoder|text_encoder_2)\.(?P<module>.+?)\.(?P<suffix>lora_A\.weight|lora_B\.weight)$"
)


def source_layout(keys: Iterable[str]) -> str:
    """The file's layout as reported: diffusers, webui, or webui-sgm (kohya with SGM block names)."""
    keys = list(keys)
    layout = detect_layout(keys)
    if layout == "webui" and any(k.removeprefix("lora_unet_").startswith(SGM_BLOCKS) for k in keys if k.startswith("lora_unet_")):
        return "webui-sgm"
    return layout


def parse_lora_state_dict(
    state_dict: dict[str, torch.Tensor], specs: dict[str, ModuleSpec], unet_config=None
) -> tuple[str, dict[str, LoraModuleWeights]]:
    """Validate a LoRA state dict against the model's specs (`module_specs_of`) and return its layout and
    per-module weights. `unet_config` (the UNet's config) maps SGM block names."""
    if not state_dict:
        raise LoraFormatError("the LoRA holds no keys (empty file)")
    _refuse_unsupported(state_dict)
    layout = detect_layout(state_dict)
    reported = source_layout(state_dict)
    named, alphas = to_diffusers_names(state_dict, layout, specs, unet_config)

    parts: dict[str, dict[str, str]] = {}
    module_of: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for name, (key, tensor) in named.items():
        match = _PEFT_KEY.fullmatch(name)
        if match is None:
            renamed = "" if name == key else f" (diffusers renames it {name!r})"
            problems.append((key, f"does not fit the {layout} layout{renamed}: after diffusers' renaming every key must "
                                  "be <unet|text_encoder|text_encoder_2>.<module>.lora_A.weight / lora_B.weight"))
            continue
        prefix, raw, role = match["prefix"], match["module"], _ROLES[match["suffix"]]
        module = raw if prefix == "unet" else f"{prefix}.{raw}"
        if module not in specs:
            where = "the UNet" if prefix == "unet" else prefix
            hint = " (LDM/sgm block names)" if raw.startswith(SGM_BLOCKS) else ""
            if not key.startswith(f"{prefix}.{raw}."):
                hint += f" (diffusers maps it to {raw!r})"
            problems.append((key, f"names no nn.Linear or nn.Conv2d module of {where}{hint}"))
        elif not isinstance(tensor, torch.Tensor):
            problems.append((key, f"is a {type(tensor).__name__}, not a tensor"))
        elif role in parts.setdefault(module, {}):
            other = parts[module][role]
            problems += [(k, f"{role} of {module!r} given twice") for k in (other, key)]
        else:
            parts[module][role] = key
            module_of[key] = module
    if not any(parts.values()):
        fail("the LoRA targets no layer of this model (is it made for another base model?)", problems)
    fail("LoRA keys do not match the model", problems)
    for alpha_key, down_key in alphas.items():
        parts[module_of[down_key]]["alpha"] = alpha_key

    for module, roles in parts.items():
        if "down" not in roles or "up" not in roles:
            missing = "up" if "down" in roles else "down"
            present = [roles[r] for r in ("down", "up", "alpha") if r in roles]
            problems += [(k, f"module {module!r} has no {missing} weight") for k in present]
    fail("incomplete LoRA modules", problems)

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
            elif not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
                problems.append((key, "holds NaN or Inf"))
        alpha = float(rank)
        if "alpha" in roles:
            key, value = roles["alpha"], state_dict[roles["alpha"]]
            if value.numel() != 1 or value.ndim > 1:
                problems.append((key, f"alpha must be a scalar, got shape {list(value.shape)}"))
            elif not math.isfinite(alpha := float(value.reshape(()).item())) or alpha <= 0:
                problems.append((key, f"alpha must be finite and > 0, got {alpha}"))
        modules[module] = LoraModuleWeights(module, down, up, alpha)
    fail("invalid LoRA weights", problems)
    return reported, modules


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFormatError(
            f"{path}: pickle files ({', '.join(sorted(PICKLE_SUFFIXES))}) are refused; convert to safetensors"
        )


def read_lora_file(path: str | os.PathLike, specs: dict[str, ModuleSpec], unet_config=None) -> LoraFile:
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
    try:
        layout, modules = parse_lora_state_dict(state_dict, specs, unet_config)
    except LoraFormatError as e:
        raise LoraFormatError(f"{path}: {e}", keys=e.keys) from e
    return LoraFile(layout, modules, hashlib.sha256(data).hexdigest(), path)


def lora_state_dict(modules: dict[str, LoraModuleWeights], layout: Layout) -> dict[str, torch.Tensor]:
    """Serialisable state dict; the diffusers layout has no alpha keys, so alpha/rank is baked into `up`."""
    if layout not in ("diffusers", "webui"):
        raise ValueError(f"layout: expected 'diffusers' or 'webui', got {layout!r}")
    out: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        down, up = m.down.detach().contiguous(), m.up.detach().contiguous()
        te, _, path = name.partition(".") if is_text_encoder_module(name) else ("", "", name)
        if layout == "diffusers":
            if m.alpha != m.rank:
                up = (up.to(torch.float64) * m.scale).to(up.dtype)
            if te:  # PEFT names, as diffusers' save_lora_weights writes text-encoder parts
                out[f"{name}.lora_A.weight"] = down
                out[f"{name}.lora_B.weight"] = up
            else:
                out[f"unet.{name}.lora.down.weight"] = down
                out[f"unet.{name}.lora.up.weight"] = up
        else:
            kohya = {"": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[te]
            base = kohya + path.replace(".", "_")
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
