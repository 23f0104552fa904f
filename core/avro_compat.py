"""Avro schema compatibility, as a schema registry enforces it between versions.

Two questions, both answered with a list of problems (empty: compatible):

* :func:`check` — can a *reader* schema read data written with a *writer* schema?
  It follows the resolution rules of the Avro specification:

  - a writer's field the reader lacks is skipped; a reader's field the writer lacks
    needs a default;
  - a type may change only by promotion: ``int`` to ``long``, ``float`` or ``double``;
    ``long`` to ``float`` or ``double``; ``float`` to ``double``; ``string`` to
    ``bytes`` and back;
  - named types (record, enum, fixed) keep their unqualified name, or the reader lists
    the writer's name in ``aliases``; a fixed keeps its size; an enum reader must know
    every writer symbol unless it has a ``default`` symbol;
  - a writer union: the reader must read every branch; a reader union: some branch must
    read the writer's type; arrays and maps are checked by their items and values;
  - logical types are read as the type underneath them, as the specification says.

* :func:`compatible` — may a new schema join a subject's versions under a
  compatibility level (the levels of the Confluent registry)?

  ============================ ==========================================================
  level                        the new schema must ...
  ============================ ==========================================================
  ``NONE``                     nothing is checked
  ``BACKWARD``                 read data written with the latest version
  ``BACKWARD_TRANSITIVE``      read data written with every version
  ``FORWARD``                  be readable by the latest version
  ``FORWARD_TRANSITIVE``       be readable by every version
  ``FULL``                     both, with the latest version
  ``FULL_TRANSITIVE``          both, with every version
  ============================ ==========================================================

Schemas come as JSON values (``dict``, ``list`` or ``str``, as ``json.loads`` gives
them) or already parsed by :func:`fastavro.parse_schema`; they must be valid Avro.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import fastavro

__all__ = ["LEVELS", "check", "compatible"]

LEVELS = (
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
)
"""The compatibility levels :func:`compatible` knows, as the Confluent registry names them."""

_PROMOTIONS = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}
_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_NAMED = frozenset({"record", "error", "enum", "fixed"})


def compatible(level: str, new: Any, existing: Sequence[Any]) -> list[str]:
    """The problems that keep ``new`` from joining ``existing`` under ``level``.

    Args:
        level: one of :data:`LEVELS`.
        new: the schema to register.
        existing: the subject's schemas, oldest first; the last is the latest.

    Raises:
        ValueError: when ``level`` is not one of :data:`LEVELS`.
    """
    if level not in LEVELS:
        raise ValueError(
            f"unknown compatibility level {level!r}: expected one of {', '.join(LEVELS)}"
        )
    if level == "NONE" or not existing:
        return []
    transitive = level.endswith("_TRANSITIVE")
    base = level.removesuffix("_TRANSITIVE")
    count = len(existing)
    # Newest first, as a user reads the history; non-transitive levels stop at the latest.
    chosen = range(count - 1, -1, -1) if transitive else range(count - 1, count - 2, -1)
    problems: list[str] = []
    for index in chosen:
        old = existing[index]
        which = "the latest schema" if index == count - 1 else f"schema {index + 1} of {count}"
        if base in ("BACKWARD", "FULL"):
            problems.extend(
                f"the new schema cannot read data written with {which}: {p}"
                for p in check(new, old)
            )
        if base in ("FORWARD", "FULL"):
            problems.extend(
                f"{which} cannot read data written with the new schema: {p}"
                for p in check(old, new)
            )
    return problems


def check(reader: Any, writer: Any) -> list[str]:
    """The problems that keep ``reader`` from reading data written with ``writer``.

    Each problem names the path where it is (``/`` is the top, ``/amount`` a field,
    ``/items[]`` the items of an array, ``/tags{}`` the values of a map).
    """
    resolver = _Resolver(_named(reader), _named(writer))
    resolver.resolve(resolver.reader_named["__top__"], resolver.writer_named["__top__"], "/")
    return resolver.problems


def _named(schema: Any) -> dict[str, Any]:
    """The named types of a schema by full name, and the schema itself as ``__top__``."""
    named: dict[str, Any] = {}
    named["__top__"] = fastavro.parse_schema(schema, named)
    return named


class _Resolver:
    """One walk over a reader and a writer schema side by side, collecting problems."""

    def __init__(self, reader_named: dict[str, Any], writer_named: dict[str, Any]) -> None:
        self.reader_named = reader_named
        self.writer_named = writer_named
        self.problems: list[str] = []
        # Pairs of named types being compared: a recursive schema meets them again.
        self._seen: set[tuple[str, str]] = set()

    def resolve(self, reader: Any, writer: Any, path: str) -> None:
        reader = _unwrap(reader, self.reader_named)
        writer = _unwrap(writer, self.writer_named)
        if isinstance(writer, list):
            for branch in writer:
                self.resolve(reader, branch, path)
            return
        if isinstance(reader, list):
            self._into_union(reader, writer, path)
            return
        r_kind, w_kind = _kind(reader), _kind(writer)
        if r_kind != w_kind:
            if r_kind not in _PROMOTIONS.get(w_kind, ()):
                self.problems.append(
                    f"{path}: the reader expects {_describe(reader)} where the writer wrote "
                    f"{_describe(writer)}, which does not promote to it (promotions: int to "
                    "long/float/double, long to float/double, float to double, string and "
                    "bytes either way)"
                )
            return
        if r_kind in _NAMED:
            self._named_type(reader, writer, path)
        elif r_kind == "array":
            self.resolve(reader["items"], writer["items"], f"{path.rstrip('/')}/[]")
        elif r_kind == "map":
            self.resolve(reader["values"], writer["values"], f"{path.rstrip('/')}/{{}}")

    def _into_union(self, reader: list[Any], writer: Any, path: str) -> None:
        for branch in reader:
            trial = _Resolver(self.reader_named, self.writer_named)
            trial._seen = set(self._seen)
            trial.resolve(branch, writer, path)
            if not trial.problems:
                return
        branches = ", ".join(_describe(_unwrap(b, self.reader_named)) for b in reader)
        self.problems.append(
            f"{path}: the reader's union [{branches}] has no branch that reads the "
            f"writer's {_describe(writer)}: add a branch of that type"
        )

    def _named_type(self, reader: Mapping[str, Any], writer: Mapping[str, Any], path: str) -> None:
        kind = _kind(reader)
        if not _same_name(reader, writer):
            self.problems.append(
                f"{path}: the reader's {kind} is named {_short(reader['name'])!r}, the "
                f"writer's {_short(writer['name'])!r}: keep the name, or list the old one "
                "in the reader's 'aliases'"
            )
            return
        pair = (reader["name"], writer["name"])
        if pair in self._seen:
            return
        self._seen.add(pair)
        if kind == "fixed":
            if reader["size"] != writer["size"]:
                self.problems.append(
                    f"{path}: fixed {_short(reader['name'])!r} is {reader['size']} bytes in "
                    f"the reader and {writer['size']} bytes in the writer: a fixed keeps its size"
                )
        elif kind == "enum":
            self._enum(reader, writer, path)
        else:
            self._record(reader, writer, path)

    def _enum(self, reader: Mapping[str, Any], writer: Mapping[str, Any], path: str) -> None:
        missing = [s for s in writer["symbols"] if s not in reader["symbols"]]
        if missing and "default" not in reader:
            self.problems.append(
                f"{path}: enum {_short(reader['name'])!r} of the reader lacks the writer's "
                f"symbol(s) {', '.join(missing)}: add them, or give the reader's enum a "
                "'default' symbol"
            )

    def _record(self, reader: Mapping[str, Any], writer: Mapping[str, Any], path: str) -> None:
        written = {f["name"]: f for f in writer["fields"]}
        for field in reader["fields"]:
            names = [field["name"], *field.get("aliases", ())]
            match = next((written[n] for n in names if n in written), None)
            where = f"{path.rstrip('/')}/{field['name']}"
            if match is not None:
                self.resolve(field["type"], match["type"], where)
            elif "default" not in field:
                self.problems.append(
                    f"{where}: the reader's field {field['name']!r} has no default and the "
                    "writer has no such field: give it a default (for an optional field, "
                    'a union with "null" first and "default": null)'
                )


def _unwrap(schema: Any, named: Mapping[str, Any]) -> Any:
    """A schema with named references looked up and ``{"type": {...}}`` wrappers removed."""
    while True:
        if isinstance(schema, str):
            if schema in _PRIMITIVES or schema not in named:
                return schema
            schema = named[schema]
        elif isinstance(schema, dict) and not isinstance(schema.get("type"), str):
            schema = schema["type"]
        else:
            return schema


def _kind(schema: Any) -> str:
    return str(schema["type"] if isinstance(schema, dict) else schema)


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _same_name(reader: Mapping[str, Any], writer: Mapping[str, Any]) -> bool:
    """Whether the reader's named type matches the writer's, by unqualified name or alias.

    Unqualified, as Avro's Java SchemaCompatibility (which the Confluent registry uses)
    compares them: moving a type to another namespace does not break its readers.
    """
    wanted = _short(writer["name"])
    names = [reader["name"], *reader.get("aliases", ())]
    return any(_short(n) == wanted for n in names)


def _describe(schema: Any) -> str:
    kind = _kind(schema)
    if kind in _NAMED and isinstance(schema, dict):
        return f"{kind} {_short(schema['name'])!r}"
    if isinstance(schema, list):
        return "a union"
    return repr(kind)
