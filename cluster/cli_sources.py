"""``rayline tenants``, ``rayline keys`` and ``rayline sources``: who may send what."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from cluster.cli_context import settings_of as _settings
from cluster.settings import Settings
from core.exceptions import ConfigurationError

T = TypeVar("T")
console = Console()

tenants_app = typer.Typer(help="Tenants: the owners of events. Each writes with its API keys.")
keys_app = typer.Typer(
    help="Tenant API keys (`Authorization: Bearer <key>`). Only a hash is stored: a key is "
    "shown once, when it is made."
)
sources_app = typer.Typer(
    help="Sources: webhooks (HMAC-signed or keyed), pollers, devices, uploads. Each has a "
    "tenant, an optional payload mapping and schema, and rate limits."
)


def _run(settings: Settings, work: Any) -> Any:
    """Run ``work(catalog)`` against the settings' PostgreSQL (migrated first)."""
    from adapters.postgres import migrate
    from adapters.sources import SourceCatalog

    migrate(settings.postgres.dsn())

    async def go() -> Any:
        catalog = SourceCatalog(settings.postgres.dsn(), max_size=1)
        try:
            return await work(catalog)
        finally:
            await catalog.close()

    return asyncio.run(go())


def _json_option(text: str | None, what: str) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"--{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigurationError(f"--{what} must be a JSON object, got {type(value).__name__}")
    return value


@tenants_app.command("add")
def tenants_add(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Argument(help="Tenant id ([A-Za-z0-9_.-], up to 64).")],
    label: Annotated[str, typer.Option(help="What the first key is for.")] = "first key",
) -> None:
    """Create a tenant and its first API key (printed once)."""
    from core.envelope import name_problem

    problem = name_problem("tenant", tenant)
    if problem is not None:
        raise ConfigurationError(f"tenant {tenant!r}: {problem}")
    key = _run(_settings(ctx), lambda c: c.create_key(tenant, label))
    console.print(f"tenant [bold]{tenant}[/bold] ready; its API key (shown only now):")
    print(key)


@keys_app.command("add")
def keys_add(
    ctx: typer.Context,
    tenant: Annotated[
        str, typer.Argument(help="Tenant id, or '*' for a platform key that writes any tenant.")
    ],
    label: Annotated[str, typer.Option(help="What the key is for.")] = "",
) -> None:
    """Make another API key of a tenant (printed once)."""
    key = _run(_settings(ctx), lambda c: c.create_key(tenant, label))
    print(key)


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, key: Annotated[str, typer.Argument(help="The key.")]) -> None:
    """Revoke a key: requests with it get 403 within seconds."""
    if not _run(_settings(ctx), lambda c: c.revoke_key(key)):
        console.print("no such key, or revoked already")
        raise typer.Exit(1)
    console.print("revoked")


@sources_app.command("add")
def sources_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Source name; the webhook URL ends in it.")],
    tenant: Annotated[str | None, typer.Option(help="Tenant whose events it writes.")] = None,
    kind: Annotated[str, typer.Option(help="webhook, api, poll, mqtt, upload or cdc.")] = (
        "webhook"
    ),
    scheme: Annotated[
        str | None,
        typer.Option(
            help="Signature scheme (github, stripe, standard): the source is then "
            "authenticated by HMAC and a secret is made. Without it: tenant API keys."
        ),
    ] = None,
    mapping: Annotated[
        str | None,
        typer.Option(
            help='Payload to envelope, JSON: {"event_id": "$.id", "type": "const:push", '
            '"ts": "now"}. None: payloads are envelopes already.'
        ),
    ] = None,
    config: Annotated[str | None, typer.Option(help="Kind-specific settings, JSON.")] = None,
    schema: Annotated[
        str | None, typer.Option(help="Registry subject that types CSV bodies.")
    ] = None,
    rate: Annotated[float | None, typer.Option(help="Events/s (default: ingest.*).")] = None,
    burst: Annotated[int | None, typer.Option(help="Bucket size in events.")] = None,
    replace: Annotated[bool, typer.Option(help="Overwrite an existing source.")] = False,
) -> None:
    """Add a source. With --scheme, prints the signing secret once."""
    from adapters.sources import Source
    from core import signatures

    secret = signatures.new_secret(scheme) if scheme is not None else None
    source = Source(
        name=name,
        kind=kind,
        tenant=tenant,
        auth="hmac" if scheme is not None else "api_key",
        scheme=scheme,
        secrets=(secret,) if secret else (),
        mapping=_json_option(mapping, "mapping"),
        schema_subject=schema,
        events_per_second=rate,
        burst=burst,
        config=_json_option(config, "config"),
    )
    if scheme is not None and scheme not in signatures.SCHEMES:
        raise ConfigurationError(
            f"--scheme {scheme!r} is not one of {', '.join(signatures.SCHEMES)}"
        )
    settings = _settings(ctx)
    if kind == "poll":
        _check_poll_url(settings, name, source.config)
    _run(settings, lambda c: c.add_source(source, replace=replace))
    url = f"http://{settings.serve.host}:{settings.serve.port}/v1/sources/{name}/webhook"
    console.print(
        f"source [bold]{name}[/bold] ({kind}) added"
        + (f": {url}" if kind in ("webhook", "api") else "")
    )
    if secret is not None:
        console.print(f"signing secret ({scheme}), shown only now:")
        print(secret)


