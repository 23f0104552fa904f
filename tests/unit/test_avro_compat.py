"""Avro schema compatibility: reader/writer resolution and the registry's levels."""

from __future__ import annotations

import copy
import io
import itertools
from typing import Any

import fastavro
import pytest
from fastavro.utils import generate_many
from hypothesis import given, settings
from hypothesis import strategies as st

from core.avro_compat import LEVELS, check, compatible


def rec(*fields: dict[str, Any], name: str = "Event", **extra: Any) -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": list(fields), **extra}


def fld(name: str, type_: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, **extra}


def enum(*symbols: str, name: str = "Kind", **extra: Any) -> dict[str, Any]:
    return {"type": "enum", "name": name, "symbols": list(symbols), **extra}


ID = fld("id", "string")
NODE = rec(fld("value", "long"), fld("next", ["null", "Node"], default=None), name="Node")
NODE_PLUS = rec(
    fld("value", "long"),
    fld("next", ["null", "Node"], default=None),
    fld("label", "string", default=""),
    name="Node",
)

# (case, old schema, new schema, new reads old (BACKWARD), old reads new (FORWARD))
PAIRS: list[tuple[str, Any, Any, bool, bool]] = [
    ("identical", rec(ID), rec(ID), True, True),
    ("add field with default", rec(ID), rec(ID, fld("n", "int", default=0)), True, True),
    ("add field without default", rec(ID), rec(ID, fld("n", "int")), False, True),
    ("add optional field", rec(ID), rec(ID, fld("n", ["null", "int"], default=None)), True, True),
    ("remove field with default", rec(ID, fld("n", "int", default=0)), rec(ID), True, True),
    ("remove field without default", rec(ID, fld("n", "int")), rec(ID), True, False),
    ("int to long", rec(fld("n", "int")), rec(fld("n", "long")), True, False),
    ("int to float", rec(fld("n", "int")), rec(fld("n", "float")), True, False),
    ("int to double", rec(fld("n", "int")), rec(fld("n", "double")), True, False),
    ("long to int", rec(fld("n", "long")), rec(fld("n", "int")), False, True),
    ("long to float", rec(fld("n", "long")), rec(fld("n", "float")), True, False),
    ("long to double", rec(fld("n", "long")), rec(fld("n", "double")), True, False),
    ("float to double", rec(fld("n", "float")), rec(fld("n", "double")), True, False),
    ("double to float", rec(fld("n", "double")), rec(fld("n", "float")), False, True),
    ("string to bytes", rec(fld("n", "string")), rec(fld("n", "bytes")), True, True),
    ("bytes to string", rec(fld("n", "bytes")), rec(fld("n", "string")), True, True),
    ("int to string", rec(fld("n", "int")), rec(fld("n", "string")), False, False),
    ("boolean to int", rec(fld("n", "boolean")), rec(fld("n", "int")), False, False),
    ("string to long", rec(fld("n", "string")), rec(fld("n", "long")), False, False),
    ("int to record", rec(fld("n", "int")), rec(fld("n", rec(ID, name="N"))), False, False),
    (
        "logical type added",
        rec(fld("ts", "long")),
        rec(fld("ts", {"type": "long", "logicalType": "timestamp-millis"})),
        True,
        True,
    ),
    (
        "enum add symbol",
        rec(fld("k", enum("A", "B"))),
        rec(fld("k", enum("A", "B", "C"))),
        True,
        False,
    ),
    (
        "enum add symbol, old enum has a default",
        rec(fld("k", enum("A", "B", default="A"))),
        rec(fld("k", enum("A", "B", "C", default="A"))),
        True,
        True,
    ),
    ("enum remove symbol", rec(fld("k", enum("A", "B"))), rec(fld("k", enum("A"))), False, True),
    (
        "enum renamed",
        rec(fld("k", enum("A"))),
        rec(fld("k", enum("A", name="Other"))),
        False,
        False,
    ),
    (
        "enum renamed with alias",
        rec(fld("k", enum("A"))),
        rec(fld("k", enum("A", name="Other", aliases=["Kind"]))),
        True,
        False,
    ),
    ("record renamed", rec(ID), rec(ID, name="Renamed"), False, False),
    ("record renamed with alias", rec(ID), rec(ID, name="Renamed", aliases=["Event"]), True, False),
    ("namespace changed", rec(ID, namespace="a"), rec(ID, namespace="b"), True, True),
    (
        "field renamed with alias",
        rec(fld("value", "double")),
        rec(fld("amount", "double", aliases=["value"])),
        True,
        False,
    ),
    (
        "fixed resized",
        rec(fld("h", {"type": "fixed", "name": "H", "size": 16})),
        rec(fld("h", {"type": "fixed", "name": "H", "size": 32})),
        False,
        False,
    ),
    (
        "fixed unchanged",
        rec(fld("h", {"type": "fixed", "name": "H", "size": 16})),
        rec(fld("h", {"type": "fixed", "name": "H", "size": 16})),
        True,
        True,
    ),
    (
        "field made nullable",
        rec(fld("s", "string")),
        rec(fld("s", ["null", "string"], default=None)),
        True,
        False,
    ),
    (
        "field made required",
        rec(fld("s", ["null", "string"])),
        rec(fld("s", "string")),
        False,
        True,
    ),
    (
        "union branch added",
        rec(fld("u", ["null", "string"])),
        rec(fld("u", ["null", "string", "int"])),
        True,
        False,
    ),
    (
        "union branch removed",
        rec(fld("u", ["null", "string", "int"])),
        rec(fld("u", ["null", "string"])),
        False,
        True,
    ),
    (
        "union branch promoted",
        rec(fld("u", ["null", "int"])),
        rec(fld("u", ["null", "long"])),
        True,
        False,
    ),
    (
        "union branches reordered",
        rec(fld("u", ["int", "string"])),
        rec(fld("u", ["string", "int"])),
        True,
        True,
    ),
    (
        "array items promoted",
        rec(fld("a", {"type": "array", "items": "int"})),
        rec(fld("a", {"type": "array", "items": "long"})),
        True,
        False,
    ),
    (
        "map values narrowed",
        rec(fld("m", {"type": "map", "values": "long"})),
        rec(fld("m", {"type": "map", "values": "int"})),
        False,
        True,
    ),
    (
        "array to map",
        rec(fld("a", {"type": "array", "items": "int"})),
        rec(fld("a", {"type": "map", "values": "int"})),
        False,
        False,
    ),
    (
        "nested record gains field without default",
        rec(fld("n", rec(ID, name="Inner"))),
        rec(fld("n", rec(ID, fld("x", "int"), name="Inner"))),
        False,
        True,
    ),
    (
        "nested record gains field with default",
        rec(fld("n", rec(ID, name="Inner"))),
        rec(fld("n", rec(ID, fld("x", "int", default=1), name="Inner"))),
        True,
        True,
    ),
    (
        "array of records gains a required field",
        rec(fld("a", {"type": "array", "items": rec(ID, name="Item")})),
        rec(fld("a", {"type": "array", "items": rec(ID, fld("q", "int"), name="Item")})),
        False,
        True,
    ),
    (
        "named type used twice, changed",
        rec(fld("a", rec(fld("x", "int"), name="P")), fld("b", "P")),
        rec(fld("a", rec(fld("x", "long"), name="P")), fld("b", "P")),
        True,
        False,
    ),
    ("recursive, unchanged", NODE, NODE, True, True),
    ("recursive, field with default added", NODE, NODE_PLUS, True, True),
    ("top-level string to bytes", "string", "bytes", True, True),
    ("top-level string to int", "string", "int", False, False),
    ("top-level int to union", "int", ["null", "long"], True, False),
]

