"""A trainer's files in its output directory: checkpoints (written atomically, verified on resume), the
metrics of its rounds and the exported adapter.

    checkpoints/round-NNNNNN/   lora_diffusers.safetensors, lora_webui.safetensors (the adapter, both layouts),
                                checkpoint.pt (optimiser, gradient scaler, round, prompt position, world size),
                                config.json, hashes.json (sha256 of the three weight files)
    checkpoints/latest.json     {"round", "dir", "hashes"}: the one to resume from
    metrics.jsonl               one JSON line per round

A round's directory is written as a temp dir, renamed to a name no directory has (the same round saved
again, after a stop right after a periodic checkpoint or after a resume, becomes `round-NNNNNN.1` beside
the earlier copy), then `latest.json` is replaced atomically; only then are the earlier copies of that
round and all but the last `keep_checkpoints` rounds removed. So a kill at any point leaves a complete
checkpoint, and a resume takes the newest complete one (a crash may leave `latest.json` naming a
directory that is gone, or a newer one it does not name yet). A failed write leaves the previous
checkpoint as it was (`CheckpointWriteError`); a damaged one is refused on resume, naming the file
(`CheckpointCorruptError`). On resume `metrics.jsonl` keeps only the rounds up to the checkpoint's (and no
line a kill tore), so rounds that run again are logged once. A job's exported adapter never replaces a
file (`AdapterExistsError`): each layout is linked into place, which fails if anything is there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from spo_runtime.errors import LoraFormatError, SpoError
from spo_runtime.faults import Faults
from spo_runtime.fsutil import atomic_write, file_sha256, fsync_dir, write_json_atomic, write_new
from spo_runtime.lora.format import LoraModuleWeights, lora_state_dict, save_lora_file
from spo_runtime.lora.runtime import LoraRegistry
from spo_runtime.training.adapter import TRAIN
from spo_runtime.training.config import TrainConfig

__all__ = ["CHECKPOINT", "OLD_CHECKPOINT", "AdapterExistsError", "CheckpointCorruptError", "CheckpointWriteError",
           "check_adapter_free", "export_adapter", "exported_files", "restore_checkpoint", "trim_metrics",
           "write_checkpoint"]

log = logging.getLogger("spo_runtime.train")

CHECKPOINT = "checkpoint.pt"  # optimiser, RNG, round and prompt position of a checkpoint
OLD_CHECKPOINT = "train_state.pt"  # its name before; still resumed from


class CheckpointWriteError(SpoError, OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is left intact."""


class AdapterExistsError(SpoError, FileExistsError):
    """An exported adapter would replace a file of the adapter directory (HTTP 409 naming output_adapter)."""


class CheckpointCorruptError(SpoError):
    """The checkpoint a job would resume from is damaged or incomplete; the job cannot resume from it."""


def _metadata(config: TrainConfig, round_index: int) -> dict[str, str]:
    """The safetensors metadata of a written adapter: the job's config and round."""
    return {"config": config.model_dump_json(), "round": str(round_index)}


def write_checkpoint(out_dir: Path, config: TrainConfig, modules: dict[str, LoraModuleWeights], state: dict,
                     faults: Faults) -> Path:
    """Write a checkpoint of `state["round"]` (N) with the adapter `modules` and the training `state`
    (optimiser, gradient scaler, round, position, world size); returns its directory, checkpoints/round-N/
    (round-N.K when round N was saved before: the earlier copy stays until this one is named by latest.json).

    If anything fails part-way (a full disk), the temp dir is removed and CheckpointWriteError says so:
    `latest.json` still names the previous checkpoint, whose files were not touched. `faults`
    (SPO_FAULTS, tests only) may fail the write of checkpoint.pt or kill the process before the rename."""
    round_index = state["round"]
    root = out_dir / "checkpoints"
    base = f"round-{round_index:06d}"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".round-*.tmp-*"):  # a dead writer's (one trainer writes a run directory)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{base}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
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
    final, k = root / base, 0
    while final.exists():  # never over an earlier checkpoint: it is what a kill before latest.json leaves
        k += 1
        final = root / f"{base}.{k}"
    faults.checkpoint_in_place(round_index)
    os.rename(tmp, final)
    fsync_dir(root)
    write_json_atomic(root / "latest.json", {"round": round_index, "dir": final.name, "hashes": hashes})
    others = [d for d in _checkpoint_dirs(root) if d != final]
    for d in [d for d in others if _key(d)[0] == round_index]:  # the earlier copies of this round
        shutil.rmtree(d, ignore_errors=True)
    others = [d for d in others if _key(d)[0] != round_index]
    for d in others[: max(0, len(others) - (config.keep_checkpoints - 1))]:
        shutil.rmtree(d, ignore_errors=True)
    return final


def _key(d: Path) -> tuple[int, int]:
    """(round, copy) of a checkpoint directory's name: round-NNNNNN -> (N, 0), round-NNNNNN.K -> (N, K)."""
    m = re.fullmatch(r"round-(\d+)(?:\.(\d+))?", d.name)
    return (int(m[1]), int(m[2] or 0)) if m else (-1, -1)


def _checkpoint_dirs(root: Path) -> list[Path]:
    """The checkpoint directories under `root`, oldest first (temp dirs start with a dot: never listed)."""
    return sorted((d for d in root.glob("round-*") if d.is_dir() and _key(d)[0] >= 0), key=_key)


def _complete(d: Path) -> bool:
    """Whether a checkpoint directory holds its files (damage to them is found when they are read)."""
    return (d / "lora_diffusers.safetensors").is_file() and ((d / CHECKPOINT).is_file() or (d / OLD_CHECKPOINT).is_file())


