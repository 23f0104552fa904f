"""Plan for the query API's time-series endpoint: parameters in, a bound SQL fragment out.

Every parameter is checked here and every problem is reported at once, each naming its
parameter. Nothing a caller sends is ever formatted into SQL: tenant, type, times, filter
attribute names and filter values all travel as clickhouse-connect bound parameters
(``{name:Type}``), so the SQL text depends only on the shape of the request.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from core.envelope import FieldError, name_problem, parse_event_time

RAW, MINUTE, HOUR, DAY = "raw", "1m", "1h", "1d"
AUTO = "auto"
RESOLUTIONS = (RAW, MINUTE, HOUR, DAY)
BUCKET_MS = {RAW: 1, MINUTE: 60_000, HOUR: 3_600_000, DAY: 86_400_000}

TABLE_EVENTS = "events"
TABLE_WINDOWS_1M = "windows_1m"
TABLE_ROLLUP_1H = "rollup_1h"
TABLE_ROLLUP_1D = "rollup_1d"
_TABLES = {RAW: TABLE_EVENTS, MINUTE: TABLE_WINDOWS_1M, HOUR: TABLE_ROLLUP_1H, DAY: TABLE_ROLLUP_1D}

METRICS = ("count", "sum", "min", "max", "avg", "distinct", "p50", "p90", "p99")
MAX_RAW_RANGE_MS = 15 * 60_000
MAX_RANGE_MS = 400 * 86_400_000
DEFAULT_RANGE_MS = 3_600_000
MAX_GROUP_BY = 3
MAX_FILTERS = 8
MAX_FILTER_VALUE_LEN = 256
MAX_TOP = 100
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
FILTER_PREFIX = "where."

_ATTRIBUTE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_KNOWN_PARAMS = frozenset(
    {"tenant", "type", "from", "to", "resolution", "metric", "group_by", "top", "limit", "cursor"}
)
# The checksum only catches edited or truncated cursors; a forged one can only move the
# page start, and every query stays bound to the caller's tenant, so no secret is needed.
_CHECKSUM_LEN = 8


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the next page of raw events starts: strictly after (ts_ms, event_id)."""

    ts_ms: int
    event_id: str


