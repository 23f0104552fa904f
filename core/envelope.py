"""The event envelope: what every event carries, and how a raw JSON value becomes one.

An envelope is a plain ``dict`` (cheap to build, cheap to serialise) with these keys:

========== ======== =============================================================
key        required what it is
========== ======== =============================================================
event_id   yes      unique within its source (string, 1 to 128 characters)
tenant     yes      owner of the event (``[A-Za-z0-9_.-]``, 1 to 64 characters)
type       yes      what happened (``[A-Za-z0-9_.:-]``, 1 to 128 characters)
ts         yes      event time: RFC 3339 with an offset, or epoch seconds
source     no       where it came from; the ingest endpoint's name by default
entity     no       the thing it is about; events of one entity share a partition
value      no       the number that sum aggregates add up (default 0)
attributes no       any further JSON object
========== ======== =============================================================

Validation normalises ``ts`` to integer epoch milliseconds and adds ``received_at``.
It never stops at the first bad event: every error of every event is reported, so a
caller can fix a whole batch in one round trip.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain
from typing import Any

import numpy as np
import numpy.typing as npt

from core.dead_letters import FUTURE

ENVELOPE_SCHEMA = "rayline.envelope/v1"

_TENANT_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_SOURCE_RE = _TENANT_RE
_TYPE_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
_MAX_ID_LEN = 128
_MAX_ENTITY_LEN = 256
# Event times outside this range are almost always a unit mistake (ms sent as s).
MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z
STORED_TS_RANGE_MS = (0, 9_223_372_036_854)
"""Event times a worker takes from a topic (1970 to 2262, where int64 nanoseconds
end): wider than ingest's, so records produced by other tools still count."""
MAX_ABS_VALUE = 1e18
"""``|value|`` bound: sums of a full batch of them stay finite in ClickHouse's Float64."""
MAX_ATTRIBUTE_DEPTH = 64
"""Nesting bound of ``attributes`` (orjson writes at most 255 levels; a deeper object
that parsed could never be written to Kafka again)."""
MAX_EVENT_BYTES = 512 * 1024
"""Bound of one encoded envelope (Kafka's default message limit is 1 MiB)."""

KNOWN_FIELDS = frozenset(
    {"event_id", "tenant", "type", "ts", "source", "entity", "value", "attributes"}
)


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem with one field of one event of a batch (index None: the whole body)."""

    index: int | None
    field: str
    message: str
    reason: str | None = None
    """A short code for the dead letter (``future``), where the problem has one."""

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "field": self.field, "message": self.message}

    def __str__(self) -> str:
        if self.index is None:
            return f"body: {self.message}"
        return f"event {self.index}: field '{self.field}' {self.message}"


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_NAME_PATTERNS = {"tenant": _TENANT_RE, "source": _SOURCE_RE, "type": _TYPE_RE}


def name_problem(field: str, value: Any) -> str | None:
    """What is wrong with a tenant, source or type name, or None when it is fine."""
    if not isinstance(value, str):
        return f"expected string, got {_type_name(value)}"
    if len(value) > 128:
        return _string_problem(field, value)
    return _cached_string_problem(field, value)


def _string_problem(field: str, value: str) -> str | None:
    pattern = _NAME_PATTERNS[field]
    if not pattern.match(value):
        return f"expected {pattern.pattern} (letters, digits and _.-), got {_describe(value)}"
    return None


# A batch repeats a few tenants, sources and types thousands of times: check each once.
_cached_string_problem = functools.lru_cache(maxsize=16_384)(_string_problem)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def parse_event_time(value: Any) -> int:
    """Turn an RFC 3339 string or epoch seconds into epoch milliseconds.

    Raises:
        ValueError: with a message that says what was expected.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected RFC 3339 time or epoch seconds, got {_type_name(value)}")
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"expected RFC 3339 time such as 2026-11-29T05:50:00Z, got {_describe(value)}"
            ) from None
        if parsed.tzinfo is None:
            raise ValueError(
                f"expected a time with an offset (Z or +hh:mm), got {_describe(value)}"
            )
        ts_ms: float = parsed.timestamp() * 1000
    else:
        if not _finite(value):
            raise ValueError(f"expected a finite number of epoch seconds, got {value!r}")
        ts_ms = value * 1000
    # Compared before int(): 1e306 * 1000 is inf, which int() refuses (OverflowError).
    if not MIN_TS_MS <= ts_ms < MAX_TS_MS:
        raise ValueError(
            f"expected a time between 2000 and 2100 (epoch seconds, not milliseconds), "
            f"got {_describe(value)}"
        )
    return int(ts_ms)


