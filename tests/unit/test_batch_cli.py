"""The batch commands refuse bad arguments before they touch the cluster, saying what
to change (`rayline` prints a RaylineError as one line and exits 2)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from core.exceptions import InvalidInputError

SPAN = ["--from", "2026-12-01T00:00:00Z", "--to", "2026-12-02T00:00:00Z"]


@pytest.mark.parametrize(
    ("command", "args", "says"),
    [
        ("sessions", ["--from", "2026-12-02T00:00:00Z", "--to", "2026-12-01T00:00:00Z"],
         "must come after"),
        ("sessions", ["--from", "yesterday", "--to", "2026-12-01T00:00:00Z"], "--from 'yesterday'"),
        ("sessions", [*SPAN, "--gap", "soon"], "a duration such as 30s"),
        ("sessions", [*SPAN, "--gap", "0s"], "above zero"),
        ("sessions", [*SPAN, "--engine", "flink"], "one of ray, spark"),
        ("verify", ["--from", "2026-12-02T00:00:00Z", "--to", "2026-12-02T00:00:00Z"],
         "must come after"),
        ("verify", ["--from", "2026-13-01", "--to", "2026-12-02T00:00:00Z"], "--from '2026-13-01'"),
        ("verify", ["--from", "0", "--to", "2026-12-02T00:00:00Z"], "epoch seconds, not"),
    ],
)  # fmt: skip
def test_a_bad_range_gap_or_engine_is_refused_saying_what_to_change(
    command: str, args: list[str], says: str
) -> None:
    result = CliRunner().invoke(app, [command, *args])
    assert isinstance(result.exception, InvalidInputError), result.output
    assert says in str(result.exception)


@pytest.mark.parametrize("command", ["sessions", "verify"])
def test_options_out_of_range_are_refused_by_the_parser(command: str) -> None:
    result = CliRunner().invoke(app, [command, *SPAN, "--limit", "-1"])
    assert result.exit_code == 2
    assert "--limit" in result.output
