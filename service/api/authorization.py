"""The one authorization decision: who may call what. The ASGI guard (`middleware.AuthMiddleware`)
applies it to every path before routing, and the route dependencies (`deps.InferenceAuth`,
`deps.AdminAuth`) apply it again per route, so a route added without the guard's knowledge is still
closed; both ask `authorize`, so they can never disagree.

Deny by default once any key is set: inference routes take an inference or an admin key, admin
routes (and vLLM's two LoRA endpoints) only an admin key (an inference key there is a 403: it is a
valid key without the right), and only /health and /ready (and /metrics with
`LORAMUX_METRICS_PUBLIC`) are public. Keys are compared in constant time against every configured key."""

from __future__ import annotations

import hmac
from typing import Literal

from service.errors import AuthenticationError, PermissionDeniedError
from service.settings import Settings

Access = Literal["public", "inference", "admin"]
PUBLIC_PATHS = frozenset({"/health", "/ready"})
# vLLM's runtime LoRA endpoints, aliases of the admin API (`service.api.lora`): admin paths outside /admin
VLLM_ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})


def access_for_path(path: str, settings: Settings) -> Access:
    """What a path needs (for the guard that runs before routing)."""
    if path in PUBLIC_PATHS or (path == "/metrics" and settings.metrics_public):
        return "public"
    if path == "/admin" or path.startswith("/admin/") or path in VLLM_ADMIN_PATHS:
        return "admin"
    return "inference"


def key_matches(presented: str, keys: list[str]) -> bool:
    """Constant-time comparison against every configured key (no early exit on a match)."""
    result = False
    for key in keys:
        result |= hmac.compare_digest(presented.encode(), key.encode())
    return result


def authorize(settings: Settings, key: str | None, access: Access) -> None:
    """Return if `key` (the bearer key presented, if any) may use something that needs `access`;
    else raise the 401 or 403 that says why."""
    if access == "public" or not settings.auth_enabled:
        return
    if key is None:
        raise AuthenticationError("a valid API key is required (Authorization: Bearer <key>)")
    if access == "admin":
        if key_matches(key, settings.admin_api_keys):
            return
        if key_matches(key, settings.api_keys):
            raise PermissionDeniedError("this key may not manage adapters")
        raise AuthenticationError("a valid admin API key is required")
    if not key_matches(key, [*settings.api_keys, *settings.admin_api_keys]):
        raise AuthenticationError("a valid API key is required")
