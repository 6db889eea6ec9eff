"""Who may call the admin and training routes: a bearer token when SPO_ADMIN_TOKEN is set, else
loopback clients only."""

from __future__ import annotations

import hmac
import ipaddress

from starlette.requests import Request
from starlette.responses import JSONResponse

from service.errors import error_response


def admin_denied(request: Request, token: str | None) -> JSONResponse | None:
    """None when the caller may use admin routes, else the 401 to answer."""
    if token:
        got = request.headers.get("authorization", "")
        if got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), token.encode()):
            return None
        return error_response(401, "authorization: a valid 'Authorization: Bearer <SPO_ADMIN_TOKEN>' header is required",
                              "authorization", headers={"WWW-Authenticate": "Bearer"}, kind="unauthorized")
    host = request.client.host if request.client else ""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return error_response(401, "authorization: admin routes answer only loopback clients until SPO_ADMIN_TOKEN is set",
                          "authorization", headers={"WWW-Authenticate": "Bearer"}, kind="unauthorized")
