"""API keys: ``server.api_keys`` maps bearer keys to tenants; empty means no auth."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request

from ragcache.service_errors import ServiceError


class AuthError(ServiceError):
    status = 401
    kind = "authentication_error"


def parse_api_keys(text: str) -> dict[str, str]:
    """``"key1=tenant1,key2"`` -> {key: tenant}; a key without a tenant gets tenant ''."""
    keys: dict[str, str] = {}
    for item in text.split(","):
        key, _, tenant = item.strip().partition("=")
        if key:
            keys[key] = tenant
    return keys


def require_api_key(keys: dict[str, str]) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in keys:
            raise AuthError("missing or unknown API key; send 'Authorization: Bearer <key>'")
        request.state.tenant = keys[token.strip()]

    return check
