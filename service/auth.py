"""Who may call what.

- Admin, training and evaluation routes (/admin/*, /train/*, /eval/*): `Authorization: Bearer <admin token>`.
  The token is SPO_ADMIN_TOKEN, or else the one in SPO_DATA_DIR/admin_token, which the first start creates
  (random, mode 0600, the token alone on one line: written to a temp file opened O_CREAT|O_EXCL|O_NOFOLLOW,
  fsynced, hard-linked to its name, which never replaces a file, then the directory fsynced) and later starts
  reuse (opened O_NOFOLLOW: a symbolic link there is refused). No client is trusted for being on loopback:
  behind a proxy or a sidecar every client is.
- A token shorter than 16 characters (SPO_ADMIN_TOKEN, SPO_API_TOKEN, the file's) is a ConfigError.
- Generation routes: when SPO_API_TOKEN is set, `Authorization: Bearer <api token>` (the admin token is
  accepted too); the A1111 routes also take HTTP Basic with the token as the password. /livez, /readyz,
  /metrics, /docs.json and /info stay open. The rule itself is `service.context.credentials_ok`.
Tokens never appear in logs or responses: the log names the file, not its content.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from pathlib import Path

from starlette.responses import JSONResponse

from service.errors import error_response
from spo_runtime.errors import ConfigError
from spo_runtime.fsutil import write_new

log = logging.getLogger("spo_serve")
TOKEN_FILE = "admin_token"
MIN_TOKEN_CHARS = 16  # Settings' admin_token and api_token declare the same bound


def admin_token(token: str | None, data_dir: str | os.PathLike) -> str:
    """SPO_ADMIN_TOKEN when set, else the token file's (created once, race-free across workers).
    ConfigError (naming SPO_ADMIN_TOKEN, never the token) for a short token or a file that is a link."""
    if token:
        if len(token) < MIN_TOKEN_CHARS:
            raise ConfigError("SPO_ADMIN_TOKEN", f"must be at least {MIN_TOKEN_CHARS} characters")
        return token
    path = Path(data_dir) / TOKEN_FILE
    try:
        fd = _open_token(path)
    except FileNotFoundError:
        _create_token(path)
        fd = _open_token(path)
    else:
        log.info("admin token: read from %s", path)
    return _read_token(fd, path)


def check_token_file(token: str | None, data_dir: str | os.PathLike) -> None:
    """At start, in the process that runs `bentoml serve` too: the ConfigError `admin_token` would raise in
    every worker for a token file that exists but is refused (a link, not a regular file, not one token),
    raised here once instead (workers that fail at start are restarted by BentoML, forever). A missing file
    is left for the first worker to create."""
    if token:
        return
    path = Path(data_dir) / TOKEN_FILE
    try:
        fd = _open_token(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError("SPO_ADMIN_TOKEN", f"{path} cannot be read ({e.strerror}); fix it, delete it or set "
                                             "SPO_ADMIN_TOKEN") from None
    _read_token(fd, path)


def _read_token(fd: int, path: Path) -> str:
    """The token in the open file `fd` (closed here), or ConfigError naming SPO_ADMIN_TOKEN and the path."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # before fdopen, which refuses a directory with its own error
        os.close(fd)
        raise ConfigError("SPO_ADMIN_TOKEN", f"{path} must be a regular file")
    with os.fdopen(fd) as fh:
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
            log.warning("admin token: %s was readable by others; its mode is now 0600", path)
        try:
            value = fh.read().strip()
        except (UnicodeDecodeError, OSError):
            value = ""
    if len(value) < MIN_TOKEN_CHARS or any(c.isspace() for c in value):
        raise ConfigError("SPO_ADMIN_TOKEN", f"{path} must hold one token of at least {MIN_TOKEN_CHARS} characters "
                                             "on one line (delete it to have a new one made, or set SPO_ADMIN_TOKEN)")
    return value


def _open_token(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError("SPO_ADMIN_TOKEN", f"{path} is a symbolic link; refused (the token file must be a "
                                                 "regular file; or set SPO_ADMIN_TOKEN)") from None
        raise


def _create_token(path: Path) -> None:
    """A new random token at `path`, unless another worker's appears there first: `write_new` writes a temp
    file of a random name (O_EXCL|O_NOFOLLOW, mode 0600), fsyncs it, hard-links it into place (atomic and
    exclusive: of two workers starting together, one wins) and fsyncs the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_new(path, (secrets.token_urlsafe(32) + "\n").encode())
    except FileExistsError:
        return
    log.warning("admin token: created %s (mode 0600); send it as 'Authorization: Bearer ...' "
                "to /admin/* and /train/*, or set SPO_ADMIN_TOKEN", path)


def denied(field: str, what: str) -> JSONResponse:
    return error_response(401, f"authorization: a valid 'Authorization: Bearer <{what}>' header is required", field,
                          headers={"WWW-Authenticate": "Bearer"}, kind="unauthorized")


def admin_unauthorized() -> JSONResponse:
    """The 401 of an admin, training or evaluation route."""
    return denied("authorization", "admin token (SPO_ADMIN_TOKEN or SPO_DATA_DIR/admin_token)")


def api_unauthorized() -> JSONResponse:
    """The 401 of a generation route (ours: /generate, /generate_batch, /generate/stream)."""
    return denied("authorization", "SPO_API_TOKEN")
