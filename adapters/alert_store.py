"""PostgreSQL storage of alerting: rules, silences, incidents, notifications, engine state.

Two access classes over the tables of migration 4 (``adapters.postgres``):

* :class:`AlertStore` (one connection, one thread) for the alerting engine. Its
  :meth:`AlertStore.commit` writes one engine step in one transaction: the incidents it
  touched, the notifications it queued (the outbox), the acknowledge requests it
  handled and the engine's snapshot with the feed cursor. So after a crash the engine
  resumes from a state whose notifications are all queued, none twice.
* :class:`AlertCatalog` (async pool) for the alerting API.

Driver errors become :class:`adapters.exceptions.StoreUnavailable`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import asyncpg

from adapters.notifiers import DeliveryAttempt
from adapters.postgres import AsyncStore, _Connection
from core.incidents import Incident, Notification, Silence

T = TypeVar("T")
_MS = "(extract(epoch FROM {0}) * 1000)::bigint"
_INCIDENT_COLUMNS = (
    "id, tenant, rule_id, group_key, state, silenced, "
    + ", ".join(
        f"{_MS.format(c)} AS {c.replace('_at', '_ms')}"
        for c in ("opened_at", "acked_at", "resolved_at", "updated_at")
    )
    + ", acked_by, last_value, summary, occurrences, details"
)


@dataclass
class EngineState:
    """What the engine needs to resume: snapshots of its parts and where its feeds stand."""

    evaluator: dict[str, Any]
    book: dict[str, Any]
    cep: dict[str, Any] = field(default_factory=dict)
    cursor_ms: int = 0
    kafka_offsets: dict[str, int] = field(default_factory=dict)


@dataclass
class StepWrite:
    """Everything one engine step changes, written in one transaction."""

    state: EngineState
    incidents: list[Incident] = field(default_factory=list)
    outbox: list[tuple[str, Notification]] = field(default_factory=list)
    acks_done: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class OutboxItem:
    id: int
    channel: str
    notification: Notification


@dataclass(frozen=True, slots=True)
class AckRequest:
    id: int
    incident_id: str
    tenant: str
    requested_by: str
    requested_ms: int


def notification_json(notification: Notification) -> str:
    return json.dumps({"kind": notification.kind, "incident": asdict(notification.incident)})


def notification_from(raw: str | dict[str, Any]) -> Notification:
    data = json.loads(raw) if isinstance(raw, str) else raw
    return Notification(kind=data["kind"], incident=Incident(**data["incident"]))


def _incident_args(i: Incident) -> tuple[Any, ...]:
    value = i.details.get("value")
    return (
        i.id,
        i.tenant,
        i.rule_id,
        i.group_key,
        i.state,
        i.silenced,
        i.opened_ms,
        i.acknowledged_ms,
        i.acknowledged_by,
        i.resolved_ms,
        float(value) if isinstance(value, int | float) else None,
        i.last_summary,
        i.occurrences,
        json.dumps(i.details),
    )


# An API acknowledge sets the row's state at once; a later engine write of the same
# incident from before it handled the request must not turn it back to firing.
_UPSERT_INCIDENT = """
INSERT INTO incidents (id, tenant, rule_id, group_key, state, silenced, opened_at, acked_at,
    acked_by, resolved_at, last_value, summary, occurrences, details, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, to_timestamp($7 / 1000.0), to_timestamp($8 / 1000.0), $9,
    to_timestamp($10 / 1000.0), $11, $12, $13, $14::jsonb, now())
ON CONFLICT (id) DO UPDATE SET
    state = CASE WHEN incidents.state = 'acknowledged' AND EXCLUDED.state = 'firing'
        THEN 'acknowledged' ELSE EXCLUDED.state END,
    silenced = EXCLUDED.silenced,
    acked_at = COALESCE(EXCLUDED.acked_at, incidents.acked_at),
    acked_by = COALESCE(EXCLUDED.acked_by, incidents.acked_by),
    resolved_at = EXCLUDED.resolved_at,
    last_value = EXCLUDED.last_value,
    summary = EXCLUDED.summary,
    occurrences = EXCLUDED.occurrences,
    details = EXCLUDED.details,
    updated_at = now()
