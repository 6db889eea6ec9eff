"""A trainer's files in its output directory: checkpoints (written atomically, verified on resume) and the
exported adapter.

    checkpoints/round-NNNNNN/   lora_diffusers.safetensors, lora_webui.safetensors (the adapter, both layouts),
                                checkpoint.pt (optimiser, gradient scaler, round, prompt position, world size),
                                config.json, hashes.json (sha256 of the three weight files)
    checkpoints/latest.json     {"round", "dir", "hashes"}: the one to resume from

A round's directory is written as a temp dir and renamed, then `latest.json` replaced atomically; the
last `keep_checkpoints` directories are kept. A failed write leaves the previous checkpoint as it was
(`CheckpointWriteError`); a damaged one is refused on resume, naming the file (`CheckpointCorruptError`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from spo_runtime.errors import SpoError
from spo_runtime.faults import Faults
from spo_runtime.fsutil import atomic_write, file_sha256, fsync_dir, write_json_atomic
from spo_runtime.lora.format import LoraModuleWeights, save_lora_file
from spo_runtime.lora.runtime import LoraRegistry
from spo_runtime.training.adapter import TRAIN
from spo_runtime.training.config import TrainConfig

__all__ = ["CHECKPOINT", "OLD_CHECKPOINT", "CheckpointCorruptError", "CheckpointWriteError", "export_adapter",
           "restore_checkpoint", "write_checkpoint"]

log = logging.getLogger("spo_runtime.train")

CHECKPOINT = "checkpoint.pt"  # optimiser, RNG, round and prompt position of a checkpoint
OLD_CHECKPOINT = "train_state.pt"  # its name before; still resumed from


class CheckpointWriteError(SpoError, OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is left intact."""


class CheckpointCorruptError(SpoError):
    """The checkpoint a job would resume from is damaged or incomplete; the job cannot resume from it."""


def _metadata(config: TrainConfig, round_index: int) -> dict[str, str]:
    """The safetensors metadata of a written adapter: the job's config and round."""
    return {"config": config.model_dump_json(), "round": str(round_index)}


def write_checkpoint(out_dir: Path, config: TrainConfig, modules: dict[str, LoraModuleWeights], state: dict,
                     faults: Faults) -> Path:
    """Write checkpoints/round-N/ for `state["round"]` (N) with the adapter `modules` and the training
    `state` (optimiser, gradient scaler, round, position, world size); returns its directory.

    If anything fails part-way (a full disk), the temp dir is removed and CheckpointWriteError says so:
    `latest.json` still names the previous checkpoint, whose files were not touched. `faults`
    (SPO_FAULTS, tests only) may fail the write of checkpoint.pt."""
    round_index = state["round"]
    root = out_dir / "checkpoints"
    final = root / f"round-{round_index:06d}"
    tmp = root / f".round-{round_index:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        meta = _metadata(config, round_index)
        hashes = {
            "diffusers": save_lora_file(tmp / "lora_diffusers.safetensors", modules, "diffusers", metadata=meta),
            "webui": save_lora_file(tmp / "lora_webui.safetensors", modules, "webui", metadata=meta),
        }

        def write_state(fh):
            faults.checkpoint_write(round_index, fh)
            torch.save(state, fh)

        atomic_write(tmp / CHECKPOINT, write_state)
        hashes["checkpoint"] = file_sha256(tmp / CHECKPOINT)
        atomic_write(tmp / "config.json", config.model_dump_json(indent=2).encode())
        atomic_write(tmp / "hashes.json", json.dumps(hashes).encode())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = _latest_name(out_dir)
        raise CheckpointWriteError(
            f"writing the checkpoint of round {round_index} failed ({e.strerror or e}); "
            + (f"the previous checkpoint ({previous}) is intact" if previous else "there is no earlier checkpoint")
        ) from e
    shutil.rmtree(final, ignore_errors=True)
    faults.checkpoint_in_place(round_index)
    os.replace(tmp, final)
    fsync_dir(root)
    write_json_atomic(root / "latest.json", {"round": round_index, "dir": final.name, "hashes": hashes})
    for old in sorted(root.glob("round-*"))[: -config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _latest_name(out_dir: Path) -> str | None:
    try:
        return json.loads((out_dir / "checkpoints" / "latest.json").read_text())["dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def restore_checkpoint(out_dir: Path, registry: LoraRegistry, optimizer: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler) -> tuple[int, int] | None:
    """Resume from checkpoints/latest.json if present: the adapter `TRAIN` of `registry`, the optimiser's
    and the gradient scaler's state are loaded; returns (round, prompt position), or None without a
    checkpoint. A damaged or incomplete checkpoint (unreadable files, bytes that differ from the recorded
    sha256, missing tensors or state) raises CheckpointCorruptError naming the file and the problem."""
    root = out_dir / "checkpoints"
    latest = root / "latest.json"
    if not latest.exists():
        return None
    try:
        rec = json.loads(latest.read_text())
        d = root / rec["dir"]
        hashes = rec.get("hashes") or {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _corrupt(out_dir, latest, f"unreadable ({type(e).__name__}: {e})") from None
    files = {"diffusers": d / "lora_diffusers.safetensors", "webui": d / "lora_webui.safetensors", "checkpoint": d / CHECKPOINT}
    for key, path in files.items():
        if key in hashes and path.exists() and file_sha256(path) != hashes[key]:
            raise _corrupt(out_dir, path, "its sha256 differs from the one recorded when it was written")
    from safetensors.torch import load_file

    try:
        sd = load_file(str(files["diffusers"]))
        with torch.no_grad():
            for m, down, up in registry.tensors(TRAIN):
                down.copy_(sd[f"unet.{m}.lora.down.weight"])
                up.copy_(sd[f"unet.{m}.lora.up.weight"])
    except Exception as e:
        raise _corrupt(out_dir, files["diffusers"], f"{type(e).__name__}: {e}") from None
    path = files["checkpoint"]
    if not path.exists() and (d / OLD_CHECKPOINT).exists():
        path = d / OLD_CHECKPOINT  # written before the rename
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        if state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        round_index, position = int(state["round"]), int(state["position"])
    except Exception as e:
        raise _corrupt(out_dir, path, f"{type(e).__name__}: {e}") from None
    log.info("resumed from %s (round %d)", d, round_index)
    return round_index, position


def _corrupt(out_dir: Path, path: Path, problem: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"cannot resume from the checkpoint: {path} is damaged: {problem}. "
        f"Delete {out_dir / 'checkpoints'} to train again from round 0")


def export_adapter(adapter_dir: Path, name: str, modules: dict[str, LoraModuleWeights], config: TrainConfig,
                   round_index: int) -> dict:
    """Write the trained adapter to `adapter_dir` in both layouts; returns relative paths and hashes."""
    meta = _metadata(config, round_index)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    files, hashes = {}, {}
    for layout in ("diffusers", "webui"):
        rel = f"{name}_{layout}.safetensors"
        hashes[layout] = save_lora_file(adapter_dir / rel, modules, layout, metadata=meta)
        files[layout] = rel
    return {"files": files, "sha256": hashes}
