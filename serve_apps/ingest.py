"""Ingest Serve app: ``POST /v1/events`` validates a JSON batch and produces it to Kafka.

Answers:

* 202 ``{"accepted": n}`` only after Kafka acknowledged every event of the batch;
* 400 when the body is not JSON (with the parser's reason);
* 413 when the body or the number of events is over the limit;
* 415 when the body is declared as something other than JSON;
* 422 when any event misses or mistypes a field, listing each event index and field;
  nothing of such a batch is written;
* 503 with ``Retry-After`` when Kafka is full or unavailable.
"""

# No `from __future__ import annotations`: FastAPI resolves handler annotations at
# run time, and inside Serve's ingress wrapper postponed ones are not found.
import os
import time
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import ORJSONResponse
from ray import serve

from adapters.exceptions import Backpressure, StoreUnavailable
from adapters.kafka import AsyncBatchProducer, Headers
from core.envelope import ENVELOPE_SCHEMA, partition_key, validate_events
from serve_apps.http import BodyTooLarge, error_response, read_body

app = FastAPI(
    title="Rayline ingest API",
    description="Takes events in and produces them to Kafka once validated.",
    default_response_class=ORJSONResponse,
)


@dataclass(frozen=True, slots=True)
class IngestConfig:
    bootstrap: str
    topic: str
    linger_ms: int
    queue_max_messages: int
    max_body_bytes: int
    max_events_per_request: int
    default_source: str


def _traceparent(incoming: str | None) -> bytes:
    """Keep the caller's W3C trace context, or start a new trace."""
    if incoming and len(incoming) == 55 and incoming.count("-") == 3:
        return incoming.encode()
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01".encode()


@serve.deployment
@serve.ingress(app)
class IngestAPI:
    def __init__(self, config: IngestConfig) -> None:
        self._config = config
        self._producer = AsyncBatchProducer(
            config.bootstrap,
            linger_ms=config.linger_ms,
            queue_max_messages=config.queue_max_messages,
        )

    @app.post("/v1/events", status_code=202)
    async def post_events(self, request: Request) -> Any:
        cfg = self._config
        content_type = request.headers.get("content-type", "application/json")
        if "json" not in content_type:
            return error_response(
                415, f"expected Content-Type application/json, got {content_type!r}"
            )
        try:
            body = await read_body(request, cfg.max_body_bytes)
        except BodyTooLarge as exc:
            return error_response(413, str(exc))
        try:
            items = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return error_response(400, f"malformed JSON: {exc}")
        if isinstance(items, list) and len(items) > cfg.max_events_per_request:
            return error_response(
                413,
                f"{len(items)} events in one request; the limit is "
                f"{cfg.max_events_per_request}: split the batch",
            )
        envelopes, errors = validate_events(
            items, default_source=cfg.default_source, received_at_ms=int(time.time() * 1000)
        )
        if errors:
            what = errors[0].message if errors[0].index is None else f"{len(errors)} problem(s)"
            return error_response(
                422,
                f"{what} in the batch; nothing was written",
                errors=[e.as_dict() for e in errors],
            )
        traceparent = _traceparent(request.headers.get("traceparent"))
        headers: Headers = [("schema", ENVELOPE_SCHEMA.encode()), ("traceparent", traceparent)]
        records = [(partition_key(e), orjson.dumps(e), headers) for e in envelopes]
        try:
            await self._producer.send(cfg.topic, records)
        except Backpressure as exc:
            return error_response(503, str(exc), retry_after=exc.retry_after)
        except StoreUnavailable as exc:
            return error_response(503, str(exc), retry_after=5)
        return {"accepted": len(records)}

    @app.get("/healthz")
    async def healthz(self) -> Any:
        return {"status": "ok", "producer_queue": self._producer.queued()}

    def __del__(self) -> None:
        self._producer.close(5)
