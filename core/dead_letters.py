"""The headers of a dead letter: why a record was rejected, where, and where it came from.

Every record that a stage rejects goes to the dead-letter topic as it arrived (the
original bytes, keyed like the original where there was a key), with these headers:

=================== ============================================================
header              what it says
=================== ============================================================
``reason``          what was wrong, in words a person can act on, or a short code
                    that consumers count by (``late``, ``future``)
``detail``          the words behind a code
``stage``           which stage rejected it: ``ingest``, ``upload``, ``poll``,
                    ``mqtt``, ``cdc`` or ``process``
``origin.source``   the source it came in through (edge stages)
``origin.*``        more of where it came from: ``tenant``, ``index`` (position in
                    its request or file), ``upload``, ``device``, ``topic``,
                    ``partition``, ``offset``
``received_at``     epoch milliseconds at which the edge received it
=================== ============================================================
"""

from __future__ import annotations

MAX_REASON_BYTES = 1000

LATE = "late"
"""The reason of an event whose every window had closed (its tenant's watermark passed
them) when it was read."""
FUTURE = "future"
"""The reason of an event stamped further ahead of its arrival than the allowed skew."""


def dead_letter_headers(
    stage: str,
    reason: str,
    received_at_ms: int | None = None,
    *,
    detail: str | None = None,
    **origin: str | int,
) -> list[tuple[str, bytes]]:
    """Headers of one dead letter; ``origin`` keys become ``origin.<key>`` headers.

    A reason (or detail) longer than :data:`MAX_REASON_BYTES` is cut (a hostile record
    must not make its dead letter larger than the record).
    """
    headers = [("reason", _cut(reason)), ("stage", stage.encode())]
    if detail is not None:
        headers.append(("detail", _cut(detail)))
    headers += [(f"origin.{key}", str(value).encode()) for key, value in sorted(origin.items())]
    if received_at_ms is not None:
        headers.append(("received_at", str(received_at_ms).encode()))
    return headers


def _cut(text: str) -> bytes:
    data = text.encode()
    if len(data) > MAX_REASON_BYTES:
        data = data[: MAX_REASON_BYTES - 3].decode(errors="ignore").encode() + b"..."
    return data
