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


@dataclass(frozen=True, slots=True)
class UploadPart:
    """One part of an upload read by its own task, and how far it got.

    For NDJSON ``start``/``end`` are byte offsets (``end`` None: to the end of the file),
    for Parquet row group numbers; ``first_index`` records (and for NDJSON
    ``first_line - 1`` lines) of the file come before the part.
    """

    part: int
    start: int
    end: int | None
    first_index: int
    first_line: int = 1
    rows_read: int = 0
    done: bool = False


_COLUMNS = ", ".join(Upload.__dataclass_fields__)
_PART_COLUMNS = (
    'part, start_at AS "start", end_at AS "end", first_index, first_line, rows_read, done'
)


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

    async def plan_parts(self, upload_id: str, parts: list[UploadPart]) -> list[UploadPart]:
        """Store the plan of the upload's parts unless one is stored (a retried job keeps
        the first run's plan and progress); return the stored plan."""
        await self._run(
            "execute",
            "INSERT INTO upload_parts (upload_id, part, start_at, end_at, first_index, "
            "first_line) SELECT $1, * FROM unnest($2::int[], $3::bigint[], $4::bigint[], "
            "$5::bigint[], $6::bigint[]) "
            "WHERE NOT EXISTS (SELECT 1 FROM upload_parts WHERE upload_id = $1)",
            upload_id,
            [p.part for p in parts],
            [p.start for p in parts],
            [p.end for p in parts],
            [p.first_index for p in parts],
            [p.first_line for p in parts],
        )
        return await self.parts(upload_id)

    async def parts(self, upload_id: str) -> list[UploadPart]:
        """The upload's parts in order (none when it is read in one pass)."""
        rows = await self._run(
            "fetch",
            f"SELECT {_PART_COLUMNS} FROM upload_parts WHERE upload_id = $1 ORDER BY part",
            upload_id,
        )
        return [UploadPart(**dict(row)) for row in rows]

    async def part_counts(self, upload_id: str) -> tuple[int, int]:
        """(parts, parts done) of the upload; (0, 0) when it is read in one pass."""
        row = await self._run(
            "fetchrow",
            "SELECT count(*) AS total, count(*) FILTER (WHERE done) AS done "
            "FROM upload_parts WHERE upload_id = $1",
            upload_id,
        )
        return int(row["total"]), int(row["done"])

    async def part_progress(
        self,
        upload_id: str,
        part: int,
        rows_read: int,
        counts: tuple[int, int, int, int],
    ) -> None:
        """Move a part from ``rows_read - counts[0]`` to ``rows_read`` (its own rows) and
        add ``counts`` (read, accepted, rejected, historical) to the upload's counters, in
        one statement: parts written at once by parallel tasks add up, and a part's
        position and the totals agree. A part found elsewhere (a repeated statement, a
        task re-running rows counted already) moves nothing and adds nothing."""
        await self._run(
            "execute",
            "WITH moved AS (UPDATE upload_parts SET rows_read = $3 "
            "WHERE upload_id = $1 AND part = $2 AND rows_read = $3::bigint - $4::bigint "
            "RETURNING 1) "
            "UPDATE uploads SET rows_read = rows_read + $4, rows_accepted = rows_accepted + $5, "
            "rows_rejected = rows_rejected + $6, rows_historical = rows_historical + $7, "
            "updated_at = now() WHERE id = $1 AND EXISTS (SELECT 1 FROM moved)",
            upload_id,
            part,
            rows_read,
            *counts,
        )

    async def part_done(self, upload_id: str, part: int) -> None:
        await self._run(
            "execute",
            "UPDATE upload_parts SET done = true WHERE upload_id = $1 AND part = $2",
            upload_id,
            part,
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
