"""Durable file writes: a reader sees the old file or the new one, never a half-written one; `write_new`
never replaces anything."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[IO[bytes]], Any]) -> Path:
    """Write `data` (bytes, or a function writing to a binary file) to a temp file beside `path`,
    fsync it, rename it over `path`, then fsync the directory so the rename survives a crash.

    On any error the temp file is removed and `path` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_new(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path`, which must not exist: a temp file beside it (O_EXCL), fsynced, hard-linked
    to `path`, then the directory fsynced. The link fails with FileExistsError when anything is at `path`
    (a file, a link, one written a moment ago by another process): a file is never replaced, and a
    reader never sees a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """`data` as indented, key-sorted JSON, written with `atomic_write` (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True).encode())


def fsync_dir(directory: str | os.PathLike) -> None:
    """Persist renames in `directory`; best effort, as some platforms cannot open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
