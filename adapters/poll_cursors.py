"""Where each poll source stands: its cursor state in PostgreSQL's ``source_cursors``."""

from __future__ import annotations

import json
from typing import Any

from adapters.postgres import _Connection


class CursorStore(_Connection):
    """Load and save poll cursors, for use from one (non-async) thread.

    A cursor is saved whole, in one statement, so a reader sees the old or the new one.
    """

    _what = "PostgreSQL source cursors"

    def load(self, source: str) -> dict[str, Any] | None:
        """The saved cursor state of ``source``, or None when it never saved one."""
        row = self._call("SELECT cursor FROM source_cursors WHERE source = $1", source)
        return None if row is None else dict(json.loads(row["cursor"]))

    def save(self, source: str, cursor: dict[str, Any]) -> None:
        self._call(
            "INSERT INTO source_cursors (source, cursor) VALUES ($1, $2::jsonb) "
            "ON CONFLICT (source) DO UPDATE SET cursor = EXCLUDED.cursor, updated_at = now()",
            source,
            json.dumps(cursor),
            fetch="execute",
        )
