"""Who may call what.

- Admin and training routes (/admin/*, /train/*): `Authorization: Bearer <admin token>`. The token is
  SPO_ADMIN_TOKEN, or else the one in SPO_DATA_DIR/admin_token, which the first start creates (random,
  mode 0600, the token alone on one line) and later starts reuse. No client is trusted for being on
  loopback: behind a proxy or a sidecar every client is.
- Generation routes: when SPO_API_TOKEN is set, `Authorization: Bearer <api token>` (the admin token is
  accepted too); the A1111 routes also take HTTP Basic with the token as the password. /livez, /readyz,
  /metrics, /docs.json and /info stay open. The rule itself is `service.context.credentials_ok`.
Tokens never appear in logs or responses: the log names the file, not its content.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from starlette.responses import JSONResponse

from service.errors import error_response

log = logging.getLogger("spo_serve")
TOKEN_FILE = "admin_token"


def admin_token(token: str | None, data_dir: Path) -> str:
    """SPO_ADMIN_TOKEN when set, else the token file's (created once, race-free across workers)."""
    if token:
        return token
    path = Path(data_dir) / TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # atomic and exclusive: of two workers starting together, one wins
                log.warning("admin token: created %s (mode 0600); send it as 'Authorization: Bearer ...' "
                            "to /admin/* and /train/*, or set SPO_ADMIN_TOKEN", path)
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    else:
        log.info("admin token: read from %s", path)
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
        log.warning("admin token: %s was readable by others; its mode is now 0600", path)
    value = path.read_text().strip()
    if len(value) < 8 or any(c.isspace() for c in value):
        raise ValueError(f"{path}: must hold one token of at least 8 characters on one line")
    return value


def denied(field: str, what: str) -> JSONResponse:
    return error_response(401, f"authorization: a valid 'Authorization: Bearer <{what}>' header is required", field,
                          headers={"WWW-Authenticate": "Bearer"}, kind="unauthorized")


def admin_unauthorized() -> JSONResponse:
    """The 401 of an admin or training route."""
    return denied("authorization", "admin token (SPO_ADMIN_TOKEN or SPO_DATA_DIR/admin_token)")


def api_unauthorized() -> JSONResponse:
    """The 401 of a generation route (ours: /generate, /generate_batch, /generate/stream)."""
    return denied("authorization", "SPO_API_TOKEN")
