"""Shared HTTP pieces of the Serve apps: bounded body reading, and answers in the one
error shape ``{"error": ..., "errors": [{"field", "message"}]}``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import Request, Response

from core.envelope import FieldError


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


@dataclass(slots=True)
class Answer:
    """A status, a JSON body and headers, independent of the web framework. ``body`` is
    a JSON-able value, or ``bytes`` already encoded as JSON (sent as they are)."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def error(
        cls,
        status: int,
        message: str,
        errors: Sequence[FieldError] = (),
        *,
        retry_after: float | None = None,
        **extra: Any,
    ) -> Answer:
        """An error answer; ``retry_after`` seconds become a ``Retry-After`` header."""
        body: dict[str, Any] = {"error": message, **extra}
        if errors:
            body["errors"] = [{"field": e.field, "message": e.message} for e in errors]
        headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else {}
        return cls(status, body, headers)


def respond(answer: Answer) -> Response:
    body = answer.body
    return Response(
        body if isinstance(body, bytes) else orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=answer.status,
        headers=answer.headers,
        media_type="application/json",
    )
