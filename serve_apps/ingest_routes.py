"""The ingest routes on a plain FastAPI app, and how an edge answer becomes a response.

Kept apart from serve_apps/ingest.py so that a bare app (the benchmark's reference,
in-process tests) needs no Ray Serve import.
"""

# No `from __future__ import annotations`: FastAPI resolves handler annotations at
# run time.
from typing import Any

from fastapi import FastAPI, Request

from serve_apps.edge import IngestEdge
from serve_apps.http import respond


def add_routes(api: FastAPI, edge: Any) -> None:
    """The routes of a bare app around ``edge`` (an IngestEdge or a callable giving one);
    the Serve deployment below declares the same routes on its class."""

    def current() -> IngestEdge:
        found: IngestEdge = edge() if callable(edge) else edge
        return found

    @api.post("/v1/events", status_code=202)
    async def post_events(request: Request) -> Any:
        return respond(await current().events(request))

    @api.post("/v1/sources/{source}/webhook", status_code=202)
    async def post_webhook(source: str, request: Request) -> Any:
        return respond(await current().webhook(source, request))

    @api.get("/healthz")
    async def healthz() -> Any:
        return current().health()
