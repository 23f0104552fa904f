from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.envelope import FieldError
from core.query_plan import (
    TABLE_EVENTS,
    TABLE_ROLLUP_1D,
    TABLE_ROLLUP_1H,
    TABLE_WINDOWS_1M,
    Cursor,
    SeriesRequest,
    bind_filters,
    choose_resolution,
    decode_cursor,
    encode_cursor,
    parse_series_request,
)

NOW = 1_795_931_400_000  # 2026-11-29T05:50:00Z
MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
BASE = {"tenant": "acme", "type": "page_view"}


def _parse(**params: str) -> SeriesRequest:
    result = parse_series_request({**BASE, **params}, now_ms=NOW)
    assert isinstance(result, SeriesRequest), result
    return result


def _fields(params: dict[str, str]) -> list[str]:
    result = parse_series_request(params, now_ms=NOW)
    assert isinstance(result, list), result
    return sorted(e.field for e in result)


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms // 1000, tz=UTC).replace(microsecond=ms % 1000 * 1000)


def test_defaults_are_the_last_hour_by_minute_counts() -> None:
    request = _parse()
    assert (request.from_ms, request.to_ms) == (NOW - HOUR, NOW)
    assert (request.resolution, request.metric, request.table()) == ("1m", "count", "windows_1m")
    assert (request.group_by, request.filters, request.top, request.cursor) == ((), (), None, None)
    assert request.limit == 100


@pytest.mark.parametrize(
    ("params", "check"),
    [
        ({"from": "2026-11-29T00:00:00Z", "to": "2026-11-29T02:00:00+01:00"}, "from_ms"),
        ({"from": "1795910400", "to": "1795914000.5"}, "to_ms"),
        ({"metric": "p99"}, "metric"),
        ({"group_by": "country, plan,_x9"}, "group_by"),
        ({"group_by": "country", "top": "100"}, "top"),
        ({"where.country": "NZ", "where.plan": ""}, "filters"),
        ({"resolution": "raw", "limit": "1000"}, "limit"),
    ],
)
def test_good_parameter_sets(params: dict[str, str], check: str) -> None:
    expected: dict[str, Any] = {
        "from_ms": 1_795_910_400_000,
        "to_ms": 1_795_914_000_500,
        "metric": "p99",
        "group_by": ("country", "plan", "_x9"),
        "top": 100,
        "filters": (("country", "NZ"), ("plan", "")),
        "limit": 1000,
    }
    assert getattr(_parse(**params), check) == expected[check]


@pytest.mark.parametrize(
    ("params", "fields"),
    [
        ({}, ["tenant", "type"]),
        ({**BASE, "tenant": "ac me"}, ["tenant"]),
        ({**BASE, "type": "a'b"}, ["type"]),
        ({**BASE, "from": "yesterday"}, ["from"]),
        ({**BASE, "to": "2026-11-29T05:50:00"}, ["to"]),
        ({**BASE, "to": "1795931400000"}, ["to"]),
        ({**BASE, "from": "nan"}, ["from"]),
        ({**BASE, "from": "1795931400", "to": "1795931400"}, ["from"]),
        ({**BASE, "from": "1700000000", "to": "1795931400"}, ["from"]),
        ({**BASE, "resolution": "5m"}, ["resolution"]),
        ({**BASE, "metric": "median"}, ["metric"]),
        ({**BASE, "group_by": "a,b,c,d"}, ["group_by"]),
        ({**BASE, "group_by": "9lives"}, ["group_by"]),
        ({**BASE, "group_by": "a,,b"}, ["group_by"]),
        ({**BASE, "group_by": "a,a"}, ["group_by"]),
        ({**BASE, "where.bad-name": "x"}, ["where.bad-name"]),
        ({**BASE, "where.note": "x" * 257}, ["where.note"]),
        ({**BASE, **{f"where.a{i}": "x" for i in range(9)}}, ["where"]),
        ({**BASE, "top": "3"}, ["top"]),
        ({**BASE, "group_by": "a", "top": "0"}, ["top"]),
        ({**BASE, "group_by": "a", "top": "101"}, ["top"]),
        ({**BASE, "limit": "-1"}, ["limit"]),
        ({**BASE, "limit": "١٠"}, ["limit"]),
        ({**BASE, "cursor": "not a cursor"}, ["cursor"]),
        ({**BASE, "groupby": "a"}, ["groupby"]),
        (
            {"tenant": "", "metric": "x", "top": "x", "cursor": "x"},
            ["cursor", "metric", "tenant", "top", "type"],
        ),
    ],
)
def test_bad_parameter_sets_name_every_bad_field(params: dict[str, str], fields: list[str]) -> None:
    assert _fields(params) == fields


