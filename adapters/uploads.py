"""The ``uploads`` table of PostgreSQL: one row per uploaded file and its progress.

States: ``queued`` (the file is in S3, the job not started yet), ``running``, ``done``,
``failed`` (``error`` says why). Counters only grow while a job runs, and are written
after Kafka acknowledged the batch they count, so a job that is retried resumes after
the last counted row (see ``data_jobs/publish_upload.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from adapters.postgres import AsyncStore

STATES = ("queued", "running", "done", "failed")


@dataclass(frozen=True, slots=True)
class Upload:
    id: str
    tenant: str
    source: str
    filename: str
    format: str
    object_key: str
    size_bytes: int
    state: str
    rows_read: int = 0
    rows_accepted: int = 0
    rows_rejected: int = 0
    error: str | None = None
    rows_historical: int = 0  # of rows_accepted: staged for the history job
    history_written: int = 0  # of those: written by the history job
    history_stored: int = 0  # of those: stored already (a re-upload), not written again

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_COLUMNS = ", ".join(Upload.__dataclass_fields__)


def _upload(row: Any) -> Upload:
    return Upload(**{name: row[name] for name in Upload.__dataclass_fields__})


class UploadTable(AsyncStore):
    """Async access to ``uploads`` through a small asyncpg pool; open once per process."""

    _what = "PostgreSQL (uploads)"

    async def add(self, upload: Upload) -> None:
        values = upload.as_dict()
        placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        await self._run(
            "execute", f"INSERT INTO uploads ({_COLUMNS}) VALUES ({placeholders})", *values.values()
        )

    async def get(self, upload_id: str, tenant: str | None = None) -> Upload | None:
        """The upload, or None when missing or (with ``tenant``) another tenant's."""
        row = await self._run(
            "fetchrow",
            f"SELECT {_COLUMNS} FROM uploads WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)",
            upload_id,
            tenant,
        )
        return None if row is None else _upload(row)

    async def start(self, upload_id: str) -> Upload | None:
        """Mark the upload running (also after a failure, for a retry); None when done."""
        row = await self._run(
            "fetchrow",
            "UPDATE uploads SET state = 'running', error = NULL, updated_at = now() "
            f"WHERE id = $1 AND state <> 'done' RETURNING {_COLUMNS}",
            upload_id,
        )
        return None if row is None else _upload(row)

    async def progress(
        self, upload_id: str, read: int, accepted: int, rejected: int, historical: int = 0
    ) -> None:
        """Set the counters (absolute values: a retried write does not count twice)."""
        await self._run(
            "execute",
            "UPDATE uploads SET rows_read = $2, rows_accepted = $3, rows_rejected = $4, "
            "rows_historical = $5, updated_at = now() WHERE id = $1",
            upload_id,
            read,
            accepted,
            rejected,
            historical,
        )

    async def history_done(self, upload_id: str, written: int, stored: int) -> None:
        """Record what the history job wrote (absolute values, as ``progress``)."""
        await self._run(
            "execute",
            "UPDATE uploads SET history_written = $2, history_stored = $3, updated_at = now() "
            "WHERE id = $1",
            upload_id,
            written,
            stored,
        )

    async def finish(self, upload_id: str, error: str | None = None) -> None:
        await self._run(
            "execute",
            "UPDATE uploads SET state = $2, error = $3, updated_at = now() WHERE id = $1",
            upload_id,
            "done" if error is None else "failed",
            error,
        )
