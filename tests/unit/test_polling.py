"""core.polling: configuration, requests, cursor moves, stop conditions, retry waits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.egress import EgressRefused, origin
from core.exceptions import ConfigurationError, InvalidInputError
from core.polling import (
    PollConfig,
    Request,
    advance,
    backoff_delay,
    lookup,
    next_request,
    parse_link_header,
    parse_poll_config,
    parse_retry_after,
    records_of,
)

URL = "https://api.example.com/items"


def config(**extra: Any) -> PollConfig:
    return parse_poll_config("src", {"url": URL, **extra})


class FakeApi:
    """An in-memory paginated API over ``items`` ({id, updated}), as core.polling sees it.

    ``since`` keeps items whose ``updated`` is strictly greater.
    """

    def __init__(self, items: list[dict[str, Any]], size: int = 3) -> None:
        self.items = items
        self.size = size
        self.requests: list[dict[str, str]] = []

    def answer(self, request: Request) -> tuple[int, dict[str, str], Any]:
        parts = urlsplit(request.url)
        params = dict(parse_qsl(parts.query)) | dict(request.params)
        self.requests.append(params)
        rows = self.items
        if "since" in params:
            rows = [r for r in rows if r["updated"] > int(params["since"])]
        size = int(params.get("limit", self.size))
        if "page" in params:
            start = (int(params["page"]) - 1) * size
        elif "cursor" in params:
            start = int(params["cursor"])
        else:
            start = int(params.get("offset", 0))
        page = rows[start : start + size]
        more = start + size < len(rows)
        body = {"data": page, "next": str(start + size) if more else None}
        headers = {}
        if more:
            following = dict(params, offset=str(start + size))
            query = "&".join(f"{k}={v}" for k, v in following.items())
            headers["link"] = f'<{parts.path}?{query}>; rel="next", <{parts.path}>; rel="first"'
        return 200, headers, body


def poll(cfg: PollConfig, api: FakeApi, state: dict[str, Any]) -> tuple[list[Any], dict, str]:
    """One poll: pages until a stop condition; (delivered records, state, reason)."""
    delivered: list[Any] = []
    for pages in range(1000):
        request = next_request(cfg, state)
        status, headers, body = api.answer(request)
        step = advance(cfg, state, request, status, headers, body, pages)
        delivered += step.records
        state = step.state
        if step.done:
            return delivered, state, step.reason
    raise AssertionError("the poll never stopped")


def items(first: int, last: int) -> list[dict[str, Any]]:
    return [{"id": f"i{n}", "updated": 1000 + n} for n in range(first, last)]


PAGINATIONS = {
    "page": {"type": "page", "page_size": 3},
    "offset": {"type": "offset", "page_size": 3},
    "cursor": {"type": "cursor", "page_size": 3, "cursor_path": "$.next"},
    "link": {"type": "link", "page_size": 3},
}


@pytest.mark.parametrize("style", sorted(PAGINATIONS))
@pytest.mark.parametrize("total", [0, 1, 3, 7, 9])
def test_every_pagination_style_reads_each_record_once_then_only_new_ones(style, total):
    cfg = config(records_path="$.data", pagination=PAGINATIONS[style])
    api = FakeApi(items(0, total))
    first, state, _ = poll(cfg, api, {})
    assert [r["id"] for r in first] == [f"i{n}" for n in range(total)]
    again, state, _ = poll(cfg, api, state)
    assert again == [], "a second poll without new records delivered some again"
    api.items += items(total, total + 5)
    new, _, _ = poll(cfg, api, state)
    assert [r["id"] for r in new] == [f"i{n}" for n in range(total, total + 5)]


@pytest.mark.parametrize("style", sorted(PAGINATIONS))
def test_incremental_since_restarts_at_the_first_page_with_the_largest_value(style):
    cfg = config(
        records_path="$.data",
        pagination=PAGINATIONS[style],
        incremental={"param": "since", "path": "$.updated", "initial": 0},
    )
    api = FakeApi(items(0, 7))
    first, state, _ = poll(cfg, api, {})
    assert len(first) == 7
    assert state == {"since": 1006}
    api.items += items(7, 9)
    asked = len(api.requests)
    new, state, _ = poll(cfg, api, state)
    assert [r["id"] for r in new] == ["i7", "i8"]
    assert {r.get("since") for r in api.requests[asked:]} == {"1006"}
    assert state["since"] == 1008


def test_a_run_cut_by_max_pages_goes_on_from_where_it_stopped_and_keeps_since():
    cfg = config(
        records_path="$.data",
        pagination={"type": "page", "page_size": 2, "max_pages_per_poll": 2},
        incremental={"param": "since", "path": "$.updated", "initial": 0},
    )
    api = FakeApi(items(0, 7))
    state: dict[str, Any] = {}
    seen: list[str] = []
    reasons = []
    for _ in range(3):
        got, state, reason = poll(cfg, api, state)
        seen += [r["id"] for r in got]
        reasons.append(reason)
    assert reasons == ["max pages per poll", "short page", "empty page"]
    assert seen == [f"i{n}" for n in range(7)]
    assert {r["since"] for r in api.requests[:4]} == {"0"}, "since moved in the middle of a run"
    assert api.requests[4]["since"] == "1006"


STOPS = [
    # (pagination, state, status, headers, body, pages_done) -> (done, reason, new state)
    (
        {"type": "page", "page_size": 2},
        {},
        200,
        {},
        {"items": [1, 2]},
        0,
        (False, "", {"page": 2, "skip": 0}),
    ),
    (
        {"type": "page", "page_size": 2},
        {"page": 4},
        200,
        {},
        {"items": [1]},
        0,
        (True, "short page", {"page": 4, "skip": 1}),
    ),
    (
        {"type": "page", "page_size": 2},
        {"page": 4, "skip": 1},
        200,
        {},
        {"items": []},
        0,
        (True, "empty page", {"page": 4, "skip": 1}),
    ),
    (
        {"type": "offset", "page_size": 2},
        {"offset": 6},
        200,
        {},
        {"items": [1, 2]},
        0,
        (False, "", {"offset": 8}),
    ),
    (
        {"type": "offset", "page_size": 2},
        {"offset": 6},
        200,
        {},
        {"items": [1]},
        0,
        (True, "short page", {"offset": 7}),
    ),
    (
        {"type": "cursor", "cursor_path": "$.next"},
        {"cursor": "a"},
        200,
        {},
        {"items": [1], "next": "b"},
        0,
        (False, "", {"cursor": "b", "skip": 0}),
    ),
    (
        {"type": "cursor", "cursor_path": "$.next"},
        {"cursor": "a"},
        200,
        {},
        {"items": [1, 2], "next": None},
        0,
        (True, "no next cursor", {"cursor": "a", "skip": 2}),
    ),
    (
        {"type": "cursor", "cursor_path": "$.next"},
        {"cursor": "a"},
        200,
        {},
        {"items": [1], "next": "a"},
        0,
        (True, "no next cursor", {"cursor": "a", "skip": 1}),
    ),
    (
        {"type": "link"},
        {},
        200,
        {"link": '<?page=2>; rel="next"'},
        {"items": [1]},
        0,
        (False, "", {"url": URL + "?page=2", "skip": 0}),
    ),
    (
        {"type": "link"},
        {"url": URL + "?page=2"},
        200,
        {"link": '<?page=1>; rel="prev"'},
        {"items": [1]},
        0,
        (True, "no next link", {"url": URL + "?page=2", "skip": 1}),
    ),
    (
        {"type": "link", "max_pages_per_poll": 3},
        {},
        200,
        {"link": '<?page=2>; rel="next"'},
        {"items": [1]},
        2,
        (True, "max pages per poll", {"url": URL + "?page=2", "skip": 0}),
    ),
    ({"type": "none"}, {}, 200, {}, {"items": [1]}, 0, (True, "single request", {})),
    (
        {"type": "none"},
        {"etag": '"v1"'},
        304,
        {},
        None,
        0,
        (True, "not modified", {"etag": '"v1"'}),
    ),
]


@pytest.mark.parametrize(
    ("pagination", "state", "status", "headers", "body", "done_", "want"), STOPS
)
def test_stop_conditions(pagination, state, status, headers, body, done_, want):
    cfg = config(records_path="$.items", pagination=pagination, etag=False)
    request = next_request(cfg, state)
    step = advance(cfg, state, request, status, headers, body, done_)
    assert (step.done, step.reason, step.state) == want


REQUESTS = [
    # (config extras, state) -> params of the request
    ({}, {}, {}),
    ({"params": {"state": "open"}}, {}, {"state": "open"}),
    ({"pagination": {"type": "page", "page_size": 50}}, {}, {"page": "1", "limit": "50"}),
    (
        {"pagination": {"type": "page", "page_size": 50, "first_page": 0, "page_param": "p"}},
        {},
        {"p": "0", "limit": "50"},
    ),
    (
        {"pagination": {"type": "offset", "page_size": 10, "size_param": "per_page"}},
        {"offset": 30},
        {"offset": "30", "per_page": "10"},
    ),
    (
        {"pagination": {"type": "offset", "page_size": 10, "size_param": None}},
        {"offset": 30},
        {"offset": "30"},
    ),
    ({"pagination": {"type": "cursor", "cursor_path": "$.n"}}, {}, {}),
    (
        {"pagination": {"type": "cursor", "cursor_path": "$.n", "cursor_param": "after"}},
        {"cursor": "xyz"},
        {"after": "xyz"},
    ),
    ({"incremental": {"param": "since", "path": "$.u"}}, {}, {}),
    ({"incremental": {"param": "since", "path": "$.u", "initial": 5}}, {}, {"since": "5"}),
    (
        {"incremental": {"param": "updated_after", "path": "$.u"}},
        {"since": "2026-01-01T00:00:00Z"},
        {"updated_after": "2026-01-01T00:00:00Z"},
    ),
]


@pytest.mark.parametrize(("extra", "state", "want"), REQUESTS)
def test_next_request_parameters(extra, state, want):
    request = next_request(config(**extra), state)
    assert request.url == URL
    assert dict(request.params) == want


def test_a_link_position_is_requested_as_it_is_and_carries_the_headers():
    cfg = config(pagination={"type": "link", "page_size": 5}, headers={"Authorization": "t"})
    request = next_request(cfg, {"url": "https://api.example.com/items?page=3&limit=5"})
    assert (request.url, request.params) == ("https://api.example.com/items?page=3&limit=5", ())
    assert ("Authorization", "t") in request.headers


def test_etag_is_sent_only_with_the_request_it_answered():
    cfg = config(pagination={"type": "none"})
    first = next_request(cfg, {})
    step = advance(cfg, {}, first, 200, {"etag": 'W/"abc"'}, [{"id": 1}], 0)
    again = next_request(cfg, step.state)
    assert ("If-None-Match", 'W/"abc"') in again.headers
    other = next_request(config(pagination={"type": "none"}, params={"q": "x"}), step.state)
    assert all(name != "If-None-Match" for name, _ in other.headers)
    not_modified = advance(cfg, step.state, again, 304, {}, None, 0)
    assert (not_modified.records, not_modified.state) == ([], step.state)


def test_etag_off_sends_no_condition():
    cfg = config(etag=False)
    step = advance(cfg, {}, next_request(cfg, {}), 200, {"etag": '"1"'}, [], 0)
    assert "etag" not in step.state


def test_headers_are_not_in_the_repr_of_a_config_or_request():
    cfg = config(headers={"Authorization": "Bearer s3cr3t"})
    assert "s3cr3t" not in repr(cfg)
    assert "s3cr3t" not in repr(next_request(cfg, {}))


LINKS = [
    ('<https://a/x?page=2>; rel="next"', {"next": "https://a/x?page=2"}),
    (
        '<https://a/x?page=2>; rel="next", <https://a/x?page=9>; rel="last"',
        {"next": "https://a/x?page=2", "last": "https://a/x?page=9"},
    ),
    ("<https://a/x?p=2>; rel=next", {"next": "https://a/x?p=2"}),
    (
        '</items?page=2>; rel="next prefetch"',
        {
            "next": "https://api.example.com/items?page=2",
            "prefetch": "https://api.example.com/items?page=2",
        },
    ),
    ('<https://a/x?a=1,2>; title="a, b"; rel="next"', {"next": "https://a/x?a=1,2"}),
    ('<https://a/x>; REL="Next"', {"next": "https://a/x"}),
    ("<https://a/x>; title=none", {}),
    ("", {}),
    (None, {}),
]


@pytest.mark.parametrize(("header", "want"), LINKS)
def test_rfc8288_link_header(header, want):
    assert parse_link_header(header, URL) == want


NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
RETRY_AFTER = [
    ("1", 1.0),
    ("0", 0.0),
    (" 120 ", 120.0),
    ("1.5", 1.5),
    ("99999", 300.0),
    (format_datetime(NOW + timedelta(seconds=30), usegmt=True), 30.0),
    (format_datetime(NOW - timedelta(seconds=30), usegmt=True), 0.0),
    (format_datetime(NOW + timedelta(days=1), usegmt=True), 300.0),
    ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),
    ("-5", None),
    ("nan", None),
    ("soon", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize(("header", "want"), RETRY_AFTER)
def test_retry_after_forms(header, want):
    assert parse_retry_after(header, NOW.timestamp(), cap=300.0) == want


@given(
    attempt=st.integers(min_value=0, max_value=10_000),
    base=st.floats(min_value=0, max_value=60),
    cap=st.floats(min_value=0, max_value=3600),
    uniform=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_backoff_is_full_jitter_within_bounds(attempt, base, cap, uniform):
    delay = backoff_delay(attempt, base, cap, uniform)
    assert 0 <= delay <= cap
    assert delay <= base * 2.0 ** min(attempt, 62)
    assert delay == pytest.approx(min(cap, base * 2.0 ** min(attempt, 62)) * uniform)


def test_backoff_grows_then_stops_at_the_cap():
    delays = [backoff_delay(n, 0.5, 30, 0.999999) for n in range(10)]
    assert delays == sorted(delays)
    assert delays[0] == pytest.approx(0.5, rel=1e-5)
    assert delays[-1] == pytest.approx(30, rel=1e-5)


PATHS = [
    ("$", {"a": 1}, {"a": 1}),
    ("$.a.b", {"a": {"b": [1]}}, [1]),
    ("$.a[1].b", {"a": [{}, {"b": 2}]}, 2),
    ("$.a[5]", {"a": [1]}, None),
    ("$.a.b", {"a": 3}, None),
    ("$.missing", {}, None),
]


@pytest.mark.parametrize(("path", "value", "want"), PATHS)
def test_lookup(path, value, want):
    assert lookup(value, path) == want


def test_records_path_that_finds_no_list_says_where_it_looked():
    with pytest.raises(InvalidInputError, match=r"'\$\.data'.*found dict"):
        records_of(config(records_path="$.data"), {"data": {"items": []}})


CONFIG_ERRORS = [
    ({}, "'url' expected an http:// or https:// URL, got None"),
    ({"url": "ftp://x"}, "'url' expected an http"),
    ({"url": URL, "interval": 5}, "unknown key(s) ['interval'] in config"),
    ({"url": URL, "interval_seconds": 0}, "'interval_seconds' expected a number >= 0.1"),
    ({"url": URL, "interval_seconds": "5"}, "'interval_seconds' expected a number"),
    ({"url": URL, "headers": ["x"]}, "'headers' expected an object of string values"),
    ({"url": URL, "records_path": "data"}, "'records_path' expected a path such as $"),
    ({"url": URL, "pagination": {"type": "pages"}}, "'pagination.type' expected one of"),
    ({"url": URL, "pagination": {"type": "page"}}, "'pagination.page_size' expected an integer"),
    ({"url": URL, "pagination": {"type": "offset", "page_size": 0}}, "'page_size' expected"),
    ({"url": URL, "pagination": {"type": "cursor"}}, "'pagination.cursor_path' expected a path"),
    ({"url": URL, "pagination": {"type": "link", "size": 3}}, "unknown key(s) ['size']"),
    ({"url": URL, "pagination": {"max_pages_per_poll": 0}}, "'max_pages_per_poll' expected"),
    ({"url": URL, "incremental": {"param": "since"}}, "'path' expected a non-empty string"),
    ({"url": URL, "incremental": {"path": "$.u"}}, "'param' expected a non-empty string"),
    ({"url": URL, "incremental": "since"}, "'incremental' expected a JSON object"),
    ({"url": URL, "etag": "yes"}, "'etag' expected true or false"),
    ({"url": URL, "max_retries": -1}, "'max_retries' expected an integer >= 0"),
    (
        {"url": URL, "backoff_base_seconds": 10, "backoff_max_seconds": 1},
        "'backoff_max_seconds' expected a number >= backoff_base_seconds",
    ),
]


@pytest.mark.parametrize(("spec", "fragment"), CONFIG_ERRORS)
def test_config_errors_name_the_source_and_the_key(spec, fragment):
    with pytest.raises(ConfigurationError) as info:
        parse_poll_config("github-issues", spec)
    assert "poll source 'github-issues'" in str(info.value)
    assert fragment in str(info.value)


def test_a_bad_header_value_is_not_echoed_in_the_error():
    with pytest.raises(ConfigurationError) as info:
        parse_poll_config("s", {"url": URL, "headers": {"Authorization": {"token": "s3cr3t"}}})
    assert "s3cr3t" not in str(info.value)


def test_defaults():
    cfg = parse_poll_config("s", {"url": URL})
    assert (cfg.interval_seconds, cfg.records_path, cfg.pagination.type, cfg.etag) == (
        60.0,
        "$",
        "none",
        True,
    )
    assert cfg.incremental is None


@pytest.mark.parametrize(
    ("link", "followed"),
    [
        ("<?page=2>", True),
        ("</other/path?page=2>", True),
        ("<https://api.example.com:443/items?page=2>", True),
        ("<https://collector.example/steal>", False),
        ("<http://api.example.com/items?page=2>", False),
        ("<https://api.example.com:8443/items?page=2>", False),
        ("<//collector.example/items>", False),
        ("<http://169.254.169.254/latest/meta-data/>", False),
    ],
)
def test_a_next_link_is_followed_only_within_the_configured_origin(link, followed):
    cfg = config(
        pagination={"type": "link"},
        headers={"Authorization": "Bearer secret"},
        records_path="$.items",
    )
    request = next_request(cfg, {})
    headers = {"link": f'{link}; rel="next"'}
    if followed:
        step = advance(cfg, {}, request, 200, headers, {"items": [1]}, 0)
        assert origin(step.state["url"]) == ("https", "api.example.com", 443)
        return
    with pytest.raises(EgressRefused, match="leaves the source's origin") as info:
        advance(cfg, {}, request, 200, headers, {"items": [1]}, 0)
    assert "secret" not in str(info.value)


def test_a_foreign_link_matters_only_to_link_pagination():
    cfg = config(pagination={"type": "offset", "page_size": 1})
    headers = {"link": '<https://collector.example/x>; rel="next"'}
    step = advance(cfg, {}, next_request(cfg, {}), 200, headers, [{"id": 1}], 0)
    assert step.state == {"offset": 1}
