"""Admin settings shared by every worker and kept across restarts: default scale, default adapter and
the adapters loaded from SPO_ADAPTER_DIR, in SPO_DATA_DIR/admin_state.json (`AdminStore`).

A worker that takes an admin call applies it, then records it in the store (atomic replace under a
file lock); every worker converges to the recorded settings at its next step boundary
(`AdminSync.poll`, run by the engine thread) and reports what it applied in
SPO_DATA_DIR/workers/<pid>.json.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from .errors import InvalidRequestError, SpoError
from .fsutil import write_json_atomic
from .models import file_sha256

log = logging.getLogger("spo_runtime.state")

# default_lora_scale / default_adapter are present only once an admin set them
EMPTY: dict[str, Any] = {"version": 0, "adapters": {}, "removed": []}


def resolve_under(root: Path, relative: str, field: str, suffixes: tuple[str, ...] = (".safetensors",)) -> Path:
    """`root / relative`, refusing absolute paths, escapes (.., symlinks out) and other suffixes."""
    if not relative or Path(relative).is_absolute() or "\x00" in relative:
        raise InvalidRequestError(field, f"must be a relative path under the configured directory, got {relative!r}")
    root = root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise InvalidRequestError(field, f"must stay under the configured directory, got {relative!r}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise InvalidRequestError(field, f"must end with {' or '.join(suffixes)} (pickle files are refused), got {relative!r}")
    if not path.is_file():
        raise InvalidRequestError(field, f"no such file under the adapter directory: {relative!r}")
    return path


class AdminStore:
    """The recorded admin settings: read by any process, changed only through `mutate` (file lock)."""

    def __init__(self, data_dir: str | Path, adapter_dir: str | Path):
        self.data_dir = Path(data_dir)
        self.adapter_dir = Path(adapter_dir)
        self.path = self.data_dir / "admin_state.json"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.adapter_dir.mkdir(parents=True, exist_ok=True)

    def read(self) -> dict:
        try:
            return {**EMPTY, **json.loads(self.path.read_text())}
        except FileNotFoundError:
            return json.loads(json.dumps(EMPTY))
        except (json.JSONDecodeError, OSError) as e:
            log.error("admin state %s unreadable (%s): ignoring it", self.path, e)
            return json.loads(json.dumps(EMPTY))

    def version(self) -> int:
        try:
            return int(json.loads(self.path.read_text()).get("version", 0))
        except (FileNotFoundError, json.JSONDecodeError, OSError, ValueError):
            return 0

    def mutate(self, change: Callable[[dict], None]) -> dict:
        """Apply `change` to the recorded state under an exclusive lock; bump the version."""
        with open(self.data_dir / ".admin_state.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.read()
            change(state)
            state["version"] = int(state.get("version", 0)) + 1
            state["updated_at"] = time.time()
            write_json_atomic(self.path, state)
            return state


class AdminSync:
    """Converges one worker's pipeline to the recorded admin settings (called at step boundaries)."""

    def __init__(self, pipe, store: AdminStore, on_change: Callable[[], None] | None = None):
        self.pipe = pipe
        self.store = store
        self.applied_version = -1
        self.errors: dict[str, str] = {}
        self.on_change = on_change
        self.preset_adapters = set(pipe.registry.adapters)  # loaded by the preset at start-up
        self.running_scales: Callable[[], list[dict[str, float]]] = lambda: []
        self._seen: tuple | None = ()  # the state file's (mtime, size, inode) at the last poll
        self._pending = False

    def poll(self) -> None:
        """Called at every step boundary: a stat, and a read only when the file changed (or an
        unload is still pending)."""
        try:
            st = self.store.path.stat()
            seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            seen = None
        if seen == self._seen and not self._pending:
            return
        self._seen = seen
        if self.store.version() != self.applied_version:
            self.apply(self.store.read())

    def apply(self, s: dict) -> None:
        reg = self.pipe.registry
        pending = False
        for name, entry in s.get("adapters", {}).items():
            if name in reg.adapters and reg.adapters[name].sha256 == entry.get("sha256"):
                continue
            try:
                path = resolve_under(self.store.adapter_dir, entry["file"], "file")
                if entry.get("sha256") and file_sha256(path) != entry["sha256"]:
                    raise SpoError(f"{entry['file']} changed on disk since it was loaded (sha256 differs)")
                self.pipe.load_adapter(name, path, replace=True)
                self.errors.pop(name, None)
            except Exception as e:  # a bad record must not stop the worker
                self.errors[name] = str(e)
                log.error("adapter %r from the admin state not loaded: %s", name, e)
        wanted = set(s.get("adapters", {}))
        for name in list(reg.adapters):
            if name in wanted or (name in self.preset_adapters and name not in s.get("removed", [])):
                continue
            if any(row.get(name, 0.0) for row in self.running_scales()):
                pending = True  # in use here: unload at a later boundary
                continue
            self.pipe.unload_adapter(name)
        if "default_lora_scale" in s:
            self.pipe.default_lora_scale = float(s["default_lora_scale"])
        if "default_adapter" in s and (s["default_adapter"] is None or s["default_adapter"] in reg.adapters):
            self.pipe.default_adapter = s["default_adapter"]
        self._pending = pending
        if not pending:
            self.applied_version = s.get("version", 0)
        self.report()
        if self.on_change:
            self.on_change()

    def report(self) -> None:
        write_json_atomic(
            self.store.data_dir / "workers" / f"{os.getpid()}.json",
            {
                "pid": os.getpid(),
                "applied_version": self.applied_version,
                "default_lora_scale": self.pipe.default_lora_scale,
                "default_adapter": self.pipe.default_adapter,
                "adapters": {n: a.sha256[:16] for n, a in self.pipe.registry.adapters.items()},
                "errors": self.errors,
                "at": time.time(),
            },
        )

    def workers(self) -> list[dict]:
        """Every live worker's applied state (reports of dead processes are skipped)."""
        out = []
        for f in sorted((self.store.data_dir / "workers").glob("*.json")):
            try:
                rec = json.loads(f.read_text())
                os.kill(int(rec["pid"]), 0)
            except (OSError, ValueError, KeyError, json.JSONDecodeError):
                continue
            out.append(rec)
        return out
