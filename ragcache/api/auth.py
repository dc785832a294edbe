"""API keys: ``server.api_keys`` maps bearer keys to tenants, ``server.admin_keys`` names
the keys that may also run admin routes; with neither set, every caller is the default
tenant with admin rights (the CLI then binds loopback only).

A key setting that is set must parse whole: a typo is a start-up error naming the
setting, never a server without auth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from ragcache.config import ConfigError
from ragcache.errors import ServiceError

KEY_FORMAT = "write key or key=tenant, entries separated by commas"


class AuthError(ServiceError):
    status = 401
    kind = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(ServiceError):
    status = 403
    kind = "permission_error"
    code = "admin_key_required"


def _header_safe(text: str) -> bool:
    """Visible ASCII only: what a bearer token can carry in an HTTP header, no spaces."""
    return all("!" <= char <= "~" for char in text)


def parse_api_keys(text: str, setting: str = "server.api_keys") -> dict[str, str]:
    """``"key1=tenant1,key2"`` -> {key: tenant}; a key without a tenant gets tenant ''.

    Blank text means no keys. Otherwise every entry must parse: an empty entry, a missing
    key, an empty tenant after '=', a space or non-ASCII character in a key or tenant,
    or a repeated key is a ConfigError naming ``setting`` (messages never show a key).
    """
    keys: dict[str, str] = {}
    if not text.strip():
        return keys
    for number, item in enumerate(text.split(","), start=1):
        entry = item.strip()
        where = f"{setting}: entry {number}"
        key, has_tenant, tenant = entry.partition("=")
        if not entry:
            raise ConfigError(f"{where} is empty; {KEY_FORMAT}")
        if not key:
            raise ConfigError(f"{where} has no key before '='; {KEY_FORMAT}")
        if has_tenant and not tenant:
            raise ConfigError(
                f"{where} has an empty tenant after '='; write the key alone for the default tenant"
            )
        if not _header_safe(key):
            raise ConfigError(
                f"{where}: the key holds a space or a character outside visible ASCII; "
                "keys travel in an Authorization header"
            )
        if not _header_safe(tenant):
            raise ConfigError(f"{where}: the tenant holds a space or a non-ASCII character")
        if key in keys:
            raise ConfigError(f"{where} repeats the key of an earlier entry; list each key once")
        keys[key] = tenant
    return keys


@dataclass(slots=True, frozen=True)
class Caller:
    tenant: str
    is_admin: bool


class AccessKeys:
    def __init__(self, api_keys: str = "", admin_keys: str = "") -> None:
        self.admins = parse_api_keys(admin_keys, "server.admin_keys")
        users = parse_api_keys(api_keys, "server.api_keys")
        if any(users[key] != self.admins[key] for key in users.keys() & self.admins.keys()):
            raise ConfigError(
                "server.api_keys and server.admin_keys give one key two different tenants; "
                "give it one tenant, or list it in server.admin_keys alone"
            )
        self.tenants = {**users, **self.admins}

    @property
    def enabled(self) -> bool:
        return bool(self.tenants)

    def caller(self, request: Request) -> Caller:
        if not self.enabled:
            return Caller("", True)
        headers = request.headers.getlist("authorization")
        scheme, _, token = headers[0].partition(" ") if len(headers) == 1 else ("", "", "")
        # The scheme is case-insensitive (RFC 7235, section 2.1), so "bearer" counts as
        # "Bearer"; the token is taken exactly, one space after the scheme and nothing
        # around the key (keys hold no spaces, so a padded token matches none).
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