def _check_poll_url(settings: Settings, name: str, config: Mapping[str, Any]) -> None:
    """Refuse a poll URL the pollers would refuse (a denied address), when it is added."""
    import httpx

    from adapters.http_egress import allowed_address
    from core.egress import EgressRefused
    from core.polling import parse_poll_config

    url = parse_poll_config(name, config).url
    try:
        allowed_address(url, settings.polling.policy())
    except EgressRefused as exc:
        raise ConfigurationError(f"poll source {name!r}: url {url!r} is refused: {exc}") from None
    except httpx.ConnectError as exc:  # the poller retries; the name may resolve later
        console.print(f"[yellow]warning[/yellow]: {exc}; the poller will keep trying")


@sources_app.command("list")
def sources_list(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """List the sources (secrets are not shown)."""
    rows = _run(_settings(ctx), lambda c: c.sources())
    data = [
        {
            "name": s.name,
            "kind": s.kind,
            "tenant": s.tenant,
            "auth": s.auth if s.auth != "hmac" else f"hmac/{s.scheme}",
            "mapping": dict(s.mapping),
            "schema": s.schema_subject,
            "rate": s.events_per_second,
            "burst": s.burst,
            "config": dict(s.config),
            "enabled": s.enabled,
        }
        for s in rows
    ]
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table("name", "kind", "tenant", "auth", "schema", "rate", "enabled")
    for d in data:
        table.add_row(
            d["name"],
            d["kind"],
            d["tenant"] or "",
            d["auth"],
            d["schema"] or "",
            "" if d["rate"] is None else f"{d['rate']:g}/s",
            str(d["enabled"]),
        )
    console.print(table)


@sources_app.command("rotate-secret")
def sources_rotate(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="An HMAC source.")],
    grace_seconds: Annotated[
        int, typer.Option(help="How long the old secret keeps working.")
    ] = 86_400,
) -> None:
    """Make a new signing secret (printed once); the old one works for the grace period."""
    from core import signatures

    settings = _settings(ctx)
    source = _run(settings, lambda c: c.source(name))
    if source is None or source.auth != "hmac" or source.scheme is None:
        raise ConfigurationError(f"{name!r} is not an HMAC-signed source (see `sources list`)")
    secret = signatures.new_secret(source.scheme)
    _run(settings, lambda c: c.rotate_secret(name, secret, grace_seconds))
    console.print(
        f"new secret of {name} ({source.scheme}); the old one works {grace_seconds} s more:"
    )
    print(secret)


@sources_app.command("remove")
def sources_remove(ctx: typer.Context, name: Annotated[str, typer.Argument()]) -> None:
    """Remove a source: its webhook answers 404 within seconds."""
    if not _run(_settings(ctx), lambda c: c.remove_source(name)):
        console.print(f"no source named {name!r}")
        raise typer.Exit(1)
    console.print(f"removed {name}")