def test_errors_are_field_errors_with_readable_messages() -> None:
    result = parse_series_request({**BASE, "from": "yesterday"}, now_ms=NOW)
    assert isinstance(result, list)
    assert result == [FieldError(None, "from", result[0].message)]
    assert "RFC 3339" in result[0].message


def test_cursor_on_a_bucketed_series_is_refused() -> None:
    assert _fields({**BASE, "cursor": encode_cursor(NOW, "e-1")}) == ["cursor"]


@pytest.mark.parametrize(
    ("span_ms", "max_points", "expected"),
    [
        (15 * MIN, 1500, "raw"),
        (15 * MIN + 1, 1500, "1m"),
        (1500 * MIN, 1500, "1m"),
        (1500 * MIN + 1, 1500, "1h"),
        (1500 * HOUR, 1500, "1h"),
        (1500 * HOUR + 1, 1500, "1d"),
        (400 * DAY, 1500, "1d"),
        (2 * HOUR, 60, "1h"),
    ],
)
def test_auto_picks_the_finest_resolution_that_fits(
    span_ms: int, max_points: int, expected: str
) -> None:
    start = 1_795_910_400_000  # midnight, so every resolution is aligned
    assert choose_resolution(start, start + span_ms, "auto", max_points) == expected


def test_explicit_resolution_too_fine_suggests_one_that_fits() -> None:
    start = 1_795_910_400_000
    result = choose_resolution(start, start + 2000 * DAY, "1m", 100_000)
    assert isinstance(result, FieldError)
    assert result.field == "resolution"
    assert result.message == (
        "1m gives 2,880,000 points over 2026-11-29T00:00:00Z to 2032-05-21T00:00:00Z, "
        "more than 100,000: use 1h or narrow the range"
    )


def test_nothing_fits_says_narrow_the_range() -> None:
    result = choose_resolution(0, 400 * DAY, "auto", 10)
    assert isinstance(result, FieldError)
    assert result.message.endswith("more than 10: narrow the range")


def test_explicit_resolutions_are_kept_when_they_fit() -> None:
    assert choose_resolution(NOW - 30 * DAY, NOW, "raw", 1) == "raw"
    assert choose_resolution(NOW - DAY, NOW, "1h", 1500) == "1h"
    assert _parse(resolution="1d").table() == TABLE_ROLLUP_1D


def test_parse_reports_resolution_that_exceeds_max_points() -> None:
    params = {**BASE, "from": "1780000000", "resolution": "1m"}
    assert _fields(params) == ["resolution"]


@pytest.mark.parametrize(
    ("resolution", "table", "bounds"),
    [
        ("raw", TABLE_EVENTS, (NOW - 90 * MIN + 1, NOW - 1)),
        ("1m", TABLE_WINDOWS_1M, (NOW - 90 * MIN, NOW)),
        ("1h", TABLE_ROLLUP_1H, (NOW - 110 * MIN, NOW + 10 * MIN)),
        ("1d", TABLE_ROLLUP_1D, (1_795_910_400_000, 1_795_996_800_000)),
    ],
)
def test_bucket_bounds_widen_to_whole_buckets(
    resolution: str, table: str, bounds: tuple[int, int]
) -> None:
    request = SeriesRequest("acme", "t", NOW - 90 * MIN + 1, NOW - 1, resolution)
    assert request.table() == table
    assert request.bucket_bounds() == bounds


@given(st.integers(0, 4_000_000_000_000), st.integers(1, 50 * DAY))
def test_bucket_bounds_cover_the_range_with_aligned_edges(start: int, span: int) -> None:
    for resolution, size in (("1m", MIN), ("1h", HOUR), ("1d", DAY)):
        low, high = SeriesRequest("a", "t", start, start + span, resolution).bucket_bounds()
        assert low <= start < start + span <= high
        assert low % size == 0
        assert high % size == 0
        assert high - low < span + 2 * size


@given(st.integers(0, 4_102_444_800_000), st.text(max_size=200))
def test_cursor_round_trips(ts_ms: int, event_id: str) -> None:
    token = encode_cursor(ts_ms, event_id)
    # URL-safe: the token goes into a query string unescaped.
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert decode_cursor(token) == Cursor(ts_ms, event_id)