STEPS = [pytest.param(old, new, b, f, id=case) for case, old, new, b, f in PAIRS]


def expected(level: str, backward: bool, forward: bool) -> bool:
    base = level.removesuffix("_TRANSITIVE")
    return {"NONE": True, "BACKWARD": backward, "FORWARD": forward}.get(base, backward and forward)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize(("old", "new", "backward", "forward"), STEPS)
def test_level_verdict_for_one_earlier_version(
    level: str, old: Any, new: Any, backward: bool, forward: bool
) -> None:
    problems = compatible(level, new, [old])
    assert (problems == []) is expected(level, backward, forward), problems


@pytest.mark.parametrize(("old", "new", "backward", "forward"), STEPS)
def test_check_is_the_two_directions(old: Any, new: Any, backward: bool, forward: bool) -> None:
    assert (check(new, old) == []) is backward
    assert (check(old, new) == []) is forward


@pytest.mark.parametrize(("old", "new", "backward", "forward"), STEPS)
def test_fastavro_reads_what_check_allows(
    old: Any, new: Any, backward: bool, forward: bool
) -> None:
    """Where check says a reader can read a writer, fastavro's resolution agrees."""
    for reader, writer, ok in ((new, old, backward), (old, new, forward)):
        if not ok or _fastavro_differs(reader, writer):
            continue
        parsed_writer = fastavro.parse_schema(copy.deepcopy(writer))
        parsed_reader = fastavro.parse_schema(copy.deepcopy(reader))
        for record in generate_many(parsed_writer, 20):
            buffer = io.BytesIO()
            fastavro.schemaless_writer(buffer, parsed_writer, record)
            buffer.seek(0)
            fastavro.schemaless_reader(buffer, parsed_writer, parsed_reader)


