"""Ingest Serve app: the batch events API and third-party webhooks, into Kafka.

* ``POST /v1/events``: envelopes of the key's tenant as a JSON array, NDJSON, CSV or
  one Avro record (Confluent wire format), with ``Authorization: Bearer <key>``;
* ``POST /v1/sources/{source}/webhook``: a third party's payload, authenticated by
  the source's HMAC signature scheme or a tenant key, mapped to envelopes by the
  source's mapping;
* ``GET /healthz``.

What each answer means is in :mod:`serve_apps.edge`, which does the work.
"""

# No `from __future__ import annotations`: FastAPI resolves handler annotations at
# run time, and inside Serve's ingress wrapper postponed ones are not found.
import gc
from typing import Any

from fastapi import FastAPI, Request
from ray import serve

from serve_apps.edge import EdgeConfig, IngestEdge
from serve_apps.http import respond

app = FastAPI(
    title="Rayline ingest API",
    description="Takes events in (batch API, webhooks) and produces them to Kafka once "
    "validated. A 2xx is sent only after Kafka acknowledged every accepted record.",
)


@serve.deployment
@serve.ingress(app)
class IngestAPI:
    def __init__(self, config: EdgeConfig) -> None:
        self._edge = IngestEdge(config)
        # Everything imported so far lives as long as the replica: keep the collector
        # from scanning it again and again (a tenth of the CPU of a busy replica).
        gc.freeze()

    @app.post("/v1/events", status_code=202)
    async def post_events(self, request: Request) -> Any:
        return respond(await self._edge.events(request))

    @app.post("/v1/sources/{source}/webhook", status_code=202)
    async def post_webhook(self, source: str, request: Request) -> Any:
        return respond(await self._edge.webhook(source, request))

    @app.get("/healthz")
    async def healthz(self) -> Any:
        return self._edge.health()

    def __del__(self) -> None:
        self._edge.close()
