"""MQTT devices in PostgreSQL (table ``devices`` of migration 3).

A device is an MQTT user: its id is its user name and the middle level of its topic
(``devices/<id>/telemetry``); it belongs to one tenant. PostgreSQL keeps only the
Mosquitto password hash (``$7$``), from which the broker's password file is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from adapters.postgres import _Connection


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    tenant: str
    enabled: bool
    created_at: datetime


class DeviceStore(_Connection):
    """Devices and their password hashes, for use from one (non-async) thread."""

    _what = "PostgreSQL device store"

    def add(self, device: str, tenant: str, password_hash: str) -> bool:
        """Store a device (creating its tenant when missing); False when it exists already."""
        self._call(
            "INSERT INTO tenants (id) VALUES ($1) ON CONFLICT (id) DO NOTHING",
            tenant,
            fetch="execute",
        )
        status = self._call(
            "INSERT INTO devices (id, tenant, password_hash) VALUES ($1, $2, $3) "
            "ON CONFLICT (id) DO NOTHING",
            device,
            tenant,
            password_hash,
            fetch="execute",
        )
        return str(status).endswith(" 1")

    def remove(self, device: str) -> bool:
        status = self._call("DELETE FROM devices WHERE id = $1", device, fetch="execute")
        return str(status).endswith(" 1")

    def set_enabled(self, device: str, enabled: bool) -> bool:
        status = self._call(
            "UPDATE devices SET enabled = $2 WHERE id = $1", device, enabled, fetch="execute"
        )
        return str(status).endswith(" 1")

    def devices(self) -> list[Device]:
        rows = self._call(
            "SELECT id, tenant, enabled, created_at FROM devices ORDER BY id", fetch="fetch"
        )
        return [Device(r["id"], r["tenant"], r["enabled"], r["created_at"]) for r in rows]

    def credentials(self) -> list[tuple[str, str]]:
        """(id, password hash) of every enabled device."""
        rows = self._call(
            "SELECT id, password_hash FROM devices WHERE enabled ORDER BY id", fetch="fetch"
        )
        return [(r["id"], r["password_hash"]) for r in rows]

    def tenants(self) -> dict[str, str]:
        """{device id: tenant} of every enabled device."""
        rows = self._call("SELECT id, tenant FROM devices WHERE enabled", fetch="fetch")
        return {r["id"]: r["tenant"] for r in rows}
