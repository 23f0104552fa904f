"""Tenant API keys on HTTP requests: ``Authorization: Bearer <key>`` or ``X-API-Key``.

Lookups are cached for a few seconds per replica (a revoked key stops working within
:data:`CACHE_SECONDS`), so a busy endpoint does not ask PostgreSQL on every request.
"""

from __future__ import annotations

from fastapi import Request

from adapters.sources import SourceCatalog, hash_key
from core.exceptions import InvalidInputError
from serve_apps.cache import TtlCache

CACHE_SECONDS = 5.0
ALL_TENANTS = "*"
"""The tenant of a platform key: it may act for any tenant."""


class AuthFailed(InvalidInputError):
    """The request carries no usable tenant key; ``status`` is 401 or 403."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key else None


class ApiKeys:
    """Resolves the tenant of a request's API key."""

    def __init__(self, dsn: str, catalog: SourceCatalog | None = None) -> None:
        catalog = catalog or SourceCatalog(dsn)
        # Keyed by the key's hash: the raw keys are not kept in memory.
        self._owners = TtlCache(catalog.key_owner, CACHE_SECONDS)

    async def tenant_for(self, request: Request) -> str:
        """The tenant whose key the request carries.

        Raises:
            AuthFailed: 401 when the key is missing or unknown, 403 when revoked.
        """
        return await self.tenant_of_key(presented_key(request))

    async def tenant_of_key(self, key: str | None) -> str:
        """The tenant of ``key``, however the request carried it (the schema registry
        also takes it from HTTP basic auth).

        Raises:
            AuthFailed: 401 when the key is missing or unknown, 403 when revoked.
        """
        if key is None:
            raise AuthFailed(
                401, "no API key: send `Authorization: Bearer <key>` (see `rayline tenants add`)"
            )
        if len(key) > 256:
            raise AuthFailed(401, "the API key is not a Rayline key (too long)")
        found = await self._owners.get(hash_key(key))
        if found is None:
            raise AuthFailed(401, "unknown API key: check it, or make one with `rayline keys add`")
        tenant, revoked = found
        if revoked:
            raise AuthFailed(403, f"this API key of tenant {tenant!r} was revoked")
        return tenant

    async def acting_tenant(self, request: Request, asked: str | None) -> str | None:
        """The tenant a read or change acts for: the key's own, or with the platform key
        the one it names (``asked``); None when the platform key names none.

        Raises:
            AuthFailed: as :meth:`tenant_for`, and 403 when a tenant key names another.
        """
        own = await self.tenant_for(request)
        if own == ALL_TENANTS:
            return asked
        if asked is not None and asked != own:
            raise AuthFailed(
                403, f"this key belongs to tenant {own!r}; it cannot act for {asked!r}"
            )
        return own
