"""Per-tenant statement slots: how many queries one tenant may have running at once.

A statement takes a slot before it runs and gives it back when it has answered. Each
slot is a lease: it lapses by itself ``lease_ms`` after it was taken, so a slot whose
holder died (a replica killed mid-query) or stopped waiting (a caller who went away
while ClickHouse still runs the statement) frees itself once the statement cannot be
running any more. The lease is therefore the statement time limit plus a margin.

:class:`SlotTable` is the rule in memory, with the clock passed in. The query API
keeps the same rule in Redis, shared by its replicas (``adapters.query_slots``), and
falls back to a table like this one, per replica, while Redis is down.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SlotVerdict:
    """Whether a slot was granted, and how many of the tenant's were taken before."""

    granted: bool
    running: int
    """The tenant's statements in flight before this one (lapsed leases not counted)."""
    limit: int


class SlotTable:
    """At most ``limit`` unexpired leases per tenant.

    Args:
        limit: slots one tenant may hold at once.
        lease_ms: how long a slot stays taken when nobody gives it back.
    """

    def __init__(self, limit: int, lease_ms: int) -> None:
        if limit < 1 or lease_ms < 1:
            raise ValueError(f"expected limit >= 1 and lease_ms >= 1, got {limit}, {lease_ms}")
        self._limit = limit
        self._lease_ms = lease_ms
        self._leases: dict[str, dict[str, int]] = {}
        """Per tenant: token -> when its lease lapses (ms)."""

    def take(self, tenant: str, token: str, now_ms: int) -> SlotVerdict:
        """Take a slot for ``token`` unless the tenant holds ``limit`` already."""
        leases = self._live(tenant, now_ms)
        running = len(leases)
        if running >= self._limit:
            return SlotVerdict(False, running, self._limit)
        leases[token] = now_ms + self._lease_ms
        self._leases[tenant] = leases
        return SlotVerdict(True, running, self._limit)

    def give_back(self, tenant: str, token: str) -> None:
        """Free the slot of ``token`` (nothing happens if it lapsed or was never taken)."""
        leases = self._leases.get(tenant)
        if leases is None:
            return
        leases.pop(token, None)
        if not leases:
            del self._leases[tenant]

    def running(self, tenant: str, now_ms: int) -> int:
        """The tenant's slots taken and not lapsed."""
        return len(self._live(tenant, now_ms))

    def _live(self, tenant: str, now_ms: int) -> dict[str, int]:
        leases = self._leases.get(tenant, {})
        live = {token: until for token, until in leases.items() if until > now_ms}
        if not live:
            self._leases.pop(tenant, None)
        return live