def _fastavro_differs(reader: Any, writer: Any) -> bool:
    # fastavro compares full names and reads no type aliases; Avro's Java resolution,
    # which the Confluent registry follows, compares unqualified names and aliases.
    # Bytes read as a string must be UTF-8, which random bytes are not.
    text = repr(reader) + repr(writer)
    return "aliases" in text or "namespace" in text or "bytes" in repr(writer)


V1 = rec(ID)
V2 = rec(ID, fld("n", "int", default=0))
V3_BACKWARD_ONLY_LATEST = rec(ID, fld("n", "int"))  # reads v2, not v1 (no n there)
F1 = rec(ID, fld("n", "int"))
F2 = rec(ID, fld("n", "int", default=0))
F3_FORWARD_ONLY_LATEST = rec(ID)  # v2 reads it with n's default; v1 has no default for n

HISTORIES = [
    # (case, history oldest first, new, {level: compatible?})
    (
        "backward with the latest only",
        [V1, V2],
        V3_BACKWARD_ONLY_LATEST,
        {"BACKWARD": True, "BACKWARD_TRANSITIVE": False, "FORWARD": True},
    ),
    (
        "forward with the latest only",
        [F1, F2],
        F3_FORWARD_ONLY_LATEST,
        {"FORWARD": True, "FORWARD_TRANSITIVE": False, "BACKWARD": True, "FULL": True},
    ),
    (
        "full with every version",
        [V1, V2],
        rec(ID, fld("n", "int", default=0), fld("m", "string", default="")),
        dict.fromkeys(LEVELS, True),
    ),
    (
        "incompatible with the latest only",
        [rec(fld("n", "long")), rec(fld("n", "int"))],
        rec(fld("n", "string")),
        {level: level == "NONE" for level in LEVELS},
    ),
    (
        "full with the latest, not with the first",
        [rec(fld("n", "int")), rec(fld("n", "int", default=0))],
        rec(fld("m", "int", default=0)),
        {"FULL": True, "FULL_TRANSITIVE": False, "BACKWARD_TRANSITIVE": True},
    ),
]


@pytest.mark.parametrize(
    ("history", "new", "verdicts"),
    [pytest.param(h, n, v, id=case) for case, h, n, v in HISTORIES],
)
def test_transitive_levels_check_every_version(
    history: list[Any], new: Any, verdicts: dict[str, bool]
) -> None:
    for level, ok in verdicts.items():
        assert (compatible(level, new, history) == []) is ok, level


