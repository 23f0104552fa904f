"""Errors of the external systems, translated from their drivers at this edge."""

from __future__ import annotations

from core.exceptions import RaylineError


class StoreUnavailable(RaylineError):
    """A store or broker did not answer, or refused the operation."""


class Backpressure(RaylineError):
    """A downstream queue is full; the caller should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueryRejected(RaylineError):
    """ClickHouse refused a query (syntax, a limit, a read-only setting); the first line of
    its message says why. Not a store outage: the caller's query needs changing."""


class QueryLimitExceeded(QueryRejected):
    """A query ran into one of the limits it was given; ``limit`` names which: ``time``
    (``max_execution_time``), ``memory`` (``max_memory_usage``), ``rows_to_read``
    (``max_rows_to_read``) or ``result_rows`` (``max_result_rows``)."""

    def __init__(self, message: str, limit: str = "") -> None:
        super().__init__(message)
        self.limit = limit
