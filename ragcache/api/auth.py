"""API keys: ``server.api_keys`` maps bearer keys to tenants, ``server.admin_keys`` names
the keys that may also run admin routes; with neither set, every caller is the default
tenant with admin rights (the CLI then binds loopback only)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from ragcache.errors import ServiceError


class AuthError(ServiceError):
    status = 401
    kind = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(ServiceError):
    status = 403
    kind = "permission_error"
    code = "admin_key_required"


def parse_api_keys(text: str) -> dict[str, str]:
    """``"key1=tenant1,key2"`` -> {key: tenant}; a key without a tenant gets tenant ''."""
    keys: dict[str, str] = {}
    for item in text.split(","):
        key, _, tenant = item.strip().partition("=")
        if key:
            keys[key] = tenant.strip()
    return keys


@dataclass(slots=True, frozen=True)
class Caller:
    tenant: str
    is_admin: bool


class AccessKeys:
    def __init__(self, api_keys: str = "", admin_keys: str = "") -> None:
        self.admins = parse_api_keys(admin_keys)
        self.tenants = {**parse_api_keys(api_keys), **self.admins}

    @property
    def enabled(self) -> bool:
        return bool(self.tenants)

    def caller(self, request: Request) -> Caller:
        if not self.enabled:
            return Caller("", True)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or token not in self.tenants:
            raise AuthError("missing or unknown API key; send 'Authorization: Bearer <key>'")
        return Caller(self.tenants[token], token in self.admins)


def require_api_key(keys: AccessKeys) -> Callable[[Request], None]:
    """Authenticates the caller and records its tenant on ``request.state``."""

    def check(request: Request) -> None:
        caller = keys.caller(request)
        request.state.tenant = caller.tenant
        request.state.is_admin = caller.is_admin

    return check


def require_admin_key(keys: AccessKeys) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        caller = keys.caller(request)
        if not caller.is_admin:
            raise PermissionDeniedError("this route needs an admin key (server.admin_keys)")
        request.state.tenant = caller.tenant
        request.state.is_admin = True

    return check
