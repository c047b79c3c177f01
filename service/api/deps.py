"""Annotated dependencies: the service state and the two API-key checks.

The auth middleware already refuses requests without a valid key by path; these dependencies ask
the same decision (`authorization.authorize`) per route, so a route can never be added without one
(and the OpenAPI schema documents the bearer scheme)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.authorization import authorize
from service.state import ServiceState

bearer = HTTPBearer(auto_error=False, description="API key (LORAMUX_API_KEYS / LORAMUX_ADMIN_API_KEYS)")


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]


def _presented(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials else None


def require_inference_key(
    state: State, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    authorize(state.settings, _presented(credentials), "inference")


def require_admin_key(
    state: State, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    authorize(state.settings, _presented(credentials), "admin")


InferenceAuth = Depends(require_inference_key)
AdminAuth = Depends(require_admin_key)