def test_problems_name_the_path_the_version_and_the_fix() -> None:
    [problem] = compatible("BACKWARD", V3_BACKWARD_ONLY_LATEST, [V1, V2][:1])
    assert "the latest schema" in problem
    assert "/n" in problem
    assert "default" in problem
    [first] = compatible("BACKWARD_TRANSITIVE", V3_BACKWARD_ONLY_LATEST, [V1, V2])
    assert "schema 1 of 2" in first
    [deep] = check(
        rec(fld("a", {"type": "array", "items": rec(fld("x", "long"), name="I")})),
        rec(fld("a", {"type": "array", "items": rec(fld("x", "string"), name="I")})),
    )
    assert deep.startswith("/a/[]/x:")
    assert "'long'" in deep
    assert "'string'" in deep
    [symbols] = check(rec(fld("k", enum("A"))), rec(fld("k", enum("A", "B", "C"))))
    assert "B, C" in symbols
    assert "'default'" in symbols


def test_every_problem_is_reported_not_only_the_first() -> None:
    problems = check(
        rec(fld("a", "int"), fld("b", "int"), fld("c", "string")),
        rec(fld("a", "string"), fld("b", "boolean")),
    )
    assert [p.split(":")[0] for p in problems] == ["/a", "/b", "/c"]


def test_an_unknown_level_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="BACKWARD_TRANSITIVE"):
        compatible("SIDEWAYS", V1, [V1])


@pytest.mark.parametrize("level", LEVELS)
def test_the_first_version_is_always_accepted(level: str) -> None:
    assert compatible(level, V1, []) == []


def test_parsed_schemas_are_accepted_as_well_as_json() -> None:
    assert check(fastavro.parse_schema(copy.deepcopy(NODE_PLUS)), NODE) == []
    assert check(fastavro.parse_schema(rec(fld("n", "int"))), rec(fld("n", "long"))) != []


# ------------------------------------------------------------------------------ properties

_PRIMITIVE = st.sampled_from(
    ["null", "boolean", "int", "long", "float", "double", "bytes", "string"]
)
_names = itertools.count()


def _materialise(tree: Any) -> Any:
    """A schema from a generated shape, with a fresh name for every named type."""
    kind = tree[0]
    if kind == "prim":
        return tree[1]
    if kind == "array":
        return {"type": "array", "items": _materialise(tree[1])}
    if kind == "map":
        return {"type": "map", "values": _materialise(tree[1])}
    if kind == "enum":
        return enum(*[f"S{i}" for i in range(tree[1])], name=f"E{next(_names)}")
    if kind == "fixed":
        return {"type": "fixed", "name": f"F{next(_names)}", "size": tree[1]}
    fields = [fld(f"f{i}", _materialise(t)) for i, t in enumerate(tree[1])]
    return rec(*fields, name=f"R{next(_names)}")


_SHAPES = st.recursive(
    st.tuples(st.just("prim"), _PRIMITIVE)
    | st.tuples(st.just("enum"), st.integers(1, 4))
    | st.tuples(st.just("fixed"), st.integers(1, 8)),
    lambda inner: (
        st.tuples(st.just("array"), inner)
        | st.tuples(st.just("map"), inner)
        | st.tuples(st.just("record"), st.lists(inner, min_size=1, max_size=4))
    ),
    max_leaves=12,
)
RECORDS = st.lists(_SHAPES, min_size=1, max_size=5).map(
    lambda shapes: _materialise(("record", shapes))
)


@settings(max_examples=60, deadline=None)
@given(RECORDS)
def test_every_schema_is_fully_compatible_with_itself(schema: dict[str, Any]) -> None:
    assert compatible("FULL_TRANSITIVE", schema, [schema, copy.deepcopy(schema)]) == []


@settings(max_examples=60, deadline=None)
@given(RECORDS, st.data())
def test_a_field_with_a_default_can_come_and_go(schema: dict[str, Any], data: Any) -> None:
    wider = copy.deepcopy(schema)
    wider["fields"].append(fld("added", ["null", "string"], default=None))
    assert compatible("FULL", wider, [schema]) == []
    assert compatible("FULL", schema, [wider]) == []
    index = data.draw(st.integers(0, len(schema["fields"]) - 1))
    narrower = copy.deepcopy(schema)
    removed = narrower["fields"].pop(index)
    # Dropping a field without a default: new readers are fine, old readers are not.
    assert compatible("BACKWARD", narrower, [schema]) == []
    assert compatible("FORWARD", narrower, [schema]) != []
    assert removed["name"] in " ".join(compatible("FORWARD", narrower, [schema]))