def test_cursor_on_a_raw_request_is_kept() -> None:
    request = _parse(resolution="raw", cursor=encode_cursor(NOW - 5, "e-9"))
    assert request.cursor == Cursor(NOW - 5, "e-9")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "%%%",
        "é",
        base64.urlsafe_b64encode(b'[1795931400000,"e-1"]').decode(),
        encode_cursor(NOW, "e-1")[:-3],
        encode_cursor(NOW, "e-1").replace("A", "B", 1) + "x",
    ],
)
def test_garbage_cursor_is_a_cursor_error(token: str) -> None:
    result = decode_cursor(token)
    assert isinstance(result, FieldError)
    assert result.field == "cursor"


@given(st.integers(0, 4_102_444_800_000), st.text(max_size=40), st.data())
def test_any_single_byte_change_breaks_the_cursor(ts_ms: int, event_id: str, data: Any) -> None:
    raw = bytearray(base64.urlsafe_b64decode(encode_cursor(ts_ms, event_id) + "=="))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    assert isinstance(decode_cursor(base64.urlsafe_b64encode(bytes(raw)).decode()), FieldError)


def test_bind_filters_shape_and_values() -> None:
    request = _parse(
        **{"from": "1795910400", "to": "1795914000", "where.country": "NZ", "resolution": "1h"}
    )
    fragment, bound = bind_filters(request)
    assert fragment == (
        "tenant = {tenant:String} AND type = {type:String} "
        "AND window_start >= {from:DateTime64(3)} AND window_start < {to:DateTime64(3)} "
        "AND dims[{f0_key:String}] = {f0_value:String}"
    )
    assert bound == {
        "tenant": "acme",
        "type": "page_view",
        "from": _utc(1_795_910_400_000),
        "to": _utc(1_795_914_000_000),
        "f0_key": "country",
        "f0_value": "NZ",
    }


def test_bind_filters_for_raw_events_pages_after_the_cursor() -> None:
    cursor = encode_cursor(NOW - 7, "e-1")
    fragment, bound = bind_filters(_parse(resolution="raw", cursor=cursor, **{"where.k": "v"}))
    assert "ts >= {from:DateTime64(3)}" in fragment
    assert "JSONExtractString(payload, 'attributes', {f0_key:String}) = {f0_value:String}" in (
        fragment
    )
    assert fragment.endswith("(ts, event_id) > ({cursor_ts:DateTime64(3)}, {cursor_id:String})")
    assert (bound["cursor_ts"], bound["cursor_id"]) == (_utc(NOW - 7), "e-1")
    assert (bound["from"], bound["to"]) == (_utc(NOW - HOUR), _utc(NOW))


HOSTILE = st.lists(
    st.sampled_from(["'", '"', "--", ";", "\\", "\x00", "}", "{", "ü", "😀", "a", " "]),
    min_size=1,
    max_size=30,
).map("".join)


@given(HOSTILE, HOSTILE, st.sampled_from(["raw", "1m", "1h", "1d"]))
def test_hostile_values_are_only_ever_bound(a: str, b: str, resolution: str) -> None:
    def plan(value: str, key: str) -> tuple[str, dict[str, Any]]:
        request = SeriesRequest(
            "acme", "t", NOW - HOUR, NOW, resolution, filters=((key, value), (value, "v"))
        )
        return bind_filters(request)

    fragment_a, bound_a = plan(a, "ka")
    fragment_b, bound_b = plan(b, "kb")
    # The SQL text is a function of the request's shape only, never of what was sent.
    assert fragment_a == fragment_b
    for marker in ("\x00", ";", "--", '"', "\\", "ü", "😀"):
        assert marker not in fragment_a
    assert (bound_a["f0_key"], bound_a["f0_value"], bound_a["f1_key"]) == ("ka", a, a)
    assert (bound_b["f0_key"], bound_b["f0_value"], bound_b["f1_key"]) == ("kb", b, b)


@pytest.mark.parametrize(
    "value", ["x' OR 1=1 --", "a;DROP TABLE events", "\x00", "ü😀", "{x:String}"]
)
def test_hostile_filter_value_through_the_whole_path(value: str) -> None:
    fragment, bound = bind_filters(_parse(**{"where.note": value}))
    plain, _ = bind_filters(_parse(**{"where.note": "ok"}))
    assert fragment == plain
    assert bound["f0_value"] == value
