"""The ingest edge: what ``POST /v1/events`` and the webhook endpoint do with a request.

Independent of Ray Serve (it takes a Starlette request and gives an :class:`Answer`),
so the same handler runs in the Serve app and, for the benchmark's reference, in a
bare Starlette app under uvicorn.

One request, in order (the first failing step answers, and nothing is written):

1. who: a tenant API key (401 missing or unknown, 403 revoked or another tenant's), or
   for an HMAC source its signature over the raw body (401, with the reason: missing,
   malformed, mismatch, stale);
2. backpressure: consumer lag of the raw topic over the limit → 503 + ``Retry-After``;
3. the body: over the size limit → 413; unknown content type → 415; a body that does
   not parse as a whole → 400;
4. rate limits: the tenant's and the source's token buckets (Redis, shared by every
   replica) → 429 + ``Retry-After``;
5. a webhook delivery id seen before → 200 ``{"duplicate": true}`` and nothing applied
   (ids are made of signed content only, see :mod:`core.signatures`: a replay cannot
   rename itself);
6. each record: mapped to an envelope, validated, checked against the registry schema
   of its ``<source>.<type>`` subject. Records that fail go to ``events.dlq``; the
   others go to ``events.raw`` (Avro in the Confluent wire format when a schema
   applies, JSON otherwise);
7. the answer, only after Kafka acknowledged every record of both topics: 202 with
   the counts and each rejected record's index, field and reason (422 when every record
   was rejected); 503 + ``Retry-After`` when the producer's queue is full or Kafka
   does not acknowledge (the sender retries; nothing was acknowledged).

A 4xx for the whole request means nothing of it was taken: the sender still holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import Request

from adapters.exceptions import Backpressure, StoreUnavailable
from adapters.kafka import Headers, consumer_lag
from adapters.publisher import EventPublisher, Outgoing, new_traceparent, raw_headers
from adapters.rate_limits import Bucket, RateLimiter
from adapters.redis import DeliveryLog
from adapters.source_stats import AsyncSourceStats
from adapters.sources import Source, SourceCatalog
from core import avro, formats, signatures
from core.envelope import (
    FieldError,
    name_problem,
    partition_key,
    validate_events,
)
from core.exceptions import ConfigurationError
from core.source_mapping import apply_mapping, parse_mapping
from serve_apps.auth import ALL_TENANTS, ApiKeys, AuthFailed
from serve_apps.cache import TtlCache
from serve_apps.http import Answer, BodyTooLarge, read_body
from serve_apps.schemas import AsyncSchemas

log = logging.getLogger(__name__)
_CACHE_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    bootstrap: str
    topic: str
    dlq_topic: str
    consumer_group: str
    dsn: str
    redis_url: str
    linger_ms: int = 5
    queue_max_messages: int = 200_000
    max_body_bytes: int = 8 * 1024 * 1024
    max_events_per_request: int = 10_000
    default_source: str = "api"
    signature_tolerance_s: int = 300
    delivery_ttl_s: int = 259_200
    tenant_rate: float = 200_000
    tenant_burst: int = 400_000
    source_rate: float = 100_000
    source_burst: int = 200_000
    max_consumer_lag: int = 5_000_000
    lag_check_s: float = 2.0
    max_future_ms: int = 300_000


class _Reject(Exception):
    """Ends a request early with an answer."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.body.get("error"))
        self.answer = answer


class LagWatch:
    """The raw topic's consumer lag, re-read in the background every few seconds."""

    def __init__(self, config: EdgeConfig) -> None:
        self._config = config
        self.lag = 0
        self.errors = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None and self._config.max_consumer_lag > 0:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        cfg = self._config
        while True:
            try:
                self.lag = await asyncio.to_thread(
                    consumer_lag, cfg.bootstrap, cfg.topic, cfg.consumer_group
                )
            except StoreUnavailable:
                self.errors += 1  # the producer reports a dead broker on its own
            await asyncio.sleep(cfg.lag_check_s)

    def over(self) -> bool:
        return 0 < self._config.max_consumer_lag < self.lag


