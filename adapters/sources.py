"""Tenants, API keys and sources in PostgreSQL, through an asyncpg pool.

A tenant's API key is shown once, when it is made; PostgreSQL keeps only its SHA-256
(keys are 256-bit random, so a fast hash is enough and no salt is needed). A source's
HMAC secret must stay readable to check signatures; during a rotation the previous
secret keeps working until ``previous_secret_until``.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from adapters.exceptions import StoreUnavailable
from adapters.postgres import AsyncStore
from core.exceptions import ConfigurationError

KEY_PREFIX = "rl_"
SOURCE_KINDS = ("webhook", "api", "poll", "mqtt", "upload", "cdc")
AUTH_KINDS = ("api_key", "hmac")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class Source:
    """One configured source, as the ingest edge and the source actors see it."""

    name: str
    kind: str
    tenant: str | None
    auth: str = "api_key"
    scheme: str | None = None
    secrets: tuple[str, ...] = ()
    mapping: Mapping[str, Any] = field(default_factory=dict)
    schema_subject: str | None = None
    events_per_second: float | None = None
    burst: int | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    enabled: bool = True


def _source(row: Mapping[str, Any], now: datetime) -> Source:
    keys = [row["secret"]] if row["secret"] else []
    until = row["previous_secret_until"]
    if row["previous_secret"] and until is not None and until > now:
        keys.append(row["previous_secret"])
    return Source(
        name=row["name"],
        kind=row["kind"],
        tenant=row["tenant"],
        auth=row["auth"],
        scheme=row["scheme"],
        secrets=tuple(keys),
        mapping=json.loads(row["mapping"]),
        schema_subject=row["schema_subject"],
        events_per_second=row["events_per_second"],
        burst=row["burst"],
        config=json.loads(row["config"]),
        enabled=row["enabled"],
    )


class SourceCatalog(AsyncStore):
    """Async access to tenants, keys and sources; open once per process."""

    _what = "PostgreSQL (sources)"

    # Tenants and keys --------------------------------------------------------------

    async def add_tenant(self, tenant: str) -> bool:
        """Create the tenant; False when it existed."""
        row = await self._run(
            "fetchrow",
            "INSERT INTO tenants (id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING id",
            tenant,
        )
        return row is not None

    async def create_key(self, tenant: str, label: str = "") -> str:
        """A new API key of ``tenant`` (created when missing); shown only now."""
        await self.add_tenant(tenant)
        key = new_api_key()
        await self._run(
            "execute",
            "INSERT INTO api_keys (key_hash, tenant, label) VALUES ($1, $2, $3)",
            hash_key(key),
            tenant,
            label,
        )
        return key

    async def revoke_key(self, key: str) -> bool:
        row = await self._run(
            "fetchrow",
            "UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1 AND revoked_at IS NULL "
            "RETURNING tenant",
            hash_key(key),
        )
        return row is not None

    async def key_owner(self, key_hash: str) -> tuple[str, bool] | None:
        """(tenant, revoked) of the key whose :func:`hash_key` is ``key_hash``, or None
        when no such key was ever made."""
        row = await self._run(
            "fetchrow",
            "SELECT tenant, revoked_at IS NOT NULL AS revoked FROM api_keys WHERE key_hash = $1",
            key_hash,
        )
        return None if row is None else (row["tenant"], row["revoked"])

    async def latest_schema(self, subject: str) -> tuple[int, str] | None:
        """(id, text) of the newest schema registered under ``subject``, or None."""
        row = await self._run(
            "fetchrow",
            "SELECT s.id, s.schema FROM subject_versions v JOIN schemas s ON s.id = v.schema_id "
            "WHERE v.subject = $1 ORDER BY v.version DESC LIMIT 1",
            subject,
        )
        return None if row is None else (int(row["id"]), str(row["schema"]))

    async def schema_text(self, schema_id: int) -> str | None:
        row = await self._run("fetchrow", "SELECT schema FROM schemas WHERE id = $1", schema_id)
        return None if row is None else str(row["schema"])

    # Sources -----------------------------------------------------------------------

    async def source(self, name: str) -> Source | None:
        row = await self._run("fetchrow", "SELECT * FROM sources WHERE name = $1", name)
        return None if row is None else _source(row, datetime.now(UTC))

    async def sources(self, kind: str | None = None) -> list[Source]:
        rows = await self._run(
            "fetch",
            "SELECT * FROM sources WHERE $1::text IS NULL OR kind = $1 ORDER BY name",
            kind,
        )
        now = datetime.now(UTC)
        return [_source(r, now) for r in rows]

    async def add_source(self, source: Source, *, replace: bool = False) -> None:
        """Create (or with ``replace``, overwrite) a source; its tenant is created too."""
        check_source(source)
        if source.tenant is not None:
            await self.add_tenant(source.tenant)
        conflict = (
            "ON CONFLICT (name) DO UPDATE SET kind = EXCLUDED.kind, tenant = EXCLUDED.tenant, "
            "auth = EXCLUDED.auth, scheme = EXCLUDED.scheme, secret = EXCLUDED.secret, "
            "mapping = EXCLUDED.mapping, schema_subject = EXCLUDED.schema_subject, "
            "events_per_second = EXCLUDED.events_per_second, burst = EXCLUDED.burst, "
            "config = EXCLUDED.config, enabled = EXCLUDED.enabled, updated_at = now()"
            if replace
            else ""
        )
        try:
            await self._run(
                "execute",
                "INSERT INTO sources (name, kind, tenant, auth, scheme, secret, mapping, "
                "schema_subject, events_per_second, burst, config, enabled) "
                f"VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) {conflict}",
                source.name,
                source.kind,
                source.tenant,
                source.auth,
                source.scheme,
                source.secrets[0] if source.secrets else None,
                json.dumps(dict(source.mapping)),
                source.schema_subject,
                source.events_per_second,
                source.burst,
                json.dumps(dict(source.config)),
                source.enabled,
            )
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, asyncpg.UniqueViolationError):
                raise ConfigurationError(
                    f"source {source.name!r} exists already; use --replace to overwrite it"
                ) from None
            raise

    async def rotate_secret(self, name: str, new_secret: str, grace_seconds: int) -> bool:
        """Make ``new_secret`` current; the old one keeps working for ``grace_seconds``."""
        until = datetime.now(UTC) + timedelta(seconds=grace_seconds)
        row = await self._run(
            "fetchrow",
            "UPDATE sources SET previous_secret = secret, previous_secret_until = $2, "
            "secret = $3, updated_at = now() WHERE name = $1 RETURNING name",
            name,
            until,
            new_secret,
        )
        return row is not None

    async def remove_source(self, name: str) -> bool:
        row = await self._run(
            "fetchrow", "DELETE FROM sources WHERE name = $1 RETURNING name", name
        )
        return row is not None


def check_source(source: Source) -> None:
    """Raise ConfigurationError when a source's settings cannot work together."""
    from core.envelope import name_problem
    from core.source_mapping import parse_mapping

    problem = name_problem("source", source.name)
    if problem is not None:
        raise ConfigurationError(f"source name {source.name!r}: {problem}")
    parse_mapping(source.mapping)  # raises ConfigurationError naming the bad field
    if source.kind not in SOURCE_KINDS:
        raise ConfigurationError(
            f"source kind {source.kind!r} is not one of {', '.join(SOURCE_KINDS)}"
        )
    if source.auth not in AUTH_KINDS:
        raise ConfigurationError(f"auth {source.auth!r} is not one of {', '.join(AUTH_KINDS)}")
    if source.auth == "hmac" and (source.scheme is None or not source.secrets):
        raise ConfigurationError(
            f"source {source.name!r} uses HMAC signatures but has no scheme or secret: "
            "give --scheme github|stripe|standard (a secret is made for you)"
        )
    if source.auth == "hmac" and source.tenant is None:
        raise ConfigurationError(
            f"source {source.name!r} uses HMAC signatures, so its events need a fixed "
            "tenant: give --tenant"
        )
