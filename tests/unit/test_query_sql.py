"""The query API's SQL: values only as placeholders, parts split where tables are sealed."""

from __future__ import annotations

import re

import pytest

from core.query_plan import SeriesRequest, parse_series_request
from core.query_sql import (
    METRIC_SQL,
    Sealed,
    events_statement,
    series_statement,
    summary_statement,
)

H, D, M = 3_600_000, 86_400_000, 60_000
NOW = 1_795_000_000_000 // D * D
HOSTILE = "x'); DROP TABLE events; --"


def request(**params: str) -> SeriesRequest:
    parsed = parse_series_request({"tenant": "acme", "type": "click", **params}, now_ms=NOW)
    assert not isinstance(parsed, list), parsed
    return parsed


def span(hours: float, end: int = NOW) -> dict[str, str]:
    return {"from": str((end - int(hours * H)) / 1000), "to": str(end / 1000)}


SEALED = Sealed(minute=NOW - 10 * M, hour=NOW - 2 * H, day=NOW - D)


@pytest.mark.parametrize(
    ("params", "tables"),
    [
        # all of the range sealed in the resolution's own table: one part
        ({"resolution": "1h", **span(24, NOW - 3 * H)}, ["rollup_1h"]),
        # own table, then sealed minutes, then the raw tail
        ({"resolution": "1h", **span(24)}, ["rollup_1h", "windows_1m", "events"]),
        ({"resolution": "1m", **span(3)}, ["windows_1m", "events"]),
        ({"resolution": "1d", **span(72)}, ["rollup_1d", "windows_1m", "events"]),
        # nothing sealed in range: raw only
        ({"resolution": "1m", **span(0.1)}, ["events"]),
    ],
)
def test_a_series_reads_each_table_only_where_it_is_sealed(
    params: dict[str, str], tables: list[str]
) -> None:
    statement = series_statement(request(**params), SEALED, "rl")
    read = re.findall(r"FROM rl\.(\w+)", statement.sql)
    assert read == tables
    starts = sorted(v for k, v in statement.parameters.items() if k.endswith("_from"))
    ends = sorted(v for k, v in statement.parameters.items() if k.endswith("_to"))
    assert starts[1:] == ends[:-1], "the parts must tile the range without gap or overlap"


@pytest.mark.parametrize("metric", sorted(METRIC_SQL))
def test_every_metric_merges_states(metric: str) -> None:
    statement = series_statement(request(metric=metric, resolution="1h", **span(24)), SEALED, "rl")
    assert f"{METRIC_SQL[metric]} AS value" in statement.sql


@pytest.mark.parametrize(
    "build",
    [
        lambda: series_statement(
            request(
                resolution="1m", group_by="region", top="3", **span(2), **{"where.region": HOSTILE}
            ),
            SEALED,
            "rl",
        ),
        lambda: summary_statement(
            request(resolution="1h", group_by="region", **span(30), **{"where.plan": HOSTILE}),
            SEALED,
            "rl",
        ),
        lambda: events_statement(
            request(resolution="raw", **span(0.2), **{"where.a": HOSTILE}), "rl"
        ),
    ],
)
def test_values_only_travel_as_parameters(build: object) -> None:
    statement = build()  # type: ignore[operator]
    assert HOSTILE not in statement.sql
    assert "acme" not in statement.sql
    assert "click" not in statement.sql
    assert HOSTILE in statement.parameters.values()
    placeholders = set(re.findall(r"\{(\w+):", statement.sql))
    assert placeholders == set(statement.parameters)


def test_top_n_keeps_the_largest_groups_by_the_same_metric() -> None:
    statement = series_statement(
        request(resolution="1h", group_by="region", top="2", metric="sum", **span(24)), SEALED, "rl"
    )
    assert "ORDER BY sum(value_sum) DESC, g0 LIMIT {top:UInt32}" in statement.sql
    assert statement.parameters["top"] == 2


def test_raw_paging_continues_after_the_cursor() -> None:
    first = request(resolution="raw", limit="5", **span(0.2))
    statement = events_statement(first, "rl")
    assert statement.parameters["limit"] == 6  # one more, to know a next page exists
    assert "cursor" not in statement.sql


@pytest.mark.parametrize(
    ("metric", "absent"),
    [
        ("count", ("entity_hll", "value_dd_pos", "value_sum")),
        ("p99", ("entity_hll", "value_min")),
        ("distinct", ("value_dd_pos", "value_dd_neg", "value_sum")),
    ],
)
def test_a_series_reads_only_the_states_its_metric_merges(
    metric: str, absent: tuple[str, ...]
) -> None:
    statement = series_statement(request(metric=metric, resolution="1h", **span(24)), SEALED, "rl")
    for column in absent:
        assert column not in statement.sql, column