def _traceparent(incoming: str | None) -> bytes:
    """Keep the caller's W3C trace context, or start a new trace."""
    if incoming and len(incoming) == 55 and incoming.count("-") == 3:
        return incoming.encode()
    return new_traceparent()


@dataclass
class _Batch:
    """The records of one request on their way to Kafka, and what the answer lists."""

    out: Outgoing = field(default_factory=Outgoing)
    errors: list[dict[str, Any]] = field(default_factory=list)


class IngestEdge:
    """Handles ingest requests; one per replica (or per bare app)."""

    def __init__(self, config: EdgeConfig, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._clock = clock
        self._publisher = EventPublisher.connect(
            config.bootstrap,
            config.topic,
            config.dlq_topic,
            linger_ms=config.linger_ms,
            queue_max_messages=config.queue_max_messages,
        )
        self._catalog = SourceCatalog(config.dsn)
        self._keys = ApiKeys(config.dsn, self._catalog)
        self._limits = RateLimiter(config.redis_url)
        self.redis_error: str | None = None
        """Set while Redis is down (rate limits and replay ids are then not enforced)."""
        self._deliveries = DeliveryLog(config.redis_url, config.delivery_ttl_s)
        self._stats = AsyncSourceStats(config.redis_url)
        self._lag = LagWatch(config)
        self._sources = TtlCache(self._catalog.source, _CACHE_SECONDS)
        self._schemas = AsyncSchemas(self._catalog)

    def health(self) -> dict[str, Any]:
        """What ``GET /healthz`` shows: the producer's queue, and Redis while it is down."""
        return {
            "status": "ok",
            "producer_queue": self.queued(),
            "redis": self.redis_error or "ok",
        }

    def queued(self) -> int:
        return self._publisher.queued()

    def close(self) -> None:
        self._publisher.close(5)

    # Endpoints -------------------------------------------------------------------

    async def events(self, request: Request) -> Answer:
        """``POST /v1/events``: envelopes (JSON array, NDJSON, CSV, Avro) of one tenant."""
        cfg = self._config
        try:
            tenant = await self._tenant(request, None)
            self._backpressure()
            fmt, body = await self._body(request)
            decoded = await self._decode(fmt, body)
            records = self._own(decoded, tenant)
            await self._limit(tenant, None, len(decoded.records) + len(decoded.errors))
            batch = await self._build(decoded, records, cfg.default_source, request)
            return await self._send(batch, cfg.default_source)
        except _Reject as stop:
            return stop.answer

    async def webhook(self, name: str, request: Request) -> Answer:
        """``POST /v1/sources/{name}/webhook``: a third party's payload, mapped."""
        try:
            source = await self._source(name)
            signed = source.auth == "hmac"
            # An HMAC source has a fixed tenant (checked when it is added).
            tenant = (source.tenant or "") if signed else await self._tenant(request, source)
            self._backpressure()
            fmt, body = await self._body(request)
            delivery = self._verify(source, request, body).delivery_id if signed else None
            decoded = await self._decode(fmt, body, source)
            mapped = self._map(source, decoded, request, source.tenant or tenant)
            await self._limit(tenant, source, len(decoded.records) + len(decoded.errors))
            if delivery is not None and not await self._claim(source.name, delivery):
                return Answer(200, {"accepted": 0, "duplicate": True, "delivery": delivery})
            try:
                batch = await self._build(decoded, mapped, source.name, request)
                answer = await self._send(batch, source.name)
            except BaseException:
                if delivery is not None:
                    await self._deliveries.release(source.name, delivery)
                raise
            if delivery is not None and answer.status >= 500:
                # Kafka did not take it: the sender's retry must be applied.
                await self._deliveries.release(source.name, delivery)
            return answer
        except _Reject as stop:
            return stop.answer

    # Steps -----------------------------------------------------------------------

    async def _tenant(self, request: Request, source: Source | None) -> str:
        try:
            tenant = await self._keys.tenant_for(request)
        except AuthFailed as exc:
            raise _Reject(Answer.error(exc.status, str(exc))) from None
        except StoreUnavailable as exc:
            raise _Reject(Answer.error(503, str(exc), retry_after=5)) from None
        if (
            source is not None
            and source.tenant is not None
            and tenant
            not in (
                source.tenant,
                ALL_TENANTS,
            )
        ):
            raise _Reject(
                Answer.error(
                    403,
                    f"this key belongs to tenant {tenant!r}; source {source.name!r} takes "
                    f"events of tenant {source.tenant!r} only",
                )
            )
        return tenant

    async def _source(self, name: str) -> Source:
        if name_problem("source", name) is not None:  # e.g. a NUL, which PostgreSQL refuses
            raise _Reject(Answer.error(404, f"no webhook source named {name[:80]!r}"))
        try:
            source = await self._sources.get(name)
        except StoreUnavailable as exc:
            raise _Reject(Answer.error(503, str(exc), retry_after=5)) from None
        if source is None or not source.enabled or source.kind not in ("webhook", "api"):
            raise _Reject(
                Answer.error(
                    404,
                    f"no webhook source named {name!r}: add it with "
                    f"`rayline sources add {name[:64]} --kind webhook ...`",
                )
            )
        return source

    def _verify(self, source: Source, request: Request, body: bytes) -> signatures.Verified:
        try:
            return signatures.verify(
                source.scheme or "",
                source.secrets,
                request.headers,
                body,
                now_s=self._clock(),
                tolerance_s=self._config.signature_tolerance_s,
            )
        except signatures.SignatureRejected as exc:
            raise _Reject(Answer.error(401, str(exc), reason=exc.reason)) from None

    def _backpressure(self) -> None:
        self._lag.start()
        self._stats.start()
        if self._lag.over():
            raise _Reject(
                Answer.error(
                    503,
                    f"the pipeline is {self._lag.lag} events behind (limit "
                    f"{self._config.max_consumer_lag}); retry later",
                    retry_after=max(1.0, self._config.lag_check_s),
                )
            )

    async def _body(self, request: Request) -> tuple[str, bytes]:
        content_type = request.headers.get("content-type", "application/json")
        try:
            fmt = formats.format_of(content_type)
        except formats.UnsupportedFormat as exc:
            raise _Reject(Answer.error(415, str(exc))) from None
        if fmt in ("avro-container", "parquet"):
            raise _Reject(
                Answer.error(415, f"{fmt} files go to POST /v1/uploads, not to this endpoint")
            )
        try:
            return fmt, await read_body(request, self._config.max_body_bytes)
        except BodyTooLarge as exc:
            raise _Reject(Answer.error(413, str(exc))) from None

    async def _decode(self, fmt: str, body: bytes, source: Source | None = None) -> formats.Decoded:
        csv_schema = None
        if fmt == "csv" and source is not None and source.schema_subject:
            csv_schema = await self._schemas.latest_json(source.schema_subject)
        by_id = await self._schemas.ids_in(fmt, body)
        try:
            decoded = formats.decode_body(
                fmt,
                body,
                csv_schema=csv_schema,
                avro_schema_for_id=by_id.get,
                max_records=self._config.max_events_per_request,
            )
        except formats.TooManyRecords as exc:
            raise _Reject(Answer.error(413, str(exc))) from None
        except formats.BodyMalformed as exc:
            raise _Reject(Answer.error(400, str(exc))) from None
        return decoded

    def _own(self, decoded: formats.Decoded, tenant: str) -> list[tuple[int, Any]]:
        """The records, each with the key's tenant; another tenant's record ends the
        request with 403 (a key writes its own tenant's events only)."""
        if tenant == ALL_TENANTS:
            return decoded.records
        for index, record in decoded.records:
            if isinstance(record, dict):
                named = record.get("tenant", tenant)
                if named != tenant:
                    raise _Reject(
                        Answer.error(
                            403,
                            f"event {index} is of tenant {named!r} but the key belongs to "
                            f"tenant {tenant!r}; nothing was written",
                        )
                    )
                if "tenant" not in record:
                    record["tenant"] = tenant
        return decoded.records

    def _map(
        self, source: Source, decoded: formats.Decoded, request: Request, tenant: str
    ) -> list[tuple[int, Any]]:
        """Third-party payloads as raw envelopes; a mapping problem rejects the record."""
        try:
            mapping = parse_mapping(source.mapping)
        except ConfigurationError as exc:  # a row written around `rayline sources add`
            raise _Reject(
                Answer.error(
                    500,
                    f"source {source.name!r} has an unusable mapping: {exc}; fix it with "
                    f"`rayline sources add {source.name} --replace --mapping ...`",
                )
            ) from None
        received = int(self._clock() * 1000)
        out: list[tuple[int, Any]] = []
        for index, payload in decoded.records:
            raw, problems = apply_mapping(
                mapping, payload, headers=request.headers, received_at_ms=received
            )
            if problems:
                decoded.errors.append(
                    formats.RecordError(index, "; ".join(problems), _raw(payload))
                )
                continue
            if tenant != ALL_TENANTS:
                raw["tenant"] = tenant  # a source writes its own tenant's events only
            raw["source"] = source.name
            out.append((index, raw))
        return out

    async def _limit(self, tenant: str, source: Source | None, cost: int) -> None:
        cfg = self._config
        buckets = []
        if tenant != ALL_TENANTS:
            buckets.append(Bucket(f"tenant:{tenant}", cfg.tenant_rate, cfg.tenant_burst))
        if source is not None:
            buckets.append(
                Bucket(
                    f"source:{source.name}",
                    source.events_per_second or cfg.source_rate,
                    source.burst or cfg.source_burst,
                )
            )
        try:
            decision = await self._limits.take(buckets, cost)
        except StoreUnavailable as exc:
            # Redis down: events keep flowing (limits are not enforced meanwhile) rather
            # than every sender being refused; health and the log say so.
            self._redis_down(exc)
            return
        self.redis_error = None
        if not decision.allowed:
            if decision.never:
                raise _Reject(Answer.error(413, decision.describe(cost)))
            raise _Reject(
                Answer.error(
                    429, decision.describe(cost), retry_after=max(1.0, decision.retry_after_s)
                )
            )

    async def _claim(self, source: str, delivery: str) -> bool:
        try:
            return await self._deliveries.claim(source, delivery)
        except StoreUnavailable as exc:
            # Redis down: the delivery is applied; a replayed copy then counts once
            # anyway, through the workers' dedup of event ids.
            self._redis_down(exc)
            return True

    def _redis_down(self, exc: StoreUnavailable) -> None:
        if self.redis_error is None:
            log.warning("Redis unavailable: rate limits and replay ids not enforced: %s", exc)
        self.redis_error = f"unavailable, rate limits and replay ids not enforced: {exc}"

    async def _build(
        self,
        decoded: formats.Decoded,
        records: list[tuple[int, Any]],
        source: str,
        request: Request,
    ) -> _Batch:
        received = int(self._clock() * 1000)
        batch = _Batch()
        for error in decoded.errors:
            self._reject(batch, source, error.index, [("", error.message)], error.raw, received)
        envelopes, problems = validate_events(
            [record for _, record in records],
            default_source=source,
            received_at_ms=received,
            max_future_ms=self._config.max_future_ms,
        )
        bad = _group(problems)
        for position, found in sorted(bad.items()):
            index, record = records[position]
            code = next((p.reason for p in found if p.reason), None)
            fields = [(p.field, p.message) for p in found]
            self._reject(batch, source, index, fields, _raw(record), received, code)
        accepted = [records[p] for p in range(len(records)) if p not in bad] if bad else records
        plain = raw_headers(_traceparent(request.headers.get("traceparent")))
        subjects = {(e["source"], e["type"]) for e in envelopes}
        named = {pair: avro.subject_for(*pair) for pair in subjects}
        schemas = await self._schemas_of(set(named.values()))
        if not any(schemas.values()):  # the common case: no schema, JSON on the topic
            for position, refused in batch.out.add_envelopes(envelopes, plain):
                index, record = accepted[position]
                self._reject(batch, source, index, [("", refused)], _raw(record), received)
            return batch
        for (index, record), envelope in zip(accepted, envelopes, strict=True):
            subject = named[envelope["source"], envelope["type"]]
            problem = _add(batch.out, envelope, subject, schemas[subject], plain)
            if problem is not None:
                self._reject(batch, source, index, [("", problem)], _raw(record), received)
        return batch

    async def _schemas_of(self, subjects: set[str]) -> dict[str, tuple[int, Any] | None]:
        """The schema enforced on each subject (None: none), looked up once per batch."""
        try:
            return {subject: await self._schemas.latest(subject) for subject in subjects}
        except StoreUnavailable as exc:
            raise _Reject(Answer.error(503, str(exc), retry_after=5)) from None

    def _reject(
        self,
        batch: _Batch,
        source: str,
        index: int,
        problems: list[tuple[str, str]],
        raw: bytes,
        received: int,
        code: str | None = None,
    ) -> None:
        """One dead letter for the record, and one error entry per problem of it; its
        reason is ``code`` where a problem has one (e.g. ``future``), with the words in
        the ``detail`` header."""
        batch.errors += [{"index": index, "field": f, "message": m} for f, m in problems]
        reason = "; ".join(f"field '{f}' {m}" if f else m for f, m in problems)
        detail = reason if code else None
        batch.out.dead_letter(
            "ingest", code or reason, raw, received, detail=detail, source=source, index=index
        )

    async def _send(self, batch: _Batch, source: str) -> Answer:
        cfg = self._config
        now_ms = int(self._clock() * 1000)
        try:
            await self._publisher.publish(batch.out)
        except Backpressure as exc:
            self._stats.record(source, now_ms=now_ms, errors=1, error=str(exc))
            return Answer.error(503, str(exc), retry_after=exc.retry_after)
        except StoreUnavailable as exc:
            self._stats.record(source, now_ms=now_ms, errors=1, error=str(exc))
            return Answer.error(503, str(exc), retry_after=5)
        accepted, rejected = len(batch.out.raw), len(batch.out.dead)
        self._stats.record(source, now_ms=now_ms, accepted=accepted, rejected=rejected)
        body: dict[str, Any] = {"accepted": accepted, "rejected": rejected}
        if batch.errors:
            body["errors"] = sorted(batch.errors, key=lambda e: int(e["index"]))
            body["dead_letters"] = cfg.dlq_topic
        if accepted == 0 and rejected > 0:
            body["error"] = f"every one of the {rejected} records was rejected; see errors"
            return Answer(422, body)
        return Answer(202, body)


def _group(problems: list[FieldError]) -> dict[int, list[FieldError]]:
    out: dict[int, list[FieldError]] = {}
    for problem in problems:
        out.setdefault(problem.index if problem.index is not None else -1, []).append(problem)
    return out


def _raw(record: Any) -> bytes:
    """The record as the dead letter's value: its JSON, or a bounded description."""
    with contextlib.suppress(TypeError):
        return orjson.dumps(record)
    try:
        text = repr(record)
    except RecursionError:
        text = f"<a {type(record).__name__} nested too deep to write>"
    return text[:4096].encode(errors="backslashreplace")


def _add(
    out: Outgoing,
    envelope: dict[str, Any],
    subject: str,
    schema: tuple[int, Any] | None,
    plain: Headers,
) -> str | None:
    """Add one envelope (Avro under its subject's schema, JSON where none applies), or
    say why it cannot be written."""
    if schema is None:
        refused = out.add_envelopes([envelope], plain)
        return refused[0][1] if refused else None
    encoded = _encode(envelope, subject, *schema)
    if isinstance(encoded, str):
        return encoded
    headers = [*plain, ("schema.subject", subject.encode()), ("schema.id", str(schema[0]).encode())]
    out.add(partition_key(envelope), encoded, headers)
    return None


def _encode(envelope: dict[str, Any], subject: str, schema_id: int, parsed: Any) -> bytes | str:
    """The envelope as Avro in the wire format, or why it does not fit the schema."""
    try:
        return avro.encode(envelope, schema_id, parsed)
    except avro.AvroError as exc:
        details = str(exc).split(": ", 1)[-1]
        return f"schema '{subject}' (id {schema_id}) does not fit: {details}"
