"""Registry schemas as the ingest edge needs them, cached a few seconds per replica."""

from __future__ import annotations

from typing import Any

import orjson

from adapters.sources import SourceCatalog
from core import avro
from serve_apps.cache import TtlCache

_CACHE_SECONDS = 5.0


class AsyncSchemas:
    """Latest schema per subject and schema text per id, from PostgreSQL.

    A subject without a schema is remembered as such for the same few seconds, so
    events of unregistered subjects cost no lookup each; a schema registered now is
    enforced within :data:`_CACHE_SECONDS`.
    """

    def __init__(self, catalog: SourceCatalog) -> None:
        self._catalog = catalog
        self._latest = TtlCache(self._load_latest, _CACHE_SECONDS)
        self._texts = TtlCache(catalog.schema_text, 3600.0)  # an id's schema never changes

    async def _load_latest(self, subject: str) -> tuple[int, Any, Any] | None:
        found = await self._catalog.latest_schema(subject)
        if found is None:
            return None
        schema_id, text = found
        try:
            parsed = avro.parse_schema_text(text)
        except avro.AvroError:
            return None  # not an event schema (the registry takes any Avro): not enforced
        return schema_id, parsed, orjson.loads(text)

    async def latest(self, subject: str) -> tuple[int, Any] | None:
        """(id, parsed schema) enforced on ``subject``, or None when it has none."""
        found = await self._latest.get(subject)
        return None if found is None else (found[0], found[1])

    async def latest_json(self, subject: str) -> dict[str, Any] | None:
        """The schema of ``subject`` as JSON (types CSV columns), or None."""
        found = await self._latest.get(subject)
        return None if found is None else found[2]

    async def ids_in(self, fmt: str, body: bytes) -> dict[int, str]:
        """Schema texts of the ids an Avro body names (empty for other formats)."""
        if fmt != "avro" or not avro.is_framed(body):
            return {}
        try:
            schema_id, _ = avro.split_frame(body)
        except ValueError:
            return {}
        text = await self._texts.get(schema_id)
        return {} if text is None else {schema_id: text}
