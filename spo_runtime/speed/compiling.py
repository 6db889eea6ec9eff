"""SPO_COMPILE: torch.compile with caches that outlive the process, and the batch buckets that bound the graphs.

Two caches, both under `SPO_DATA_DIR/compile_cache/` so restarts and replicas sharing the directory reuse them:
- `inductor/`: `TORCHINDUCTOR_CACHE_DIR` (inductor's FX-graph and kernel caches; Triton's under it), set before
  the first compilation (overriding any earlier value: importing torchao, which diffusers does, already set it
  to /tmp/torchinductor_$USER);
- `artifacts/<key>.bin`: the portable cache artifacts of `torch.compiler.save_cache_artifacts()` written after
  the warm-up, loaded (`load_cache_artifacts`) before compiling. `<key>` names what the graphs depend on
  (torch version, device name, dtype, preset, compile mode and backend, quantization), so a different card
  or torch never loads another's kernels. Measured on this CPU (inductor, a Linear + GELU in a fresh
  TORCHINDUCTOR_CACHE_DIR): 18.4 s cold, 12.0 s with the artifacts loaded (`fxgraph_cache_hit`).

A compiled graph is specialised on the batch size (`dynamic=False`): each UNet call is padded to the next
bucket (powers of two, rows repeated and their outputs dropped) so a server with SPO_MAX_BATCH=8 compiles
at most 5 UNet batch sizes (1, 2, 4, 8, 16 rows with CFG) per image size and LoRA graph, and the VAE 4.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("spo_runtime.compiling")

RECOMPILE_LIMIT = 64  # graphs per compiled function: buckets x image sizes x LoRA graphs (dynamo's default: 8)


def buckets(max_rows: int) -> tuple[int, ...]:
    """Powers of two up to the first one >= max_rows: the batch sizes a padded call can have."""
    out, b = [], 1
    while True:
        out.append(b)
        if b >= max_rows:
            return tuple(out)
        b *= 2


def bucket(n: int, sizes: tuple[int, ...] | None) -> int:
    """The smallest bucket holding n rows; n itself without buckets or past the largest."""
    if not sizes:
        return n
    return next((b for b in sizes if b >= n), n)


def pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """`t` with its last row repeated up to n rows (padding rows: real data, so every kernel stays finite)."""
    extra = n - t.shape[0]
    return t if extra <= 0 else torch.cat([t, t[-1:].expand(extra, *t.shape[1:])])


def writable(directory: Path) -> bool:
    """Whether `directory` can be created and written (SPO_COMPILE=auto needs it)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


class CompileCache:
    """The compile caches under `root` (SPO_DATA_DIR/compile_cache) for graphs described by `key_parts`."""

    def __init__(self, root: Path, key_parts: dict):
        self.root = Path(root)
        self.inductor_dir = self.root / "inductor"
        self.key = hashlib.sha256(repr(sorted(key_parts.items())).encode()).hexdigest()[:16]
        self.key_parts = dict(key_parts)
        self.artifacts = self.root / "artifacts" / f"{self.key}.bin"
        self.loaded: str | None = None  # what activate() found: "artifacts (N bytes)" or None
        self.saved_bytes = 0

    def activate(self) -> None:
        """Point inductor's cache at ours and load the saved artifacts of these graphs, if any."""
        self.inductor_dir.mkdir(parents=True, exist_ok=True)
        self.artifacts.parent.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.inductor_dir.resolve())
        if self.artifacts.exists():
            data = self.artifacts.read_bytes()
            try:
                torch.compiler.load_cache_artifacts(data)
                self.loaded = f"artifacts ({len(data)} bytes)"
            except Exception as e:  # a damaged or foreign file: compile from scratch and overwrite it later
                log.warning("compile cache %s not loaded (%s: %s); compiling from scratch", self.artifacts, type(e).__name__, e)

    def save(self) -> int:
        """Write the portable artifacts of everything compiled so far (atomically); bytes written (0: none)."""
        got = torch.compiler.save_cache_artifacts()
        if not got:
            return 0
        data = got[0]
        tmp = self.artifacts.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, self.artifacts)
        self.saved_bytes = len(data)
        return len(data)

    def info(self, show_paths: bool = True) -> dict:
        """For /info: the directories only to the admin (show_paths), like the pipeline's sources."""
        paths = {"dir": str(self.root), "inductor_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")} if show_paths else {}
        return {**paths, "key": self.key, "loaded": self.loaded, "saved_bytes": self.saved_bytes}


def enabled(setting: bool | str, device: torch.device, cache_root: Path) -> tuple[bool, str]:
    """(compile?, why) for SPO_COMPILE: true/false as set; auto: on with CUDA when the cache is writable."""
    if setting is True:
        return True, "SPO_COMPILE=true"
    if setting is False:
        return False, "SPO_COMPILE=false"
    if device.type != "cuda":
        return False, f"SPO_COMPILE=auto: off on {device.type}"
    if not writable(cache_root):
        return False, f"SPO_COMPILE=auto: off, {cache_root} is not writable"
    return True, "SPO_COMPILE=auto: CUDA and a writable cache"


def compile_module(fn, backend: str, mode: str):
    """torch.compile with static shapes; `mode` only where the backend takes one (inductor)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    kw = {"mode": mode} if backend == "inductor" and mode != "default" else {}
    return torch.compile(fn, backend=backend, dynamic=False, **kw)

