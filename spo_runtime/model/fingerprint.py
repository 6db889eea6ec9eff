"""What identifies a loaded part in /info and in the compile cache's key: sha256 of a LoRA's canonical
bytes, of a module's parameters, or a cheap fingerprint of a pipeline directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from spo_runtime.lora.format import LoraModuleWeights, lora_state_dict


def lora_bytes_hash(modules: dict[str, LoraModuleWeights]) -> str:
    from safetensors.torch import save

    return hashlib.sha256(save(lora_state_dict(modules, "diffusers"))).hexdigest()


def params_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def dir_fingerprint(path: str) -> str:
    """sha256 over every file's relative path and size, and the bytes of its small (config) files.

    Hashing multi-GB weights at every start would cost seconds; names, sizes and configs identify
    a snapshot well enough to tell two deployments apart.
    """
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        if size < 1 << 20:
            h.update(f.read_bytes())
    return h.hexdigest()