@dataclass(frozen=True, slots=True)
class SeriesRequest:
    """One checked time-series request, with the resolution already chosen."""

    tenant: str
    type: str
    from_ms: int
    to_ms: int
    resolution: str
    metric: str = "count"
    group_by: tuple[str, ...] = ()
    filters: tuple[tuple[str, str], ...] = ()
    top: int | None = None
    limit: int = DEFAULT_LIMIT
    cursor: Cursor | None = None

    def bucket_bounds(self) -> tuple[int, int]:
        """The range widened to whole buckets: start floored, end ceiled (ms, [start, end))."""
        size = BUCKET_MS[self.resolution]
        return _floor(self.from_ms, size), -_floor(-self.to_ms, size)

    def table(self) -> str:
        """The stored table kind this request's resolution reads."""
        return _TABLES[self.resolution]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _floor(value: int, size: int) -> int:
    return value // size * size


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def _describe(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def encode_cursor(ts_ms: int, event_id: str) -> str:
    """Opaque, URL-safe token for the raw-search position after (ts_ms, event_id)."""
    payload = json.dumps([ts_ms, event_id], separators=(",", ":")).encode()
    digest = hashlib.sha256(payload).digest()[:_CHECKSUM_LEN]
    return base64.urlsafe_b64encode(digest + payload).decode().rstrip("=")


def decode_cursor(token: str) -> Cursor | FieldError:
    """Read a token from `encode_cursor`; anything else is a FieldError on 'cursor'."""
    bad = FieldError(None, "cursor", "is not a cursor this API returned; start again without it")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return bad
    digest, payload = raw[:_CHECKSUM_LEN], raw[_CHECKSUM_LEN:]
    if hashlib.sha256(payload).digest()[:_CHECKSUM_LEN] != digest:
        return bad
    try:
        ts_ms, event_id = json.loads(payload)
    except (ValueError, TypeError):
        return bad
    if type(ts_ms) is not int or not isinstance(event_id, str):
        return bad
    return Cursor(ts_ms, event_id)


def choose_resolution(
    from_ms: int, to_ms: int, requested: str, max_points: int
) -> str | FieldError:
    """The resolution to read, or a FieldError on 'resolution' when none fits.

    ``auto`` picks the finest of raw (ranges up to 15 minutes only), 1m, 1h and 1d whose
    aligned bucket count over the range is at most ``max_points``. An explicit bucketed
    resolution must fit too; explicit raw always fits because raw results are paged.
    """
    if requested not in (AUTO, *RESOLUTIONS):
        return FieldError(
            None, "resolution", f"expected auto, raw, 1m, 1h or 1d, got {requested!r}"
        )
    if requested == RAW:
        return RAW
    if requested == AUTO and to_ms - from_ms <= MAX_RAW_RANGE_MS:
        return RAW
    fitting = [r for r in RESOLUTIONS[1:] if _points(from_ms, to_ms, r) <= max_points]
    if requested == AUTO and fitting:
        return fitting[0]
    if requested in fitting:
        return requested
    shown = requested if requested != AUTO else DAY
    hint = f"use {fitting[0]} or narrow the range" if fitting else "narrow the range"
    return FieldError(
        None,
        "resolution",
        f"{shown} gives {_points(from_ms, to_ms, shown):,} points over {_iso(from_ms)} to "
        f"{_iso(to_ms)}, more than {max_points:,}: {hint}",
    )


def _points(from_ms: int, to_ms: int, resolution: str) -> int:
    size = BUCKET_MS[resolution]
    return -(-to_ms // size) - from_ms // size


def parse_series_request(
    params: Mapping[str, str], *, now_ms: int, max_points: int = 1500
) -> SeriesRequest | list[FieldError]:
    """Check every parameter of a time-series request.

    Returns:
        The typed request, or every problem found, each naming its parameter.
    """
    errors: list[FieldError] = []
    for field in ("tenant", "type"):
        if field not in params:
            errors.append(FieldError(None, field, "is required but missing"))
        elif (problem := name_problem(field, params[field])) is not None:
            errors.append(FieldError(None, field, problem))
    errors.extend(
        FieldError(None, key[:80], "is not a parameter of this endpoint")
        for key in sorted(params)
        if key not in _KNOWN_PARAMS and not key.startswith(FILTER_PREFIX)
    )
    from_ms, to_ms = _time_range(params, now_ms, errors)
    requested = _choice(params, "resolution", (AUTO, *RESOLUTIONS), AUTO, errors)
    metric = _choice(params, "metric", METRICS, "count", errors)
    group_by = _group_by(params.get("group_by", ""), errors)
    filters = _filters(params, errors)
    top = _int_param(params, "top", None, MAX_TOP, errors)
    if top is not None and not group_by:
        errors.append(FieldError(None, "top", "keeps the largest groups: it needs group_by"))
    limit = _int_param(params, "limit", DEFAULT_LIMIT, MAX_LIMIT, errors)
    cursor = _cursor(params, errors)
    if errors:
        return errors
    resolution = choose_resolution(from_ms, to_ms, requested, max_points)
    if isinstance(resolution, FieldError):
        return [resolution]
    if cursor is not None and resolution != RAW:
        return [FieldError(None, "cursor", f"pages raw events only, not {resolution} buckets")]
    return SeriesRequest(
        tenant=params["tenant"],
        type=params["type"],
        from_ms=from_ms,
        to_ms=to_ms,
        resolution=resolution,
        metric=metric,
        group_by=group_by,
        filters=filters,
        top=top,
        limit=limit or DEFAULT_LIMIT,
        cursor=cursor,
    )


def time_param(
    params: Mapping[str, str], name: str, default_ms: int, errors: list[FieldError]
) -> int:
    """A time parameter (epoch seconds, or RFC 3339) in epoch ms; a problem is added to
    ``errors`` (and the default returned) when it is neither."""
    if name not in params:
        return default_ms
    value: str | float = params[name]
    # Digits mean epoch seconds; anything else is read as RFC 3339.
    with contextlib.suppress(ValueError):
        value = float(value)
    try:
        return parse_event_time(value)
    except ValueError as exc:
        errors.append(FieldError(None, name, str(exc)))
        return default_ms


def _time_range(
    params: Mapping[str, str], now_ms: int, errors: list[FieldError]
) -> tuple[int, int]:
    before = len(errors)
    to_ms = time_param(params, "to", now_ms, errors)
    from_ms = time_param(params, "from", to_ms - DEFAULT_RANGE_MS, errors)
    if len(errors) > before:
        return from_ms, to_ms
    if from_ms >= to_ms:
        errors.append(FieldError(None, "from", f"expected before 'to' ({_iso(to_ms)})"))
    elif to_ms - from_ms > MAX_RANGE_MS:
        errors.append(FieldError(None, "from", "expected at most 400 days before 'to'"))
    return from_ms, to_ms


def _choice(
    params: Mapping[str, str],
    name: str,
    allowed: tuple[str, ...],
    default: str,
    errors: list[FieldError],
) -> str:
    value = params.get(name, default)
    if value not in allowed:
        errors.append(
            FieldError(None, name, f"expected one of {', '.join(allowed)}, got {_describe(value)}")
        )
        return default
    return value


def _attribute_problem(name: str) -> str | None:
    if _ATTRIBUTE_RE.match(name):
        return None
    return f"expected an attribute name {_ATTRIBUTE_RE.pattern}, got {_describe(name)}"


def _group_by(raw: str, errors: list[FieldError]) -> tuple[str, ...]:
    if raw == "":
        return ()
    names = tuple(part.strip() for part in raw.split(","))
    problems = [p for p in map(_attribute_problem, names) if p is not None]
    if len(names) > MAX_GROUP_BY:
        problems.append(f"expected at most {MAX_GROUP_BY} attributes, got {len(names)}")
    if len(set(names)) != len(names):
        problems.append("names an attribute twice")
    errors.extend(FieldError(None, "group_by", p) for p in problems)
    return () if problems else names


def _filters(params: Mapping[str, str], errors: list[FieldError]) -> tuple[tuple[str, str], ...]:
    keys = sorted(k for k in params if k.startswith(FILTER_PREFIX))
    if len(keys) > MAX_FILTERS:
        errors.append(FieldError(None, "where", f"expected at most {MAX_FILTERS} filters"))
    found: list[tuple[str, str]] = []
    for key in keys:
        attribute, value = key[len(FILTER_PREFIX) :], params[key]
        problem = _attribute_problem(attribute)
        if problem is None and len(value) > MAX_FILTER_VALUE_LEN:
            problem = f"expected a value of at most {MAX_FILTER_VALUE_LEN} characters"
        if problem is not None:
            errors.append(FieldError(None, key[:80], problem))
        found.append((attribute, value))
    return tuple(found)


def _int_param(
    params: Mapping[str, str],
    name: str,
    default: int | None,
    maximum: int,
    errors: list[FieldError],
) -> int | None:
    if name not in params:
        return default
    raw = params[name]
    if raw.isascii() and raw.isdigit() and 1 <= int(raw) <= maximum:
        return int(raw)
    errors.append(FieldError(None, name, f"expected a whole number 1 to {maximum}, got {raw!r}"))
    return default


def _cursor(params: Mapping[str, str], errors: list[FieldError]) -> Cursor | None:
    if "cursor" not in params:
        return None
    decoded = decode_cursor(params["cursor"])
    if isinstance(decoded, FieldError):
        errors.append(decoded)
        return None
    return decoded


# Per table: the time column, and how an attribute is read (its name bound as {key}).
_TIME_COLUMN = {TABLE_EVENTS: "ts"}
_ATTRIBUTE_EXPR = {TABLE_EVENTS: "JSONExtractString(payload, 'attributes', {key})"}


def bind_filters(request: SeriesRequest) -> tuple[str, dict[str, Any]]:
    """The WHERE fragment for a request, holding placeholders only, and its bound values.

    Aggregated tables are read over whole buckets (`SeriesRequest.bucket_bounds`), raw
    events over the exact range; raw reads continue after the cursor when there is one.
    """
    table = request.table()
    time_col = _TIME_COLUMN.get(table, "window_start")
    start, end = request.bucket_bounds()
    clauses = [
        "tenant = {tenant:String}",
        "type = {type:String}",
        f"{time_col} >= {{from:DateTime64(3)}}",
        f"{time_col} < {{to:DateTime64(3)}}",
    ]
    bound: dict[str, Any] = {
        "tenant": request.tenant,
        "type": request.type,
        "from": utc_datetime(start),
        "to": utc_datetime(end),
    }
    attribute_expr = _ATTRIBUTE_EXPR.get(table, "dims[{key}]")
    for i, (attribute, value) in enumerate(request.filters):
        key = attribute_expr.format(key=f"{{f{i}_key:String}}")
        clauses.append(f"{key} = {{f{i}_value:String}}")
        bound[f"f{i}_key"], bound[f"f{i}_value"] = attribute, value
    if request.cursor is not None:
        clauses.append("(ts, event_id) > ({cursor_ts:DateTime64(3)}, {cursor_id:String})")
        bound["cursor_ts"] = utc_datetime(request.cursor.ts_ms)
        bound["cursor_id"] = request.cursor.event_id
    return " AND ".join(clauses), bound


def utc_datetime(ms: int) -> datetime:
    """Epoch milliseconds as an aware UTC datetime (as ClickHouse parameters take them)."""
    # Integer arithmetic: a float division could round a bound off by a millisecond.
    return _EPOCH + timedelta(milliseconds=ms)