def future_problem(ts_ms: int, received_at_ms: int, max_future_ms: int) -> str | None:
    """Why an event time is too far ahead of its arrival, or None when it is not."""
    ahead = ts_ms - received_at_ms
    if ahead <= max_future_ms:
        return None
    return (
        f"is {ahead / 1000:,.3f} s ahead of the time it arrived "
        f"({_iso(received_at_ms)}); at most {max_future_ms / 1000:,.0f} s is allowed "
        f"(pipeline.max_future_skew_seconds): check the sender's clock and the unit "
        f"(epoch seconds, not milliseconds)"
    )


def _iso(ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _validate_one(
    raw: Any,
    index: int,
    default_source: str,
    received_at_ms: int,
    errors: list[FieldError],
    max_future_ms: int | None = None,
) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        errors.append(FieldError(index, "", f"expected a JSON object, got {_type_name(raw)}"))
        return None
    before = len(errors)
    for field in ("event_id", "tenant", "type", "ts"):
        if field not in raw:
            errors.append(FieldError(index, field, "is required but missing"))
    for field in sorted(set(raw) - KNOWN_FIELDS):
        errors.append(
            FieldError(index, field, "is not an envelope field; put custom data under 'attributes'")
        )
    event_id = raw.get("event_id")
    if "event_id" in raw and (
        not isinstance(event_id, str) or not 0 < len(event_id) <= _MAX_ID_LEN
    ):
        errors.append(
            FieldError(
                index,
                "event_id",
                f"expected string of 1 to {_MAX_ID_LEN} characters, got {_describe(event_id)}",
            )
        )
    for field in ("tenant", "type", "source"):
        problem = name_problem(field, raw[field]) if field in raw else None
        if problem is not None:
            errors.append(FieldError(index, field, problem))
    ts_ms = 0
    if "ts" in raw:
        try:
            ts_ms = parse_event_time(raw["ts"])
        except ValueError as exc:
            errors.append(FieldError(index, "ts", str(exc)))
        else:
            ahead = None
            if max_future_ms is not None:
                ahead = future_problem(ts_ms, received_at_ms, max_future_ms)
            if ahead is not None:
                errors.append(FieldError(index, "ts", ahead, FUTURE))
    entity = raw.get("entity", event_id)
    if "entity" in raw and (not isinstance(entity, str) or not 0 < len(entity) <= _MAX_ENTITY_LEN):
        errors.append(
            FieldError(
                index,
                "entity",
                f"expected string of 1 to {_MAX_ENTITY_LEN} characters, got {_describe(entity)}",
            )
        )
    value = raw.get("value", 0)
    problem = value_problem(value)
    if problem is not None:
        errors.append(FieldError(index, "value", problem))
    attributes = raw.get("attributes", {})
    problem = attributes_problem(attributes)
    if problem is not None:
        errors.append(FieldError(index, "attributes", problem))
    if len(errors) > before:
        return None
    return {
        "event_id": event_id,
        "source": raw.get("source", default_source),
        "tenant": raw["tenant"],
        "type": raw["type"],
        "ts": ts_ms,
        "entity": entity,
        "value": value,
        "attributes": attributes,
        "received_at": received_at_ms,
    }


def validate_events(
    items: Any, *, default_source: str, received_at_ms: int, max_future_ms: int | None = None
) -> tuple[list[dict[str, Any]], list[FieldError]]:
    """Validate a decoded JSON batch.

    The batch is checked column by column first (:func:`clean_rows`); only the events
    that pass do not go through the per-event rules, which find and word the errors of
    the others. Both give the same envelopes; a unit test holds them to it.

    Args:
        items: the decoded request body; must be a list of objects.
        default_source: ``source`` for events that name none.
        received_at_ms: when the batch arrived (epoch ms), from the caller's clock.
        max_future_ms: refuse (reason ``future``) events stamped further ahead of
            ``received_at_ms``; None: no bound here (history, replays).

    Returns:
        The normalised envelopes and every error found. A caller that wants
        all-or-nothing semantics writes the envelopes only when the error list is empty.
    """
    if not isinstance(items, list):
        return [], [
            FieldError(None, "", f"expected a JSON array of events, got {_type_name(items)}")
        ]
    clean, times = clean_rows(items, received_at_ms, max_future_ms)
    envelopes: list[dict[str, Any]] = []
    errors: list[FieldError] = []
    append = envelopes.append
    for index, raw in enumerate(items):
        if clean[index]:
            event_id = raw["event_id"]
            append(
                {
                    "event_id": event_id,
                    "source": raw.get("source", default_source),
                    "tenant": raw["tenant"],
                    "type": raw["type"],
                    "ts": times[index],
                    "entity": raw.get("entity", event_id),
                    "value": raw.get("value", 0),
                    "attributes": raw.get("attributes", {}),
                    "received_at": received_at_ms,
                }
            )
            continue
        envelope = _validate_one(raw, index, default_source, received_at_ms, errors, max_future_ms)
        if envelope is not None:
            append(envelope)
    return envelopes, errors


_REQUIRED = frozenset({"event_id", "tenant", "type", "ts"})
_NUMBERS = frozenset({int, float})
_SCALARS = frozenset({str, int, float, bool, type(None)})
_STRINGS = frozenset({str})
_DICTS = frozenset({dict})
_STAND_IN: dict[str, Any] = {"event_id": "-", "tenant": "-", "type": "-", "ts": 0}
_ABSENT: Any = object()  # not None: an explicit null is an error


def clean_rows(
    rows: list[Any], received_at_ms: int, max_future_ms: int | None = None
) -> tuple[list[bool], list[int]]:
    """Which events of a batch pass every rule of :func:`validate_events`, checked a
    column at a time (NumPy for the numbers, one check per distinct name).

    Conservative: an event marked clean passes the per-event rules with the same
    envelope; an event not marked may still pass them (an edge case such as a value
    at the exact bound, or a ``dict`` subclass), and is checked one by one.

    Returns:
        A flag per event, and each clean event's time in epoch milliseconds.
    """
    n = len(rows)
    shaped = _shaped(rows)
    if not any(shaped):
        return shaped, [0] * n
    if not all(shaped):
        rows = [r if ok else _STAND_IN for r, ok in zip(rows, shaped, strict=True)]
    ok = np.array(shaped, dtype=bool)
    ok &= _ids_ok([r["event_id"] for r in rows], _MAX_ID_LEN)
    for field in ("tenant", "type"):
        ok &= _names_ok(field, [r[field] for r in rows])
    ok &= _names_ok("source", [r.get("source", "-") for r in rows])
    ok &= _ids_ok([r.get("entity", "-") for r in rows], _MAX_ENTITY_LEN)
    ok &= _values_ok([r.get("value", 0) for r in rows])
    ok &= _attributes_ok([r.get("attributes", _ABSENT) for r in rows])
    times, timely = _times_ms([r["ts"] for r in rows], received_at_ms, max_future_ms)
    ok &= timely
    return ok.tolist(), times


def _shaped(rows: list[Any]) -> list[bool]:
    """Plain objects with the required fields and no unknown one; each distinct key
    order (a batch has a few) is checked once."""
    if not _DICTS.issuperset(map(type, rows)):
        return [type(r) is dict and _REQUIRED <= r.keys() <= KNOWN_FIELDS for r in rows]
    orders = list(map(tuple, rows))
    good = {keys for keys in set(orders) if _REQUIRED <= set(keys) <= KNOWN_FIELDS}
    return [keys in good for keys in orders]


def _ids_ok(column: list[Any], longest: int) -> npt.NDArray[np.bool_]:
    if _STRINGS.issuperset(map(type, column)):
        lengths = np.fromiter(map(len, column), dtype=np.int64, count=len(column))
        return (lengths > 0) & (lengths <= longest)
    return np.array([type(x) is str and 0 < len(x) <= longest for x in column], dtype=bool)


def _names_ok(field: str, column: list[Any]) -> npt.NDArray[np.bool_] | bool:
    if not _STRINGS.issuperset(map(type, column)):
        return np.array([name_problem(field, x) is None for x in column], dtype=bool)
    bad = {x for x in set(column) if name_problem(field, x) is not None}
    if not bad:
        return True
    return np.array([x not in bad for x in column], dtype=bool)


def _values_ok(column: list[Any]) -> npt.NDArray[np.bool_] | bool:
    if _NUMBERS.issuperset(map(type, column)):
        try:
            values = np.array(column, dtype=np.float64)
        except OverflowError:  # an integer beyond float range: the per-event rule says so
            return False
        # Strictly inside: an integer at the bound may round either way in float64.
        return np.abs(values) < MAX_ABS_VALUE
    return np.array([value_problem(x) is None for x in column], dtype=bool)


def _attributes_ok(column: list[Any]) -> npt.NDArray[np.bool_] | bool:
    present = [a for a in column if a is not _ABSENT]
    if _DICTS.issuperset(map(type, present)):
        # The types of every key and value of the batch at once, without a call per event.
        values = chain.from_iterable(map(dict.values, present))
        if _SCALARS.issuperset(map(type, values)) and _STRINGS.issuperset(
            map(type, chain.from_iterable(present))
        ):
            return True
    return np.array(
        [a is _ABSENT or (type(a) is dict and attributes_problem(a) is None) for a in column],
        dtype=bool,
    )


def _times_ms(
    column: list[Any], received_at_ms: int, max_future_ms: int | None
) -> tuple[list[int], npt.NDArray[np.bool_]]:
    """Each event time in epoch ms (0 where it is not usable), and whether it is."""
    if _NUMBERS.issuperset(map(type, column)):
        try:
            with np.errstate(over="ignore"):  # 1e306 s: out of range, said per event
                ms = np.array(column, dtype=np.float64) * 1000.0
        except OverflowError:
            ms = np.zeros(len(column))
        ok = (ms >= MIN_TS_MS) & (ms < MAX_TS_MS)
        whole = np.where(ok, ms, 0).astype(np.int64)  # truncated, as int() does
    else:
        parsed = [_time_or_none(x) for x in column]
        ok = np.array([t is not None for t in parsed], dtype=bool)
        whole = np.array([t or 0 for t in parsed], dtype=np.int64)
    if max_future_ms is not None:
        ok &= whole - received_at_ms <= max_future_ms
    return whole.tolist(), ok


def _time_or_none(value: Any) -> int | None:
    try:
        return parse_event_time(value)
    except ValueError:
        return None


def _finite(number: float) -> bool:
    # math.isfinite raises OverflowError on an int too large for a float.
    return isinstance(number, int) or math.isfinite(number)


def value_problem(value: Any) -> str | None:
    """What is wrong with an event's ``value``, or None when it is fine."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"expected a finite number, got {_describe(value)}"
    if not _finite(value) or not -MAX_ABS_VALUE <= value <= MAX_ABS_VALUE:
        return f"expected a finite number within ±{MAX_ABS_VALUE:g}, got {_describe(value)}"
    return None


def attributes_problem(attributes: Any) -> str | None:
    """What is wrong with an event's ``attributes``, or None when they are fine.

    They must be an object with string keys, nested at most ``MAX_ATTRIBUTE_DEPTH``
    levels deep. The walk is iterative, so no input can exhaust the stack.
    """
    if not isinstance(attributes, dict):
        return f"expected object, got {_type_name(attributes)}"
    stack: list[tuple[Any, int]] = [(attributes, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_ATTRIBUTE_DEPTH:
            return f"nest more than {MAX_ATTRIBUTE_DEPTH} levels deep; flatten them"
        if isinstance(node, dict):
            for key, child in node.items():
                if not isinstance(key, str):
                    return f"expected string keys, got {_type_name(key)} key {_describe(key)}"
                if isinstance(child, (dict, list)):
                    stack.append((child, depth + 1))
        else:
            stack.extend((child, depth + 1) for child in node if isinstance(child, (dict, list)))
    return None


def size_problem(size: int) -> str | None:
    """Why an encoded envelope of ``size`` bytes is too large, or None when it fits."""
    if size <= MAX_EVENT_BYTES:
        return None
    return (
        f"the event is {size:,} bytes encoded; at most {MAX_EVENT_BYTES:,} bytes are "
        f"allowed: move bulky data to an upload or an object store"
    )


def partition_key(envelope: dict[str, Any]) -> bytes:
    """The Kafka key: every event of one (tenant, entity) lands on one partition."""
    return f"{envelope['tenant']}:{envelope['entity']}".encode()


def check_stored(record: Any) -> str | None:
    """Why a decoded Kafka record is not a usable envelope, or None when it is.

    Ingest writes only validated envelopes, but anything can be produced to a topic;
    a worker checks the fields it folds before trusting them.
    """
    if not isinstance(record, dict):
        return f"expected a JSON object, got {_type_name(record)}"
    for field in ("event_id", "tenant", "type"):
        if not isinstance(record.get(field), str):
            return f"field '{field}' expected string, got {_type_name(record.get(field))}"
    source = record.get("source")
    if source is not None and not isinstance(source, str):
        return f"field 'source' expected string, got {_type_name(source)}"
    ts = record.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int):
        return f"field 'ts' expected integer epoch milliseconds, got {_type_name(ts)}"
    low, high = STORED_TS_RANGE_MS
    if not low <= ts < high:
        return f"field 'ts' expected epoch milliseconds from {low} to {high - 1}, got {ts}"
    problem = value_problem(record.get("value"))
    if problem is not None:
        return f"field 'value' {problem}"
    return None