def _latest_name(out_dir: Path) -> str | None:
    try:
        return json.loads((out_dir / "checkpoints" / "latest.json").read_text())["dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def restore_checkpoint(out_dir: Path, registry: LoraRegistry, optimizer: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler) -> tuple[int, int] | None:
    """Resume from the newest complete checkpoint (the one checkpoints/latest.json names, unless a kill
    left it naming a directory that is gone or a newer one it does not name yet): the adapter `TRAIN` of
    `registry`, the optimiser's and the gradient scaler's state are loaded; returns (round, prompt
    position), or None without a checkpoint. A damaged checkpoint (an unreadable latest.json, files that
    are missing when no complete checkpoint is left, bytes that differ from the recorded sha256, missing
    tensors or state) raises CheckpointCorruptError naming the file and the problem."""
    root = out_dir / "checkpoints"
    latest = root / "latest.json"
    rec = None
    if latest.exists():
        try:
            rec = json.loads(latest.read_text())
            pointed = root / rec["dir"]
            hashes = rec.get("hashes") or {}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise _corrupt(out_dir, latest, f"unreadable ({type(e).__name__}: {e})") from None
    complete = [d for d in _checkpoint_dirs(root) if _complete(d)] if root.is_dir() else []
    if rec is None and not complete:
        return None
    # the newest complete checkpoint: latest.json's, unless a kill took its directory away or came after a
    # newer one was renamed into place but before latest.json named it
    d = complete[-1] if complete else pointed
    if rec is None or d != pointed:
        log.warning("latest.json %s; resuming from %s, the newest complete checkpoint",
                    "is missing" if rec is None else f"names {rec['dir']}", d.name)
        try:
            hashes = json.loads((d / "hashes.json").read_text()) if (d / "hashes.json").exists() else {}
        except (OSError, ValueError) as e:
            raise _corrupt(out_dir, d / "hashes.json", f"unreadable ({type(e).__name__}: {e})") from None
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


def trim_metrics(out_dir: Path, round_index: int) -> None:
    """Keep the rows of `metrics.jsonl` up to round `round_index` (the checkpoint resumed from; 0: none)
    and drop any line a kill tore, so the rounds that run again are logged once."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return
    text = path.read_text()
    lines = text.splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("round"), int) and row["round"] <= round_index:
            kept.append(line)
    if kept != lines or (text and not text.endswith("\n")):
        atomic_write(path, "".join(f"{line}\n" for line in kept).encode())


def _corrupt(out_dir: Path, path: Path, problem: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"cannot resume from the checkpoint: {path} is damaged: {problem}. "
        f"Delete {out_dir / 'checkpoints'} to train again from round 0")


def exported_files(name: str) -> dict[str, str]:
    """The files an adapter named `name` is exported as, per layout (relative to the adapter directory)."""
    return {layout: f"{name}_{layout}.safetensors" for layout in ("diffusers", "webui")}


def check_adapter_free(adapter_dir: Path, name: str, same: Callable[[str, Path], bool] | None = None) -> None:
    """AdapterExistsError unless `name` is free in `adapter_dir`: no `name`.safetensors and no exported
    file of that name (`same(layout, path)`: whether an exported file already holds exactly the adapter
    about to be written, from an export a kill interrupted before the job recorded it; it does not count)."""
    taken = []
    for layout, rel in {"adapter": f"{name}.safetensors", **exported_files(name)}.items():
        path = Path(adapter_dir) / rel
        if path.is_symlink() or path.exists():
            if same is not None and layout != "adapter" and path.is_file() and not path.is_symlink() and same(layout, path):
                continue
            taken.append(rel)
    if taken:
        raise AdapterExistsError(f"{name!r} is taken: {', '.join(taken)} exists in the adapter directory; "
                                 "exports never replace a file, pick another name")


def _holds(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    """Whether the safetensors file at `path` holds exactly `tensors` and `metadata` (its bytes may differ:
    safetensors does not fix the order of the metadata)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}) == metadata and set(f.keys()) == set(tensors) and \
                all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    except Exception:
        return False


def export_adapter(adapter_dir: Path, name: str, modules: dict[str, LoraModuleWeights], config: TrainConfig,
                   round_index: int, replace: bool = False) -> dict:
    """Write the trained adapter to `adapter_dir` in both layouts; returns relative paths and hashes.

    Without `replace` (training jobs) no file is ever replaced: each layout is written to a temp file and
    hard-linked to its name, which fails when anything is there, so of two jobs racing for one name one
    exports and the other raises AdapterExistsError (and removes what it linked). `replace` (the CLI's own
    output directory): each file is replaced atomically."""
    if not modules:
        raise LoraFormatError(f"{name}: refusing to export a LoRA without modules")
    meta = _metadata(config, round_index)
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    files = exported_files(name)
    tensors = {layout: lora_state_dict(modules, layout) for layout in files}
    import safetensors.torch

    data = {layout: safetensors.torch.save(sd, metadata=meta) for layout, sd in tensors.items()}
    hashes = {layout: hashlib.sha256(b).hexdigest() for layout, b in data.items()}
    if replace:
        for layout, rel in files.items():
            atomic_write(adapter_dir / rel, data[layout])
        return {"files": files, "sha256": hashes}

    def same(layout: str, path: Path) -> bool:
        return _holds(path, tensors[layout], meta)

    check_adapter_free(adapter_dir, name, same)
    linked = []
    try:
        for layout, rel in files.items():
            path = adapter_dir / rel
            try:
                linked.append(write_new(path, data[layout]))
            except FileExistsError:  # there already: another export won the name since the check, or ours
                check_adapter_free(adapter_dir, name, same)
                hashes[layout] = file_sha256(path)
    except BaseException:
        for path in linked:
            path.unlink(missing_ok=True)
        raise
    return {"files": files, "sha256": hashes}
