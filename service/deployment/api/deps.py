"""Dependencies of the routes: the shared state and the two access levels (client key, admin token)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from service.deployment.api.errors import ApiError
from service.deployment.api.state import ApiState

API_KEY_HEADER = "X-API-Key"
_api_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                        description="the client key (ingest, predict, status) or the admin token (also /v1/model)")


def get_state(request: Request) -> ApiState:
    return request.app.state.api


State = Annotated[ApiState, Depends(get_state)]
ApiKey = Annotated[str | None, Security(_api_key)]


def _matches(given: str | None, secret) -> bool:
    return given is not None and secret is not None and hmac.compare_digest(given.encode(),
                                                                            secret.get_secret_value().encode())


def require_client(request: Request, key: ApiKey) -> None:
    """The client key or the admin token; 401 otherwise."""
    settings = get_state(request).settings
    if not (_matches(key, settings.api_key) or _matches(key, settings.admin_token)):
        raise ApiError(401, "auth", f"missing or wrong {API_KEY_HEADER} header", {"WWW-Authenticate": "ApiKey"})


def require_admin(request: Request, key: ApiKey) -> None:
    """The admin token only: 403 for the client key (or when no admin token is configured), 401 otherwise."""
    settings = get_state(request).settings
    if _matches(key, settings.admin_token):
        return
    if settings.admin_token is None:
        raise ApiError(403, "forbidden", "admin routes are disabled: set DSCGUARD_ADMIN_TOKEN to enable them")
    if _matches(key, settings.api_key):
        raise ApiError(403, "forbidden", "this route needs the admin token, not the client key")
    raise ApiError(401, "auth", f"missing or wrong {API_KEY_HEADER} header", {"WWW-Authenticate": "ApiKey"})
