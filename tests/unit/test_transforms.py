"""Transforms, the expression language and enrichment of core.transforms.

The expression evaluator is checked against a per-row Python interpreter of the same
syntax trees (written here, independently), on random tables and random expressions.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.transforms import (
    MAX_EXPRESSION_DEPTH,
    MAX_EXPRESSION_LENGTH,
    Cast,
    Derive,
    DimensionCache,
    EnrichmentSpec,
    Filter,
    Rename,
    TransformError,
    apply_transforms,
    enrich,
    parse_enrichment,
    parse_expression,
    parse_transforms,
    referenced_columns,
)


def batch(**columns: pa.Array | list[Any]) -> pa.Table:
    return pa.table(columns)


def run(table: pa.Table, *steps: Mapping[str, Any]) -> Any:
    return apply_transforms(table, parse_transforms(list(steps)))


def evaluate(table: pa.Table, source: str) -> list[Any]:
    return list(parse_expression(source).evaluate(table).to_pylist())


EVENTS = batch(
    event_id=["e0", "e1", "e2", "e3", "e4"],
    type=["click", "debug", "view", "click", None],
    value=pa.array([1.5, -2.0, None, 0.0, 7.0], pa.float64()),
    entity=pa.array(["d1", "d2", None, "d9", "d1"], pa.string()),
    **{"attributes.temp_f": pa.array([32.0, 212.0, None, 50.0, 14.0], pa.float64())},
)


# --------------------------------------------------------------------------- parsing steps


def test_each_step_kind_parses_into_its_transform() -> None:
    steps = parse_transforms(
        [
            {"rename": {"from": "attributes.temp_c", "to": "temp"}},
            {"cast": {"field": "attributes.amount", "to": "float"}},
            {"derive": {"field": "value", "expr": "(attributes.temp_f - 32) * 5 / 9"}},
            {"filter": "type != 'debug' and value >= 0"},
        ]
    )
    assert [type(s) for s in steps] == [Rename, Cast, Derive, Filter]
    assert [s.index for s in steps] == [0, 1, 2, 3]
    assert steps[0] == Rename(0, "attributes.temp_c", "temp")
    assert steps[1] == Cast(1, "attributes.amount", "float")
    assert isinstance(steps[2], Derive)
    assert steps[2].expr.columns == {"attributes.temp_f"}
    assert isinstance(steps[3], Filter)
    assert steps[3].expr.columns == {"type", "value"}


@pytest.mark.parametrize(
    ("steps", "fragments"),
    [
        pytest.param([["rename"]], ["step 0", "exactly one of the keys", "got list"], id="list"),
        pytest.param([{}], ["step 0", "got keys []"], id="empty"),
        pytest.param(
            [{"filter": "x > 1"}, {"renam": {"from": "a", "to": "b"}}],
            ["step 1", "got keys ['renam']", "did you mean 'rename'"],
            id="typo",
        ),
        pytest.param(
            [{"filter": "x > 1", "derive": {"field": "a", "expr": "1"}}],
            ["step 0", "got keys ['filter', 'derive']"],
            id="two-keys",
        ),
        pytest.param(
            [{"rename": {"from": "a"}}],
            ["step 0 (rename)", "'rename.to'", "Field required", '"to": "temp"'],
            id="missing-field",
        ),
        pytest.param(
            [{"rename": {"from": "a", "to": "b", "as": "c"}}],
            ["'rename.as'", "Extra inputs are not permitted", "got 'c'"],
            id="extra-field",
        ),
        pytest.param(
            [{"cast": {"field": "a", "to": "double"}}],
            ["step 0 (cast)", "'cast.to'", "'float', 'int', 'string' or 'bool'", "got 'double'"],
            id="cast-target",
        ),
        pytest.param(
            [{"cast": {"field": "", "to": "int"}}],
            ["'cast.field'", "at least 1 character", "got ''"],
            id="empty-name",
        ),
        pytest.param(
            [{"filter": 3}], ["step 0 (filter)", "'filter'", "valid string", "got 3"], id="not-str"
        ),
        pytest.param(
            [{"derive": {"field": "a", "expr": "x[0]"}}],
            ["step 0 (derive)", "'derive.expr'", "subscript 'x[0]'", "Fix:"],
            id="bad-expr",
        ),
        pytest.param([{"filter": "value >"}], ["'filter'", "not valid syntax"], id="syntax"),
    ],
)
def test_malformed_steps_are_named_with_the_fix(steps: list[Any], fragments: list[str]) -> None:
    with pytest.raises(TransformError) as caught:
        parse_transforms(steps)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message
    assert "Fix:" in message


def test_steps_must_be_a_list() -> None:
    with pytest.raises(TransformError, match="expected a list of steps"):
        parse_transforms("filter: x")  # type: ignore[arg-type]


def test_transform_error_is_a_value_error() -> None:
    assert issubclass(TransformError, ValueError)


# --------------------------------------------------------------------------- hostile input

HOSTILE = [
    ("__import__('os')", "function '__import__' is not allowed"),
    ("().__class__", "attribute access on a non-name"),
    ("().__class__.__bases__[0].__subclasses__()", "not allowed"),
    ("x.__class__", "names starting with '__'"),
    ("__builtins__", "names starting with '__'"),
    ("x[0]", "subscript 'x[0]' is not allowed"),
    ("x[1:2]", "subscript"),
    ("lambda: 1", "lambda"),
    ("(lambda: 1)()", "call '(lambda: 1)()' is not allowed"),
    ("open('f')", "function 'open' is not allowed"),
    ("eval('1')", "function 'eval' is not allowed"),
    ("x.lower()", "call 'x.lower()' is not allowed"),
    ("[x for x in y]", "list comprehension"),
    ("{x for x in y}", "set comprehension"),
    ("(x for x in y)", "generator expression"),
    ("{k: 1 for k in y}", "dict comprehension"),
    ("f'{x}'", "f-string"),
    ("{'a': 1}", "dict literal"),
    ("[1, 2]", "list literal"),
    ("(x := 1)", "assignment expression"),
    ("a if b else c", "use if_else"),
    ("x ** 2", "operator '**'"),
    ("x << 2", "operator '<<'"),
    ("~x", "operator '~'"),
    ("+x", "operator 'unary +'"),
    ("concat(*x)", "starred argument"),
    ("round(x, ndigits=2)", "keyword arguments"),
    ("round(x, y)", "round() needs a literal int"),
    ("round(x, 99)", "round() needs a literal int"),
    ("lower(x, y)", "lower() takes 1 argument(s), got 2"),
    ("if_else(a, b)", "if_else() takes 3 argument(s), got 2"),
    ("coalesce()", "coalesce() takes 1 to any number argument(s), got 0"),
    ("x == None", "use is_null(x)"),
    ("None != x", "use is_null(x)"),
    ("x is None", "use is_null(x)"),
    ("x in (None, 1)", "use is_null(x)"),
    ("x in y", "'in' needs a literal list"),
    ("x in (1, 'a')", "mixes strings, numbers and booleans"),
    ("x in (1, 2) == y", "a literal list cannot be compared"),
    ("b'x'", "is not allowed (not an int64, float or string)"),
    ("1j", "literal '1j' is not allowed"),
    ("1e999", "is not allowed"),
    ("99999999999999999999", "not an int64"),
    ("", "not valid syntax"),
    ("value >", "not valid syntax"),
    ("x = 1", "not valid syntax"),
    ("import os", "not valid syntax"),
    ("\0", "not valid syntax"),
    ("(" * 300 + "x" + ")" * 300, "not valid syntax"),
    ("-" * 60 + "x", f"nests 61 levels deep; the limit is {MAX_EXPRESSION_DEPTH}"),
    ("not " * 60 + "x", "levels deep"),
    ("lower(" * 51 + "x" + ")" * 51, "levels deep"),
    ("x + " * 300 + "x", f"characters long; the limit is {MAX_EXPRESSION_LENGTH}"),
    ("'" + "a" * 2000 + "'", "characters long"),
]


@pytest.mark.parametrize(("source", "fragment"), HOSTILE)
def test_hostile_expressions_are_refused_at_parse_time(source: str, fragment: str) -> None:
    with pytest.raises(TransformError) as caught:
        parse_expression(source)
    message = str(caught.value)
    assert fragment in message
    assert repr(source)[:40] in message  # the expression itself is named
    assert len(message) < 400  # a hostile expression does not flood the log


@pytest.mark.parametrize(
    "source",
    [
        "value",
        "attributes.temp_f * 2",
        "a.b.c == 'x'",
        "-value",
        "not flag",
        "0 <= value < 10",
        "type in ['a', 'b'] or x not in (1, -2, 3.5)",
        "x in ()",
        "round(value)",
        "round(value, -2)",
        "coalesce(a, b, c, 0)",
        "if_else(x > 1, 'big', 'small')",
        "concat(lower(a), '-', upper(b))",
        "is_null(entity) and True",
        "abs(x) // 2 % 3",
    ],
)
def test_the_whitelist_is_accepted(source: str) -> None:
    parse_expression(source)


def test_expression_at_the_limits_is_accepted() -> None:
    wide = " or ".join(["x > 1"] * 100)  # a flat BoolOp: long but shallow
    assert len(wide) < MAX_EXPRESSION_LENGTH
    parse_expression(wide)
    parse_expression("-" * (MAX_EXPRESSION_DEPTH - 1) + "x")


def test_expression_columns_are_the_dotted_names_read() -> None:
    expr = parse_expression("lower(attributes.site) == type and coalesce(a.b.c, value) > 0")
    assert expr.columns == {"attributes.site", "type", "a.b.c", "value"}


# --------------------------------------------------------------------------- steps applied


def test_rename_moves_a_column_and_replaces_one_of_the_target_name() -> None:
    table = batch(a=[1, 2], b=["x", "y"], c=[0.5, 1.5])
    out = run(table, {"rename": {"from": "a", "to": "c"}}).table
    assert out.column_names == ["c", "b"]
    assert out.column("c").to_pylist() == [1, 2]


def test_rename_of_a_missing_column_gives_a_null_column() -> None:
    out = run(EVENTS, {"rename": {"from": "attributes.nope", "to": "temp"}}).table
    assert out.column("temp").to_pylist() == [None] * 5
    assert out.column("temp").type == pa.null()
    assert out.column_names[:-1] == EVENTS.column_names


def test_rename_to_itself_changes_nothing() -> None:
    assert run(EVENTS, {"rename": {"from": "value", "to": "value"}}).table.equals(EVENTS)


CASTS = [
    pytest.param(
        pa.array(["1.5", "abc", None, "-2e3", "+.5", "nan", "1e999", " 1", "7"]),
        "float",
        [1.5, None, -2000.0, 0.5, 7.0],
        {1: "'abc'", 5: "'nan'", 6: "'1e999'", 7: "' 1'"},
        id="string-float",
    ),
    pytest.param(
        pa.array(["42", "+7", "-0", "007", "1.0", "x", "9223372036854775807", "9" * 20, None]),
        "int",
        [42, 7, 0, 7, 9223372036854775807, None],
        {4: "'1.0'", 5: "'x'", 7: repr("9" * 20)},
        id="string-int",
    ),
    pytest.param(
        pa.array(["true", "FALSE", "1", "0", "yes", "", None]),
        "bool",
        [True, False, True, False, None],
        {4: "'yes'", 5: "''"},
        id="string-bool",
    ),
    pytest.param(
        pa.array([1.0, -2.0, 1.5, float("nan"), float("inf"), 1e19, None]),
        "int",
        [1, -2, None],
        {2: "1.5", 3: "nan", 4: "inf", 5: "1e+19"},
        id="float-int",
    ),
    pytest.param(pa.array([1, -3, None]), "float", [1.0, -3.0, None], {}, id="int-float"),
    pytest.param(pa.array([0, 2, None]), "bool", [False, True, None], {}, id="int-bool"),
    pytest.param(pa.array([True, False]), "int", [1, 0], {}, id="bool-int"),
    pytest.param(pa.array([1.0, 0.1, None]), "string", ["1", "0.1", None], {}, id="float-str"),
    pytest.param(pa.array([True, None]), "string", ["true", None], {}, id="bool-string"),
    pytest.param(pa.nulls(2), "float", [None, None], {}, id="null-float"),
]


@pytest.mark.parametrize(("values", "to", "expected", "failures"), CASTS)
def test_cast_failures_become_reported_rows_not_crashes(
    values: pa.Array, to: str, expected: list[Any], failures: dict[int, str]
) -> None:
    table = batch(n=list(range(len(values))), **{"attributes.amount": values})
    outcome = run(table, {"cast": {"field": "attributes.amount", "to": to}})
    column = outcome.table.column("attributes.amount")
    assert column.type == {"float": pa.float64(), "int": pa.int64(), "bool": pa.bool_()}.get(
        to, pa.string()
    )
    assert column.to_pylist() == expected
    assert outcome.failed == {
        row: f"cast of 'attributes.amount' to {to} failed: got {got}"
        for row, got in failures.items()
    }
    assert outcome.kept.tolist() == [row not in failures for row in range(len(values))]
    assert outcome.table.column("n").to_pylist() == [
        row for row in range(len(values)) if row not in failures
    ]
    assert outcome.filtered == 0


def test_cast_of_a_missing_column_gives_typed_nulls() -> None:
    outcome = run(EVENTS, {"cast": {"field": "attributes.amount", "to": "int"}})
    assert outcome.table.column("attributes.amount").type == pa.int64()
    assert outcome.table.column("attributes.amount").null_count == 5
    assert outcome.failed == {}


def test_the_reason_of_a_long_value_is_cut() -> None:
    outcome = run(batch(a=["x" * 10_000]), {"cast": {"field": "a", "to": "float"}})
    assert len(outcome.failed[0]) < 150


@settings(max_examples=200, deadline=None)
@given(st.lists(st.none() | st.text(alphabet="0123456789+-.eE a", max_size=6), max_size=40))
def test_string_to_float_matches_python_on_plain_numbers(values: list[str | None]) -> None:
    plain = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")

    def expected(text: str | None) -> float | str | None:
        if text is None:
            return None
        if plain.fullmatch(text) and math.isfinite(float(text)):
            return float(text)
        return "failed"

    outcome = run(batch(v=pa.array(values, pa.string())), {"cast": {"field": "v", "to": "float"}})
    wanted = [expected(v) for v in values]
    assert sorted(outcome.failed) == [i for i, w in enumerate(wanted) if w == "failed"]
    assert outcome.table.column("v").to_pylist() == [w for w in wanted if w != "failed"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.none() | st.text(alphabet="0123456789+-", max_size=22), max_size=40))
def test_string_to_int_matches_python_within_int64(values: list[str | None]) -> None:
    def expected(text: str | None) -> int | str | None:
        if text is None:
            return None
        if re.fullmatch(r"[+-]?\d+", text) and -(2**63) <= int(text) < 2**63:
            return int(text)
        return "failed"

    outcome = run(batch(v=pa.array(values, pa.string())), {"cast": {"field": "v", "to": "int"}})
    wanted = [expected(v) for v in values]
    assert sorted(outcome.failed) == [i for i, w in enumerate(wanted) if w == "failed"]
    assert outcome.table.column("v").to_pylist() == [w for w in wanted if w != "failed"]


def test_derive_adds_a_column_or_replaces_one_in_place() -> None:
    outcome = run(
        EVENTS,
        {"derive": {"field": "temp_c", "expr": "(attributes.temp_f - 32) * 5 / 9"}},
        {"derive": {"field": "value", "expr": "coalesce(value, 0) * 2"}},
    )
    out = outcome.table
    assert out.column("temp_c").to_pylist() == [0.0, 100.0, None, 10.0, -10.0]
    assert out.column_names.index("value") == EVENTS.column_names.index("value")
    assert out.column("value").to_pylist() == [3.0, -4.0, 0.0, 0.0, 14.0]
    assert outcome.kept.all()


def test_derive_of_a_literal_fills_the_column() -> None:
    out = run(EVENTS, {"derive": {"field": "source", "expr": "'api'"}}).table
    assert out.column("source").to_pylist() == ["api"] * 5


def test_filter_keeps_true_rows_and_drops_null_ones() -> None:
    outcome = run(EVENTS, {"filter": "type != 'debug' and value >= 0"})
    # e2 has a null value and e4 a null type: null is not true, so both go.
    assert outcome.kept.tolist() == [True, False, False, True, False]
    assert outcome.table.column("event_id").to_pylist() == ["e0", "e3"]
    assert outcome.failed == {}
    assert outcome.filtered == 3


def test_steps_run_in_order_and_each_input_row_is_kept_failed_or_filtered() -> None:
    table = batch(
        event_id=["a", "b", "c", "d", "e", "f"],
        type=["x", "debug", "x", "x", "x", "x"],
        **{"attributes.amount": ["1", "2", "oops", "-4", "5", None]},
    )
    outcome = run(
        table,
        {"rename": {"from": "attributes.amount", "to": "amount"}},
        {"cast": {"field": "amount", "to": "int"}},
        {"derive": {"field": "double", "expr": "amount * 2"}},
        {"filter": "type != 'debug' and double > 0"},
    )
    assert outcome.table.column("event_id").to_pylist() == ["a", "e"]
    assert outcome.table.column("double").to_pylist() == [2, 10]
    assert outcome.kept.tolist() == [True, False, False, False, True, False]
    assert outcome.failed == {2: "cast of 'amount' to int failed: got 'oops'"}
    assert outcome.filtered == 3


def test_empty_table_goes_through_every_step() -> None:
    outcome = run(
        EVENTS.slice(0, 0),
        {"rename": {"from": "attributes.temp_f", "to": "t"}},
        {"cast": {"field": "entity", "to": "int"}},
        {"derive": {"field": "c", "expr": "(t - 32) / 1.8"}},
        {"filter": "c > 0 and lower(type) in ('click',)"},
    )
    assert outcome.table.num_rows == 0
    assert outcome.kept.shape == (0,)
    assert outcome.failed == {}


@pytest.mark.parametrize(
    ("steps", "fragments"),
    [
        pytest.param(
            [{"filter": "x > 1"}],
            ["step 0 (filter)", "column 'x' does not exist", "available columns: event_id, type"],
            id="missing-column",
        ),
        pytest.param(
            [{"rename": {"from": "value", "to": "v"}}, {"derive": {"field": "w", "expr": "value"}}],
            ["step 1 (derive)", "column 'value' does not exist", "v, entity"],
            id="renamed-away",
        ),
        pytest.param(
            [{"derive": {"field": "w", "expr": "type + 1"}}],
            ["operator '+' needs float or int, but 'type' is string"],
            id="string-arithmetic",
        ),
        pytest.param(
            [{"filter": "value == 'x'"}],
            ["cannot compare 'value' (float) with \"'x'\" (string); cast one side first"],
            id="mixed-compare",
        ),
        pytest.param([{"filter": "value"}], ["a filter must be true or false"], id="non-bool"),
        pytest.param([{"filter": "not value"}], ["not needs bool"], id="not-number"),
        pytest.param([{"filter": "value and True"}], ["'and' needs bool"], id="and-number"),
        pytest.param(
            [{"derive": {"field": "w", "expr": "lower(value)"}}],
            ["lower() needs string"],
            id="lower",
        ),
        pytest.param(
            [{"derive": {"field": "w", "expr": "concat(type, value)"}}],
            ["concat() needs string"],
            id="concat",
        ),
        pytest.param(
            [{"derive": {"field": "w", "expr": "coalesce(value, type)"}}],
            ["coalesce() needs arguments of one type, got float, string"],
            id="coalesce",
        ),
        pytest.param(
            [{"filter": "value in ('a', 'b')"}],
            ["'value' is float but the list after 'in' holds strings"],
            id="in-types",
        ),
        pytest.param(
            [{"filter": "if_else(value, True, False)"}],
            ["if_else() condition needs bool"],
            id="if-else",
        ),
    ],
)
def test_apply_time_errors_name_the_step_and_the_problem(
    steps: list[Mapping[str, Any]], fragments: list[str]
) -> None:
    with pytest.raises(TransformError) as caught:
        run(EVENTS, *steps)
    for fragment in fragments:
        assert fragment in str(caught.value)


# --------------------------------------------------------------------------- expression semantics

NUMBERS = batch(
    i=pa.array([7, -7, 0, None, 9], pa.int64()),
    d=pa.array([2, 2, 0, 3, 0], pa.int64()),
    f=pa.array([7.5, -7.5, 0.0, 1.0, None], pa.float64()),
    n=pa.nulls(5),
)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("i / d", [3.5, -3.5, None, None, None]),
        ("i // d", [3, -4, None, None, None]),
        ("i % d", [1, 1, None, None, None]),
        ("f / 0", [None] * 5),
        ("f // 0.0", [None] * 5),
        ("f % 2", [1.5, 0.5, 0.0, 1.0, None]),
        ("f // -2", [-4.0, 3.0, -0.0, -1.0, None]),
        ("0 / 0", [None] * 5),
        ("i + f", [14.5, -14.5, 0.0, None, None]),
        ("-i", [-7, 7, 0, None, -9]),
        ("abs(f)", [7.5, 7.5, 0.0, 1.0, None]),
        ("n + 1", [None] * 5),
        ("coalesce(n, i, 1)", [7, -7, 0, 1, 9]),
        ("coalesce(i, f)", [7.0, -7.0, 0.0, 1.0, 9.0]),
        ("is_null(n) and is_null(i)", [False, False, False, True, False]),
        ("n > 1", [None] * 5),
        ("0 <= i < 8", [True, False, True, None, False]),
        ("i in (7, 9)", [True, False, False, None, True]),
        ("i not in (7, 9)", [False, True, True, None, False]),
        ("f in (7.5, 1)", [True, False, False, True, None]),
        ("i in ()", [False, False, False, None, False]),
        ("if_else(i > 0, i, f)", [7.0, -7.5, 0.0, None, 9.0]),
        ("round(f)", [8.0, -8.0, 0.0, 1.0, None]),
    ],
)
def test_arithmetic_and_null_semantics(source: str, expected: list[Any]) -> None:
    assert evaluate(NUMBERS, source) == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("round(2.5)", 2.0),  # half to even
        ("round(3.5)", 4.0),
        ("round(-2.5)", -2.0),
        ("round(1.25, 1)", 1.2),
        ("round(2.675, 2)", 2.68),  # the decimal value, not the binary one (Python: 2.67)
        ("round(1250, -2)", 1200),
        ("round(7)", 7),
        ("upper('straße')", "STRAẞE"),  # per-character mapping, not Python's 'STRASSE'
        ("lower('ÀB')", "àb"),
        ("concat('a', 'b', 'c')", "abc"),
        ("concat('a', None)", None),
        ("concat(coalesce(None, ''), 'b')", "b"),
        ("'b' < 'ab'", False),
        ("True and None", None),
        ("False and None", False),
        ("True or None", True),
        ("False or None", None),
        ("not None", None),
        ("if_else(None, 1, 2)", None),
        ("None in (1, 2)", None),
        ("-0.0 in (0, 1)", True),  # as ==, although Arrow's is_in hashes the bits
        ("0.0 not in (-0.0,)", False),
    ],
)
def test_function_and_logic_semantics(source: str, expected: Any) -> None:
    assert evaluate(batch(x=[1]), source) == [expected]


# A per-row Python interpreter of the same syntax, with the documented null semantics:
# an independent reference for the Arrow evaluator.


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    assert isinstance(node, ast.Name)
    return node.id


def _kleene_and(values: list[Any]) -> Any:
    if any(v is False for v in values):
        return False
    return None if any(v is None for v in values) else True


def _kleene_or(values: list[Any]) -> Any:
    if any(v is True for v in values):
        return True
    return None if any(v is None for v in values) else False


def _arith(op: ast.operator, a: Any, b: Any) -> Any:
    if a is None or b is None:
        return None
    if isinstance(op, ast.Div | ast.FloorDiv | ast.Mod) and b == 0:
        return None
    kernels: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
        ast.Add: operator.add,
        ast.Sub: operator.sub,
        ast.Mult: operator.mul,
        ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod,
    }
    return kernels[type(op)](a, b)


_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}


def _compare(node: ast.Compare, row: Mapping[str, Any]) -> Any:
    left = reference(node.left, row)
    parts = []
    for op, comparator in zip(node.ops, node.comparators, strict=True):
        if isinstance(op, ast.In | ast.NotIn):
            options = ast.literal_eval(comparator)
            found = None if left is None else left in options
            parts.append(found if found is None or isinstance(op, ast.In) else not found)
            continue
        right = reference(comparator, row)
        if left is None or right is None:
            parts.append(None)
        else:
            parts.append(_COMPARE[type(op)](left, right))
        left = right
    return _kleene_and(parts)


def _call(name: str, args: list[Any]) -> Any:
    if name == "coalesce":
        return next((a for a in args if a is not None), None)
    if name == "is_null":
        return args[0] is None
    if name == "if_else":
        return None if args[0] is None else (args[1] if args[0] else args[2])
    if any(a is None for a in args):
        return None
    functions: dict[str, Callable[..., Any]] = {
        "lower": str.lower,
        "upper": str.upper,
        "abs": abs,
        "concat": lambda *parts: "".join(parts),
    }
    return functions[name](*args)


def reference(node: ast.expr, row: Mapping[str, Any]) -> Any:
    match node:
        case ast.Constant(value=value):
            return value
        case ast.Name() | ast.Attribute():
            return row[_name(node)]
        case ast.UnaryOp(op=ast.USub(), operand=operand):
            value = reference(operand, row)
            return None if value is None else -value
        case ast.UnaryOp(op=ast.Not(), operand=operand):
            value = reference(operand, row)
            return None if value is None else not value
        case ast.BinOp(op=op, left=left, right=right):
            return _arith(op, reference(left, row), reference(right, row))
        case ast.BoolOp(op=op, values=values):
            results = [reference(v, row) for v in values]
            return _kleene_and(results) if isinstance(op, ast.And) else _kleene_or(results)
        case ast.Compare():
            return _compare(node, row)
        case ast.Call(func=ast.Name(id=name), args=args):
            return _call(name, [reference(a, row) for a in args])
    raise AssertionError(ast.dump(node))


@st.composite
def tables(draw: st.DrawFn) -> pa.Table:
    size = draw(st.integers(0, 25))

    def column(values: st.SearchStrategy[Any]) -> list[Any]:
        return draw(st.lists(st.none() | values, min_size=size, max_size=size))

    floats = st.floats(-1000, 1000, allow_nan=False) | st.sampled_from([0.0, -0.0, 0.5, 2.0])
    return batch(
        i=pa.array(column(st.integers(-50, 50)), pa.int64()),
        f=pa.array(column(floats), pa.float64()),
        s=pa.array(column(st.text(alphabet="abAB", max_size=3)), pa.string()),
        b=pa.array(column(st.booleans()), pa.bool_()),
        **{"attributes.x": pa.array(column(st.integers(-3, 3).map(float)), pa.float64())},
    )


NUM_LEAVES = st.one_of(
    st.sampled_from(["i", "f", "attributes.x"]),
    st.integers(-5, 5).map(lambda v: f"({v})"),
    st.sampled_from(["0.0", "0.5", "2.5", "(-1.25)", "1e3"]),
)
BOOL_LEAVES = st.sampled_from(["b", "True", "False"])
STR_LEAVES = st.sampled_from(["s", "'a'", "''", "'B'"])
CMP = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])


@st.composite
def num_exprs(draw: st.DrawFn, depth: int = 3) -> str:
    shape = draw(st.sampled_from(["leaf", "binop", "binop", "neg", "abs", "coalesce", "if_else"]))
    if depth == 0 or shape == "leaf":
        return draw(NUM_LEAVES)
    a, b = draw(num_exprs(depth - 1)), draw(num_exprs(depth - 1))
    if shape == "binop":
        return f"({a} {draw(st.sampled_from(['+', '-', '*', '/', '//', '%']))} {b})"
    if shape == "neg":
        return f"(-{a})"
    if shape == "if_else":
        return f"if_else({draw(bool_exprs(depth - 1))}, {a}, {b})"
    return f"abs({a})" if shape == "abs" else f"coalesce({a}, {b})"


@st.composite
def str_exprs(draw: st.DrawFn, depth: int = 3) -> str:
    shape = draw(st.sampled_from(["leaf", "lower", "upper", "concat", "coalesce", "if_else"]))
    if depth == 0 or shape == "leaf":
        return draw(STR_LEAVES)
    a, b = draw(str_exprs(depth - 1)), draw(str_exprs(depth - 1))
    if shape in ("lower", "upper"):
        return f"{shape}({a})"
    if shape == "if_else":
        return f"if_else({draw(bool_exprs(depth - 1))}, {a}, {b})"
    return f"{shape}({a}, {b})"


@st.composite
def bool_exprs(draw: st.DrawFn, depth: int = 3) -> str:
    shapes = ["leaf", "and", "or", "not", "num", "str", "bool", "chain", "in"]
    shape = draw(st.sampled_from(shapes))
    if depth == 0 or shape == "leaf":
        return draw(BOOL_LEAVES)
    if shape in ("and", "or"):
        return f"({draw(bool_exprs(depth - 1))} {shape} {draw(bool_exprs(depth - 1))})"
    if shape == "not":
        return f"(not {draw(bool_exprs(depth - 1))})"
    if shape == "chain":
        a, b, c = (draw(num_exprs(depth - 1)) for _ in range(3))
        return f"({a} {draw(CMP)} {b} {draw(CMP)} {c})"
    if shape == "in":
        return draw(
            st.sampled_from(
                [
                    f"({draw(num_exprs(depth - 1))} in (1, 2.5, -3))",
                    f"({draw(num_exprs(depth - 1))} not in (0, 1))",
                    f"({draw(str_exprs(depth - 1))} in ('a', 'B', ''))",
                    f"({draw(str_exprs(depth - 1))} not in ['ab'])",
                    f"is_null({draw(num_exprs(depth - 1))})",
                    f"is_null({draw(str_exprs(depth - 1))})",
                ]
            )
        )
    sub = {"num": num_exprs, "str": str_exprs, "bool": bool_exprs}[shape]
    return f"({draw(sub(depth - 1))} {draw(CMP)} {draw(sub(depth - 1))})"


def same(actual: Any, expected: Any) -> bool:
    if expected is None or actual is None:
        return actual is expected
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(actual) is type(expected) and actual == expected
    return bool(actual == expected)


@settings(max_examples=300, deadline=None)
@given(tables(), st.one_of(num_exprs(), bool_exprs(), str_exprs()))
def test_evaluation_matches_a_per_row_python_reference(table: pa.Table, source: str) -> None:
    tree = ast.parse(source, mode="eval").body
    expected = [reference(tree, row) for row in table.to_pylist()]
    actual = evaluate(table, source)
    assert len(actual) == table.num_rows
    mismatches = [
        (row, a, e)
        for row, (a, e) in enumerate(zip(actual, expected, strict=True))
        if not same(a, e)
    ]
    assert not mismatches, f"{source}: (row, arrow, python) {mismatches[:5]}"


@settings(max_examples=200, deadline=None)
@given(tables(), bool_exprs())
def test_filter_keeps_exactly_the_rows_the_reference_finds_true(
    table: pa.Table, source: str
) -> None:
    tree = ast.parse(source, mode="eval").body
    wanted = [reference(tree, row) is True for row in table.to_pylist()]
    outcome = run(table, {"filter": source})
    assert outcome.kept.tolist() == wanted
    assert outcome.table.equals(table.filter(pa.array(wanted, pa.bool_())))
    assert outcome.failed == {}
    assert outcome.filtered == wanted.count(False)


# --------------------------------------------------------------------------- referenced columns


def test_referenced_columns_are_those_read_from_the_decoded_batch() -> None:
    steps = parse_transforms(
        [
            {"rename": {"from": "attributes.temp_c", "to": "temp"}},
            {"cast": {"field": "attributes.amount", "to": "float"}},
            {"derive": {"field": "value", "expr": "value + attributes.amount * temp"}},
            {"derive": {"field": "hot", "expr": "temp > 30"}},
            {"filter": "hot and type != 'debug' and lower(attributes.site) in ('a',)"},
        ]
    )
    assert referenced_columns(steps) == {
        "attributes.temp_c",
        "attributes.amount",
        "value",
        "type",
        "attributes.site",
    }
    assert referenced_columns(()) == frozenset()


# --------------------------------------------------------------------------- enrichment

DEVICES = EnrichmentSpec(
    table="devices", key="device_id", on="entity", columns=("site", "region"), prefix="device_"
)


def dimension(keys: list[Any], sites: list[str], regions: list[str]) -> pa.Table:
    return pa.table(
        {
            "device_id": pa.array(keys) if keys else pa.array([], pa.string()),
            "site": pa.array(sites, pa.string()),
            "region": pa.array(regions, pa.string()),
        }
    )


@pytest.mark.parametrize(
    ("keys", "events", "sites", "misses"),
    [
        pytest.param(
            ["d1", "d2"],
            ["d1", "d2", None, "d9", "d1"],
            ["s1", "s2", None, None, "s1"],
            2,
            id="hit",
        ),
        pytest.param(
            ["d1", "d2", "d1"],
            ["d1", "d2"],
            ["s3", "s2"],  # the last row of a repeated key wins
            0,
            id="duplicate-key",
        ),
        pytest.param([], ["d1", None], [None, None], 2, id="empty-dimension"),
        pytest.param(["d1"], [], [], 0, id="empty-events"),
        pytest.param([None, "d1"], [None, "d1"], [None, "s2"], 1, id="null-keys-never-match"),
    ],
)
def test_enrich_looks_up_keys_in_the_dimension(
    keys: list[Any], events: list[Any], sites: list[Any], misses: int
) -> None:
    dim = dimension(
        keys, [f"s{i + 1}" for i in range(len(keys))], [f"r{i + 1}" for i in range(len(keys))]
    )
    table = pa.table({"entity": pa.array(events, pa.string())})
    out, missed = enrich(table, dim, DEVICES)
    assert out.column_names == ["entity", "device_site", "device_region"]
    assert out.column("device_site").to_pylist() == sites
    assert missed == misses


def test_enrich_compares_keys_as_strings() -> None:
    dim = dimension([1, 2, 3], ["s1", "s2", "s3"], ["r1", "r2", "r3"])
    table = pa.table({"attributes.device": ["3", "1", "4"]})
    spec = EnrichmentSpec("devices", "device_id", "attributes.device", ("region",))
    out, missed = enrich(table, dim, spec)
    assert out.column("region").to_pylist() == ["r3", "r1", None]
    assert missed == 1


def test_enrich_replaces_a_column_of_the_same_name() -> None:
    dim = dimension(["d1"], ["s1"], ["r1"])
    table = pa.table({"entity": ["d1"], "site": ["old"]})
    out, _ = enrich(table, dim, EnrichmentSpec("devices", "device_id", "entity", ("site",)))
    assert out.column_names == ["entity", "site"]
    assert out.column("site").to_pylist() == ["s1"]


def test_enrich_names_missing_columns() -> None:
    dim = pa.table({"device_id": ["d1"], "site": ["s1"]})
    with pytest.raises(TransformError, match=r"dimension table 'devices' has no column 'region'"):
        enrich(EVENTS, dim, DEVICES)
    spec = EnrichmentSpec("devices", "device_id", "attributes.device", ("site",))
    with pytest.raises(TransformError, match=r"no column 'attributes.device'; available"):
        enrich(EVENTS, dim, spec)


def test_parse_enrichment_validates_the_setting() -> None:
    spec = parse_enrichment(
        {"table": "devices", "key": "device_id", "on": "entity", "columns": ["site", "region"]}
    )
    assert spec == EnrichmentSpec("devices", "device_id", "entity", ("site", "region"))
    assert spec.output_names() == ("site", "region")


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ({"table": "d", "key": "k", "on": "entity"}, "field 'columns': Field required"),
        ({"table": "d", "key": "k", "on": "entity", "columns": []}, "at least 1 item"),
        ({"table": "d", "key": "k", "on": "e", "columns": ["a", "a"]}, "must not repeat"),
        ({"table": "d", "key": "k", "on": "e", "columns": "site"}, "valid tuple"),
        ({"table": "d", "key": "", "on": "e", "columns": ["a"]}, "field 'key'"),
        ({"table": "d", "key": "k", "on": "e", "columns": ["a"], "as": 1}, "field 'as'"),
    ],
)
def test_parse_enrichment_errors_say_what_and_how(setting: dict[str, Any], fragment: str) -> None:
    with pytest.raises(TransformError) as caught:
        parse_enrichment(setting)
    assert fragment in str(caught.value)
    assert "Fix: write it like" in str(caught.value)


# --------------------------------------------------------------------------- dimension cache


class Loader:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> pa.Table:
        self.calls += 1
        return dimension(["d1"], [f"s{self.calls}"], ["r"])


def test_cache_loads_once_then_only_when_the_version_changes() -> None:
    cache = DimensionCache(DEVICES, ttl_ms=60_000)
    load = Loader()
    assert cache.needs_refresh(now_ms=0)
    assert cache.version() is None
    with pytest.raises(RuntimeError, match="never loaded"):
        _ = cache.table

    assert cache.update(1_000, ("2025-01-01", 10), load)
    assert cache.version() == ("2025-01-01", 10)
    assert cache.table.column("site").to_pylist() == ["s1"]
    assert not cache.needs_refresh(60_999)
    assert cache.needs_refresh(61_000)

    # Same version: no load, but the age restarts.
    assert not cache.update(61_000, ("2025-01-01", 10), load)
    assert load.calls == 1
    assert not cache.needs_refresh(120_999)
    assert cache.needs_refresh(121_000)

    assert cache.update(121_000, ("2025-01-02", 11), load)
    assert load.calls == 2
    assert cache.table.column("site").to_pylist() == ["s2"]


def test_cache_keeps_the_old_table_when_a_load_fails() -> None:
    cache = DimensionCache(DEVICES, ttl_ms=1_000)
    cache.update(0, 1, Loader())

    def broken() -> pa.Table:
        raise ConnectionError("database down")

    with pytest.raises(ConnectionError):
        cache.update(5_000, 2, broken)
    with pytest.raises(TransformError, match="has no column 'site', 'region'"):
        cache.update(5_000, 2, lambda: pa.table({"device_id": ["d1"]}))
    assert cache.version() == 1
    assert cache.table.column("site").to_pylist() == ["s1"]
    assert cache.needs_refresh(5_000)  # still stale: the worker retries


def test_cache_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="ttl_ms must be positive"):
        DimensionCache(DEVICES, ttl_ms=0)


def test_cached_table_enriches() -> None:
    cache = DimensionCache(DEVICES, ttl_ms=1_000)
    cache.update(0, "v1", lambda: dimension(["d1", "d2"], ["s1", "s2"], ["r1", "r2"]))
    out, missed = enrich(EVENTS, cache.table, cache.spec)
    assert out.column("device_region").to_pylist() == ["r1", "r2", None, None, "r1"]
    assert missed == 2


def test_kept_mask_is_a_numpy_bool_array() -> None:
    outcome = run(EVENTS, {"filter": "value > 0"})
    assert isinstance(outcome.kept, np.ndarray)
    assert outcome.kept.dtype == np.bool_
