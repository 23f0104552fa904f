"""Shared HTTP pieces of the Serve apps: bounded body reading and error answers."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import ORJSONResponse


class BodyTooLarge(Exception):
    """The request body is over the configured limit."""


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, stopping as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"body of {declared} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def error_response(
    status: int,
    message: str,
    *,
    errors: list[dict[str, Any]] | None = None,
    retry_after: float | None = None,
) -> ORJSONResponse:
    """The one error shape of every endpoint: ``{"error": ..., "errors": [...]}``."""
    content: dict[str, Any] = {"error": message}
    if errors is not None:
        content["errors"] = errors
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else None
    return ORJSONResponse(content, status_code=status, headers=headers)
