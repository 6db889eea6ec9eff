"""The SPM's checkpoint files: strict reading (`load_spm_weights`) and writing (`save_spm_weights`) of the
released format.

That format is an fp32 state dict of a wrapper whose only child is ``model``: every key is the transformers
``CLIPModel`` name (plus the timestep additions, see `spm`) prefixed with ``model.``. ``.safetensors`` files
are read with safetensors; pickled ``.bin``/``.pt``/``.pth`` files only through
``torch.load(weights_only=True)``, so that a checkpoint can hold tensors and nothing that runs code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from spo_runtime.errors import CheckpointFormatError
from spo_runtime.preference.spm import StepAwarePreferenceModel

__all__ = ["CHECKPOINT_PREFIX", "load_spm_weights", "save_spm_weights"]

CHECKPOINT_PREFIX = "model."


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

