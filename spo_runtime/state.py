"""Admin settings shared by every worker and kept across restarts: default scale, default adapter and
the adapters loaded from SPO_ADAPTER_DIR, in SPO_DATA_DIR/admin_state.json (`AdminStore`).

A worker that takes an admin call applies it, then records it in the store (atomic replace under a
file lock); every worker converges to the recorded settings at its next step boundary
(`AdminSync.poll`, run by the engine thread) and reports what it applied in
SPO_DATA_DIR/workers/<host>.<pid>.json.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from spo_runtime.errors import InvalidRequestError, SpoError
from spo_runtime.fsutil import file_sha256, fsync_dir, write_json_atomic
from spo_runtime.limits import LORA_SCALE_RANGE

log = logging.getLogger("spo_runtime.state")
_HOST = socket.gethostname()

# default_lora_scale / default_adapter are present only once an admin set them
EMPTY: dict[str, Any] = {"version": 0, "adapters": {}, "removed": []}


def _invalid(state: Any) -> str | None:
    """Why a parsed admin state cannot be used, or None."""
    if not isinstance(state, dict):
        return f"a JSON {type(state).__name__}, not an object"
    v = state.get("version", 0)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        return f"version must be an integer >= 0, got {v!r}"
    adapters = state.get("adapters", {})
    if not isinstance(adapters, dict) or not all(isinstance(e, dict) and isinstance(e.get("file"), str) for e in adapters.values()):
        return "adapters must map names to {file, sha256}"
    removed = state.get("removed", [])
    if not isinstance(removed, list) or not all(isinstance(n, str) for n in removed):
        return "removed must be a list of names"
    if "default_lora_scale" in state:
        x = state["default_lora_scale"]
        lo, hi = LORA_SCALE_RANGE
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not lo <= x <= hi:
            return f"default_lora_scale must be a number in {lo:g}..{hi:g}, got {x!r}"
    if not isinstance(state.get("default_adapter"), (str, type(None))):
        return "default_adapter must be a name or null"
    return None


NAME_MAX = 255  # bytes of one path component: the limit of Linux file systems (ext4, xfs, overlayfs, tmpfs)


def resolve_under(root: Path, relative: str, field: str, suffixes: tuple[str, ...] = (".safetensors",)) -> Path:
    """`root / relative`, refusing absolute paths, escapes (.., symlinks out), other suffixes and names the
    file system refuses (a component over NAME_MAX bytes, a name it cannot encode): InvalidRequestError
    naming `field`, never an OSError."""
    if not relative or Path(relative).is_absolute() or "\x00" in relative:
        raise InvalidRequestError(field, f"must be a relative path under the configured directory, got {relative!r}")
    shown = repr(relative) if len(relative) <= 80 else f"{relative[:60]!r}... ({len(relative)} characters)"
    longest = max((len(part.encode("utf-8", "surrogatepass")) for part in Path(relative).parts), default=0)
    if longest > NAME_MAX:
        raise InvalidRequestError(field, f"each part of the path must be at most {NAME_MAX} bytes (the file system's "
                                         f"limit), got one of {longest} bytes: {shown}")

    def refused(e: Exception) -> InvalidRequestError:  # ENAMETOOLONG, EACCES, a symlink loop, an unencodable name
        return InvalidRequestError(field, f"the file system refuses this name ({getattr(e, 'strerror', None) or e}): "
                                          f"{shown}")

    try:
        root = root.resolve()
        path = (root / relative).resolve()
    except (OSError, RuntimeError, UnicodeError) as e:
        raise refused(e) from None
    if not path.is_relative_to(root):
        raise InvalidRequestError(field, f"must stay under the configured directory, got {shown}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise InvalidRequestError(field, f"must end with {' or '.join(suffixes)} (pickle files are refused), got {shown}")
    try:
        found = path.is_file()
    except (OSError, UnicodeError) as e:
        raise refused(e) from None
    if not found:
        raise InvalidRequestError(field, f"no such file under the adapter directory: {shown}")
    return path


_hashed: dict[str, tuple[tuple[int, int, int], str]] = {}  # path -> (its stat when hashed, sha256)


def file_state(source: str | None, sha256: str | None) -> str | None:
    """Whether a loaded adapter's file still holds the bytes that were loaded: "unchanged", "changed"
    (other bytes now; the loaded copy keeps serving), "missing" (deleted or unreadable), or None when
    the adapter did not come from a file (built in, trained in process). The file is hashed again only
    when its size, mtime or inode changed since it was last hashed."""
    if not source or not sha256 or not Path(source).is_absolute():
        return None
    try:
        st = os.stat(source)
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        seen = _hashed.get(source)
        if seen is None or seen[0] != key:
            seen = (key, file_sha256(source))
            _hashed[source] = seen
    except OSError:
        _hashed.pop(source, None)
        return "missing"
    return "unchanged" if seen[1] == sha256 else "changed"


class AdminStore:
    """The recorded admin settings: read by any process, changed only through `mutate` (file lock)."""

    def __init__(self, data_dir: str | Path, adapter_dir: str | Path):
        self.data_dir = Path(data_dir)
        self.adapter_dir = Path(adapter_dir)
        self.path = self.data_dir / "admin_state.json"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        self.quarantined = self.quarantine_if_damaged()  # a damaged file never stops the server

    def load(self) -> tuple[dict | None, str | None]:
        """(the recorded state, None), (None, None) when there is no file, or (None, why) when the file
        is damaged: not JSON, not an object, or a field of the wrong type."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        except OSError as e:
            return None, f"unreadable: {e}"
        try:
            state = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return None, f"not JSON: {e}"
        problem = _invalid(state)
        return (None, problem) if problem else ({**json.loads(json.dumps(EMPTY)), **state}, None)

    def read(self) -> dict:
        state, problem = self.load()
        if problem:
            log.error("admin state %s is damaged (%s): ignoring it", self.path, problem)
        return state if state is not None else json.loads(json.dumps(EMPTY))

    def version(self) -> int:
        state, _ = self.load()
        return int(state.get("version", 0)) if state is not None else 0

    def quarantine_if_damaged(self) -> Path | None:
        """At start (and before a change): a damaged state file is moved aside to
        `admin_state.json.corrupt` (then `.corrupt.1`, ...; never overwritten) and logged, so the
        server starts from the defaults and the bad bytes stay for a person to read. Returns the
        path it was moved to, or None."""
        with self._lock():
            return self._quarantine()

    def _quarantine(self) -> Path | None:
        _, problem = self.load()
        if not problem:
            return None
        dest = self.path.with_name(self.path.name + ".corrupt")
        n = 0
        while dest.exists():
            n += 1
            dest = self.path.with_name(f"{self.path.name}.corrupt.{n}")
        os.replace(self.path, dest)
        fsync_dir(self.data_dir)
        log.error("admin state %s is damaged (%s): moved to %s; starting from the defaults "
                  "(default scale, default adapter and loaded adapters as configured)", self.path, problem, dest)
        return dest

    @contextlib.contextmanager
    def _lock(self):
        with open(self.data_dir / ".admin_state.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def mutate(self, change: Callable[[dict], None]) -> dict:
        """Apply `change` to the recorded state under an exclusive lock; bump the version. A damaged
        file is moved aside first (see quarantine_if_damaged)."""
        with self._lock():
            self._quarantine()
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
        self._applied_at: float | None = None  # updated_at of the applied state

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
        state, problem = self.store.load()
        if problem:  # damaged while we run: keep what is applied; the next admin change replaces the file
            log.error("admin state %s is damaged (%s): keeping the applied settings", self.store.path, problem)
            self.errors["admin_state"] = problem
            self.report()
            return
        self.errors.pop("admin_state", None)
        state = state if state is not None else json.loads(json.dumps(EMPTY))
        # the version, and the time of the change: versions restart at 1 after a damaged file was moved aside
        if (int(state.get("version", 0)), state.get("updated_at")) != (self.applied_version, self._applied_at):
            self.apply(state)

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
            self._applied_at = s.get("updated_at")
        self.report()
        if self.on_change:
            self.on_change()

    def report(self) -> None:
        # keyed by host and pid: pods that share SPO_DATA_DIR have small pids that collide
        write_json_atomic(
            self.store.data_dir / "workers" / f"{_HOST}.{os.getpid()}.json",
            {
                "host": _HOST,
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
        """Every live worker of this host: its applied state (reports of dead processes and of other hosts
        sharing SPO_DATA_DIR are skipped)."""
        out = []
        for f in sorted((self.store.data_dir / "workers").glob(f"{_HOST}.*.json")):
            try:
                rec = json.loads(f.read_text())
                os.kill(int(rec["pid"]), 0)
            except (OSError, ValueError, KeyError, json.JSONDecodeError):
                continue
            out.append(rec)
        return out
