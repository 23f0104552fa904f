"""Tenant API keys on HTTP requests: ``Authorization: Bearer <key>`` or ``X-API-Key``.

Lookups are cached for a few seconds per replica (a revoked key stops working within
:data:`CACHE_SECONDS`), so a busy endpoint does not ask PostgreSQL on every request.
"""

from __future__ import annotations

import time

from fastapi import Request

from adapters.sources import SourceCatalog, hash_key
from core.exceptions import InvalidInputError

CACHE_SECONDS = 5.0
_CACHE_MAX = 10_000


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
        self._catalog = catalog or SourceCatalog(dsn)
        # key hash -> (tenant or None when unknown, revoked, cached at)
        self._cache: dict[str, tuple[str | None, bool, float]] = {}

    async def tenant_for(self, request: Request) -> str:
        """The tenant whose key the request carries.

        Raises:
            AuthFailed: 401 when the key is missing or unknown, 403 when revoked.
        """
        key = presented_key(request)
        if key is None:
            raise AuthFailed(
                401, "no API key: send `Authorization: Bearer <key>` (see `rayline tenants add`)"
            )
        if len(key) > 256:
            raise AuthFailed(401, "the API key is not a Rayline key (too long)")
        tenant, revoked = await self._lookup(key)
        if tenant is None:
            raise AuthFailed(401, "unknown API key: check it, or make one with `rayline keys add`")
        if revoked:
            raise AuthFailed(403, f"this API key of tenant {tenant!r} was revoked")
        return tenant

    async def _lookup(self, key: str) -> tuple[str | None, bool]:
        digest = hash_key(key)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and now - hit[2] < CACHE_SECONDS:
            return hit[0], hit[1]
        found = await self._catalog.key_owner(key)
        tenant, revoked = (None, False) if found is None else found
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[digest] = (tenant, revoked, now)
        return tenant, revoked
