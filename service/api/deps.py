"""Annotated dependencies: the service state and the two API-key checks.

The auth middleware already refuses requests without a valid key by path; these dependencies
repeat the check per route so a route can never be added without one (and the OpenAPI schema
documents the bearer scheme)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import AuthenticationError, PermissionDeniedError
from service.state import ServiceState

bearer = HTTPBearer(auto_error=False, description="API key (LORAMUX_API_KEYS / LORAMUX_ADMIN_API_KEYS)")


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]


def key_matches(presented: str, keys: list[str]) -> bool:
    """Constant-time comparison against every configured key (no early exit on a match)."""
    result = False
    for key in keys:
        result |= hmac.compare_digest(presented.encode(), key.encode())
    return result


def _presented(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials else None


def require_inference_key(
    state: State, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    settings = state.settings
    if not settings.auth_enabled:
        return
    key = _presented(credentials)
    if key is None or not key_matches(key, [*settings.api_keys, *settings.admin_api_keys]):
        raise AuthenticationError("a valid API key is required (Authorization: Bearer <key>)")


def require_admin_key(
    state: State, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    settings = state.settings
    if not settings.auth_enabled:
        return
    key = _presented(credentials)
    if key is None:
        raise AuthenticationError("an admin API key is required (Authorization: Bearer <key>)")
    if not settings.admin_api_keys or not key_matches(key, settings.admin_api_keys):
        if key_matches(key, settings.api_keys):
            raise PermissionDeniedError("this key may not manage adapters")
        raise AuthenticationError("a valid admin API key is required")


InferenceAuth = Depends(require_inference_key)
AdminAuth = Depends(require_admin_key)