"""


class AlertStore(_Connection):
    """The engine's side, for use from one (non-async) thread."""

    _what = "PostgreSQL alert store"

    def _transaction(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        async def run() -> T:
            conn = await self._connection()
            async with conn.transaction():
                return await work(conn)

        return self._run_async(run())

    def rules(self) -> list[dict[str, Any]]:
        """The specs of every enabled rule, of every tenant."""
        rows = self._call(
            "SELECT tenant, spec FROM alert_rules WHERE enabled ORDER BY tenant, id",
            fetch="fetch",
        )
        return [{**json.loads(r["spec"]), "tenant": r["tenant"]} for r in rows]

    def silences(self, now_ms: int) -> list[Silence]:
        """The silences that have not ended by ``now_ms``."""
        rows = self._call(
            f"SELECT tenant, rule_id, group_key, comment, {_MS.format('starts_at')} AS s, "
            f"{_MS.format('ends_at')} AS e FROM alert_silences "
            "WHERE ends_at > to_timestamp($1 / 1000.0)",
            now_ms,
            fetch="fetch",
        )
        return [
            Silence(r["tenant"], r["s"], r["e"], r["rule_id"], r["group_key"], r["comment"])
            for r in rows
        ]

    def load_state(self, name: str) -> EngineState | None:
        row = self._call(
            "SELECT evaluator, book, cep, cursor_ms, kafka_offsets FROM alerting_state "
            "WHERE name = $1",
            name,
        )
        if row is None:
            return None
        return EngineState(
            evaluator=json.loads(row["evaluator"]),
            book=json.loads(row["book"]),
            cep=json.loads(row["cep"]),
            cursor_ms=int(row["cursor_ms"]),
            kafka_offsets={k: int(v) for k, v in json.loads(row["kafka_offsets"]).items()},
        )

    def commit(self, name: str, write: StepWrite) -> None:
        """Write one step (see the module docstring) in one transaction."""

        async def work(conn: asyncpg.Connection) -> None:
            if write.incidents:
                await conn.executemany(
                    _UPSERT_INCIDENT, [_incident_args(i) for i in write.incidents]
                )
            if write.outbox:
                await conn.executemany(
                    "INSERT INTO alert_outbox (incident_id, channel, action, notification) "
                    "VALUES ($1, $2, $3, $4::jsonb)",
                    [
                        (n.incident.id, channel, n.kind, notification_json(n))
                        for channel, n in write.outbox
                    ],
                )
            if write.acks_done:
                await conn.executemany(
                    "UPDATE alert_ack_requests SET done_at = now(), outcome = $2 WHERE id = $1",
                    write.acks_done,
                )
            s = write.state
            await conn.execute(
                "INSERT INTO alerting_state AS a (name, evaluator, book, cep, cursor_ms, "
                "kafka_offsets) VALUES ($1, $2::jsonb, $3::jsonb, $4::jsonb, $5, $6::jsonb) "
                "ON CONFLICT (name) DO UPDATE SET evaluator = EXCLUDED.evaluator, "
                "book = EXCLUDED.book, cep = EXCLUDED.cep, cursor_ms = EXCLUDED.cursor_ms, "
                "kafka_offsets = EXCLUDED.kafka_offsets, updated_at = now()",
                name,
                json.dumps(s.evaluator),
                json.dumps(s.book),
                json.dumps(s.cep),
                s.cursor_ms,
                json.dumps(s.kafka_offsets),
            )

        self._transaction(work)

    def pending_outbox(self, limit: int = 100) -> list[OutboxItem]:
        """Queued notifications not yet delivered nor given up, oldest first."""
        rows = self._call(
            "SELECT id, channel, notification FROM alert_outbox WHERE done_at IS NULL "
            "ORDER BY id LIMIT $1",
            limit,
            fetch="fetch",
        )
        return [
            OutboxItem(int(r["id"]), r["channel"], notification_from(r["notification"]))
            for r in rows
        ]

    def finish_outbox(self, item_id: int, delivered: bool) -> None:
        self._call(
            "UPDATE alert_outbox SET done_at = now(), delivered = $2 WHERE id = $1",
            item_id,
            delivered,
            fetch="execute",
        )

    def pending_acks(self, limit: int = 100) -> list[AckRequest]:
        rows = self._call(
            f"SELECT id, incident_id, tenant, requested_by, {_MS.format('requested_at')} AS at "
            "FROM alert_ack_requests WHERE done_at IS NULL ORDER BY id LIMIT $1",
            limit,
            fetch="fetch",
        )
        return [
            AckRequest(int(r["id"]), r["incident_id"], r["tenant"], r["requested_by"], r["at"])
            for r in rows
        ]

    def record(self, attempt: DeliveryAttempt) -> None:
        """Append one try to the notification log."""
        self._call(
            "INSERT INTO notification_log (incident_id, tenant, channel, action, attempt, "
            "status_code, error, payload, sent_at, delivered) VALUES ($1, $2, $3, $4, $5, $6, "
            "$7, $8::jsonb, to_timestamp($9 / 1000.0), $10)",
            attempt.incident_id,
            attempt.tenant,
            attempt.channel,
            attempt.action,
            attempt.attempt,
            attempt.status_code,
            attempt.error,
            json.dumps(attempt.payload),
            attempt.sent_ms,
            attempt.delivered,
            fetch="execute",
        )


def _rule_row(r: Any) -> dict[str, Any]:
    return {
        "id": r["id"],
        "tenant": r["tenant"],
        "enabled": r["enabled"],
        "spec": json.loads(r["spec"]),
        "created_ms": r["created_ms"],
        "updated_ms": r["updated_ms"],
    }


def _incident_row(r: Any) -> dict[str, Any]:
    return {**dict(r), "details": json.loads(r["details"])}


_RULE_COLUMNS = (
    f"tenant, id, spec, enabled, {_MS.format('created_at')} AS created_ms, "
    f"{_MS.format('updated_at')} AS updated_ms"
)
_SILENCE_COLUMNS = (
    f"id, tenant, rule_id, group_key, comment, created_by, {_MS.format('starts_at')} AS "
    f"starts_ms, {_MS.format('ends_at')} AS ends_ms"
)


class AlertCatalog(AsyncStore):
    """The API's side: rules, silences, incidents and their log, per tenant.

    ``tenant=None`` means every tenant (the platform key without ``?tenant=``).
    """

    _what = "PostgreSQL (alerting)"

    async def rules(self, tenant: str | None) -> list[dict[str, Any]]:
        rows = await self._run(
            "fetch",
            f"SELECT {_RULE_COLUMNS} FROM alert_rules WHERE $1::text IS NULL OR tenant = $1 "
            "ORDER BY tenant, id",
            tenant,
        )
        return [_rule_row(r) for r in rows]

    async def rule(self, tenant: str, rule_id: str) -> dict[str, Any] | None:
        row = await self._run(
            "fetchrow",
            f"SELECT {_RULE_COLUMNS} FROM alert_rules WHERE tenant = $1 AND id = $2",
            tenant,
            rule_id,
        )
        return None if row is None else _rule_row(row)

    async def put_rule(
        self, tenant: str, rule_id: str, spec: dict[str, Any], enabled: bool, *, create: bool
    ) -> dict[str, Any] | None:
        """Create (``create``) or replace a rule; None when it exists (create) or is
        missing (replace)."""
        if create:
            sql = (
                "INSERT INTO alert_rules (tenant, id, spec, enabled) VALUES ($1, $2, $3::jsonb, "
                f"$4) ON CONFLICT DO NOTHING RETURNING {_RULE_COLUMNS}"
            )
        else:
            sql = (
                "UPDATE alert_rules SET spec = $3::jsonb, enabled = $4, updated_at = now() "
                f"WHERE tenant = $1 AND id = $2 RETURNING {_RULE_COLUMNS}"
            )
        row = await self._run("fetchrow", sql, tenant, rule_id, json.dumps(spec), enabled)
        return None if row is None else _rule_row(row)

    async def delete_rule(self, tenant: str, rule_id: str) -> bool:
        status = await self._run(
            "execute", "DELETE FROM alert_rules WHERE tenant = $1 AND id = $2", tenant, rule_id
        )
        return str(status).endswith(" 1")

    async def incidents(
        self, tenant: str | None, state: str | None, limit: int
    ) -> list[dict[str, Any]]:
        rows = await self._run(
            "fetch",
            f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE ($1::text IS NULL OR tenant = $1) "
            "AND ($2::text IS NULL OR state = $2) ORDER BY opened_at DESC LIMIT $3",
            tenant,
            state,
            limit,
        )
        return [_incident_row(r) for r in rows]

    async def incident(self, tenant: str | None, incident_id: str) -> dict[str, Any] | None:
        row = await self._run(
            "fetchrow",
            f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE id = $1 "
            "AND ($2::text IS NULL OR tenant = $2)",
            incident_id,
            tenant,
        )
        return None if row is None else _incident_row(row)

    async def notification_log(self, incident_id: str) -> list[dict[str, Any]]:
        rows = await self._run(
            "fetch",
            "SELECT channel, action, attempt, status_code, error, payload, delivered, "
            f"{_MS.format('sent_at')} AS sent_ms FROM notification_log WHERE incident_id = $1 "
            "ORDER BY sent_at, id",
            incident_id,
        )
        return [{**dict(r), "payload": json.loads(r["payload"])} for r in rows]

    async def request_acknowledge(self, incident_id: str, tenant: str, by: str) -> bool:
        """Mark a firing incident acknowledged and queue the request for the engine
        (which notifies the channels); False when it is not firing."""
        row = await self._run(
            "fetchrow",
            "WITH a AS (UPDATE incidents SET state = 'acknowledged', acked_at = now(), "
            "acked_by = $3, updated_at = now() WHERE id = $1 AND tenant = $2 "
            "AND state = 'firing' RETURNING id, tenant) "
            "INSERT INTO alert_ack_requests (incident_id, tenant, requested_by) "
            "SELECT id, tenant, $3 FROM a RETURNING id",
            incident_id,
            tenant,
            by,
        )
        return row is not None

    async def silences(self, tenant: str | None) -> list[dict[str, Any]]:
        rows = await self._run(
            "fetch",
            f"SELECT {_SILENCE_COLUMNS} FROM alert_silences "
            "WHERE ($1::text IS NULL OR tenant = $1) AND ends_at > now() ORDER BY starts_at",
            tenant,
        )
        return [dict(r) for r in rows]

    async def add_silence(self, silence_id: str, silence: Silence, by: str) -> dict[str, Any]:
        row = await self._run(
            "fetchrow",
            "INSERT INTO alert_silences (id, tenant, rule_id, group_key, starts_at, ends_at, "
            "comment, created_by) VALUES ($1, $2, $3, $4, to_timestamp($5 / 1000.0), "
            f"to_timestamp($6 / 1000.0), $7, $8) RETURNING {_SILENCE_COLUMNS}",
            silence_id,
            silence.tenant,
            silence.rule_id,
            silence.group_key,
            silence.starts_ms,
            silence.ends_ms,
            silence.comment,
            by,
        )
        return dict(row)

    async def delete_silence(self, tenant: str | None, silence_id: str) -> bool:
        status = await self._run(
            "execute",
            "DELETE FROM alert_silences WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)",
            silence_id,
            tenant,
        )
        return str(status).endswith(" 1")
