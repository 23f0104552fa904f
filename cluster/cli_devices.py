"""``rayline devices``: MQTT devices, their tenants and credentials."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cluster.cli_context import settings_of as _settings
from cluster.settings import Settings
from core.exceptions import InvalidInputError

console = Console()

devices_app = typer.Typer(
    help="MQTT devices: each has its own password and may publish only on "
    "devices/<id>/telemetry; the MQTT bridge forwards its messages to Kafka for its tenant."
)


def _store(settings: Settings) -> Any:
    from adapters.devices import DeviceStore
    from adapters.postgres import migrate

    migrate(settings.postgres.dsn())
    return DeviceStore(settings.postgres.dsn())


def _reload_broker(settings: Settings) -> str:
    """Rewrite the local broker's password file and SIGHUP it; say what happened."""
    if not settings.mqtt.managed:
        return "the MQTT broker is not managed by rayline: update its password file yourself"
    from cluster import mosquitto
    from cluster.stack import LocalStack

    stack = LocalStack(settings)
    (spec,) = [s for s in stack.specs() if s.name == "mosquitto"]
    pid = stack.supervisor.pid(spec)
    count = mosquitto.sync_devices(settings, pid)
    running = "reloaded the running broker" if pid else "the broker reads it when it starts"
    return f"password file holds {count} enabled device(s); {running}"


def _check_names(settings: Settings, device: str, tenant: str) -> None:
    from core.device_telemetry import device_problem
    from core.envelope import name_problem

    problem = device_problem(device)
    if problem is not None:
        raise InvalidInputError(problem)
    if device == settings.mqtt.bridge_username:
        raise InvalidInputError(
            f"device id {device!r} is the bridge's MQTT user (mqtt.bridge_username); "
            "choose another id"
        )
    problem = name_problem("tenant", tenant)
    if problem is not None:
        raise InvalidInputError(f"tenant {problem}")


@devices_app.command("add")
def devices_add(
    ctx: typer.Context,
    device: Annotated[str, typer.Argument(help="Device id: its MQTT user name and topic level.")],
    tenant: Annotated[str, typer.Option(help="Tenant the device's events belong to.")],
) -> None:
    """Add DEVICE for TENANT (created when missing) with a new random password, shown
    once. PostgreSQL keeps only its hash; the local broker is reloaded at once."""
    from adapters.mqtt import new_device_password, password_hash

    settings = _settings(ctx)
    _check_names(settings, device, tenant)
    password = new_device_password()
    store = _store(settings)
    try:
        added = store.add(device, tenant, password_hash(password))
    finally:
        store.close()
    if not added:
        raise InvalidInputError(
            f"device {device!r} exists already; `rayline devices remove {device}` first "
            "to give it a new password"
        )
    note = _reload_broker(settings)
    m = settings.mqtt
    console.print(f"added device {device} for tenant {tenant}; {note}")
    console.print(
        f"broker {m.host}:{m.port}, user {device}, topic devices/{device}/telemetry (QoS 1)"
    )
    console.print("password (shown only now, store it on the device):")
    print(password)


@devices_app.command("list")
def devices_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Every device, its tenant and whether it may connect."""
    store = _store(_settings(ctx))
    try:
        devices = store.devices()
    finally:
        store.close()
    if as_json:
        rows = [
            {"id": d.id, "tenant": d.tenant, "enabled": d.enabled, "created_at": str(d.created_at)}
            for d in devices
        ]
        print(json.dumps(rows))
        return
    table = Table("device", "tenant", "enabled", "created")
    for d in devices:
        table.add_row(
            d.id, d.tenant, "yes" if d.enabled else "no", f"{d.created_at:%Y-%m-%d %H:%M}"
        )
    console.print(table)


@devices_app.command("remove")
def devices_remove(
    ctx: typer.Context, device: Annotated[str, typer.Argument(help="Device id.")]
) -> None:
    """Remove DEVICE: it can no longer connect, and the bridge dead-letters any of its
    messages still queued (reason: not registered)."""
    settings = _settings(ctx)
    store = _store(settings)
    try:
        found = store.remove(device)
    finally:
        store.close()
    if not found:
        raise InvalidInputError(f"no device {device!r}: `rayline devices list` shows the ids")
    console.print(f"removed device {device}; {_reload_broker(settings)}")
