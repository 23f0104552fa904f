"""How a third-party payload (a GitHub push, a Stripe event) becomes a raw envelope.

A source's mapping names, for each envelope field it fills, where the value comes from::

    {"event_id": "sha256:$", "type": "header:x-github-event",
     "ts": "$.head_commit.timestamp", "entity": "$.repository.full_name"}

Expressions:

=========================== ======================================================
``$``                       the whole payload
``$.a.b``, ``$.a[0].b``     a path into the payload; ``[-1]`` is the last item
``$["key with.dots"]``      a key that is no plain name (JSON string syntax inside)
``header:<name>``           a request header, name case-insensitive
``sha256:<path>``           hex SHA-256 of the value at ``<path>`` (``sha256:$``: the
                            whole payload), as canonical JSON (sorted keys)
``const:<text>``            the literal string ``<text>``
``now``                     when the request arrived (epoch seconds, for ``ts``)
=========================== ======================================================

An ``event_id`` should come from the signed payload, not from a header: a header such
as ``x-github-delivery`` is not signed, so whoever replays a delivery can change it and
have the replay counted again. For a payload with no id of its own (a GitHub push),
``sha256:$`` is an id that only the payload's content decides: an identical payload is
the same event.

Paths are parsed by hand (no ``eval``), at most :data:`MAX_EXPRESSION_CHARS` long and
:data:`MAX_DEPTH` steps deep.

Applying a mapping (:func:`apply_mapping`):

* an empty mapping means the payload already is an envelope: it is returned as is;
* otherwise only the fields the mapping names are filled: the payload is foreign, so
  its own ``tenant`` or ``type`` keys are never taken by accident;
* ``attributes`` defaults to the whole payload when it is an object, or to
  ``{"payload": payload}`` when it is an array or a scalar;
* a path that finds nothing (or JSON ``null``) leaves its field out and adds a
  problem; integer ``event_id`` and ``entity`` values become strings (many APIs number
  their objects); every other type problem is left for ``core.envelope.validate_events``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from core.exceptions import ConfigurationError

__all__ = [
    "MAPPABLE_FIELDS",
    "MAX_DEPTH",
    "MAX_EXPRESSION_CHARS",
    "EnvelopeMapping",
    "apply_mapping",
    "parse_mapping",
]

MAPPABLE_FIELDS = (
    "event_id",
    "tenant",
    "type",
    "ts",
    "source",
    "entity",
    "value",
    "attributes",
)
MAX_DEPTH = 32
MAX_EXPRESSION_CHARS = 1024

_NAME = re.compile(r"[^.\[\]\"'\s]+")
_INDEX = re.compile(r"-?[0-9]{1,9}")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_HEADER = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_STRINGIFIED = ("event_id", "entity")
_HELP = 'expected $, $.a.b, $.a[0], $["key"], sha256:<path>, header:<name>, const:<text> or now'


@dataclass(frozen=True, slots=True)
class _Source:
    kind: str  # "path", "digest", "header", "const" or "now"
    steps: tuple[str | int, ...] = ()  # a str steps into an object, an int into an array
    text: str = ""


@dataclass(frozen=True, slots=True)
class EnvelopeMapping:
    """A parsed mapping.

    Attributes:
        fields: envelope field -> expression, as configured.
    """

    fields: Mapping[str, str]
    # Parsed once by parse_mapping; a mapping built directly is parsed when applied.
    compiled: tuple[tuple[str, _Source], ...] = field(default=(), repr=False, compare=False)


# ------------------------------------------------------------------------------- parsing


class _PathError(ValueError):
    pass


def _parse_path(expression: str) -> tuple[str | int, ...]:
    steps: list[str | int] = []
    at = 1  # after the "$"
    while at < len(expression):
        if len(steps) >= MAX_DEPTH:
            raise _PathError(f"it is more than {MAX_DEPTH} steps deep")
        at = _parse_step(expression, at, steps)
    return tuple(steps)


def _parse_step(expression: str, at: int, steps: list[str | int]) -> int:
    char = expression[at]
    if char == ".":
        match = _NAME.match(expression, at + 1)
        if match is None:
            raise _PathError(f"a name must follow '.' at position {at}")
        steps.append(match.group())
        return match.end()
    if char != "[":
        raise _PathError(f"unexpected {char!r} at position {at}")
    match = _INDEX.match(expression, at + 1) or _STRING.match(expression, at + 1)
    if match is None or not expression.startswith("]", match.end()):
        raise _PathError(
            f"'[' at position {at} must hold an integer or a double-quoted key and close with ']'"
        )
    token = match.group()
    steps.append(int(token) if token[0] != '"' else _unquote(token, at))
    return match.end() + 1


def _unquote(token: str, at: int) -> str:
    try:
        key = orjson.loads(token)
    except orjson.JSONDecodeError:
        raise _PathError(f"the key at position {at} is not a valid JSON string") from None
    return str(key)


def _parse_expression(name: str, expression: Any) -> _Source:
    if not isinstance(expression, str):
        raise ConfigurationError(
            f"mapping field '{name}': expected an expression string, "
            f"got {type(expression).__name__}; {_HELP}"
        )
    shown = expression[:60] + ("..." if len(expression) > 60 else "")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ConfigurationError(
            f"mapping field '{name}': expression {shown!r} is {len(expression)} characters, "
            f"over the {MAX_EXPRESSION_CHARS} limit"
        )
    if expression == "now":
        return _Source("now")
    if expression.startswith("const:"):
        return _Source("const", text=expression[len("const:") :])
    if expression.startswith("header:"):
        header = expression[len("header:") :].strip()
        if not _HEADER.fullmatch(header):
            raise ConfigurationError(
                f"mapping field '{name}': {shown!r} names no valid header; "
                "write header:<name>, e.g. header:x-github-delivery"
            )
        return _Source("header", text=header.lower())
    kind = "path"
    if expression.startswith("sha256:"):
        kind, expression = "digest", expression[len("sha256:") :]
    if not expression.startswith("$"):
        raise ConfigurationError(f"mapping field '{name}': cannot read {shown!r}: {_HELP}")
    try:
        return _Source(kind, steps=_parse_path(expression))
    except _PathError as exc:
        raise ConfigurationError(
            f"mapping field '{name}': path {shown!r} is invalid: {exc}; {_HELP}"
        ) from None


def parse_mapping(spec: Mapping[str, Any]) -> EnvelopeMapping:
    """Check a source's mapping (envelope field -> expression).

    Raises:
        ConfigurationError: naming the field and the expression that cannot be used.
    """
    if not isinstance(spec, Mapping):
        raise ConfigurationError(
            f"a source mapping must be an object of envelope field -> expression, "
            f"got {type(spec).__name__}"
        )
    compiled: list[tuple[str, _Source]] = []
    for name, expression in spec.items():
        if name not in MAPPABLE_FIELDS:
            raise ConfigurationError(
                f"mapping names field {name!r}, which is not an envelope field: "
                f"expected one of {', '.join(MAPPABLE_FIELDS)}"
            )
        compiled.append((name, _parse_expression(name, expression)))
    return EnvelopeMapping(fields=dict(spec), compiled=tuple(compiled))


# ------------------------------------------------------------------------------ applying


_MISSING = object()


def _follow(payload: Any, steps: tuple[str | int, ...]) -> Any:
    value = payload
    for step in steps:
        if isinstance(step, str) and isinstance(value, dict):
            value = value.get(step, _MISSING)
        elif isinstance(step, int) and isinstance(value, list) and -len(value) <= step < len(value):
            value = value[step]
        else:
            return _MISSING
        if value is _MISSING:
            return _MISSING
    return _MISSING if value is None else value


def _header(headers: Mapping[str, str], name: str) -> Any:
    value = headers.get(name)
    if value is None:
        # Starlette gives lower-case names, but a caller with another mapping may not.
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return _MISSING if value is None else value


def _evaluate(source: _Source, payload: Any, headers: Mapping[str, str], now_ms: int) -> Any:
    if source.kind == "path":
        return _follow(payload, source.steps)
    if source.kind == "digest":
        return _digest(_follow(payload, source.steps))
    if source.kind == "header":
        return _header(headers, source.text)
    if source.kind == "const":
        return source.text
    return now_ms / 1000


def apply_mapping(
    mapping: EnvelopeMapping,
    payload: Any,
    *,
    headers: Mapping[str, str],
    received_at_ms: int,
) -> tuple[dict[str, Any], list[str]]:
    """Build the raw event of ``payload`` as ``mapping`` says.

    Args:
        mapping: from :func:`parse_mapping`; empty means the payload is an envelope.
        payload: the decoded JSON body (or one record of it).
        headers: the request headers (names in lower case, as Starlette gives them).
        received_at_ms: when the request arrived (epoch ms); ``now`` reads it.

    Returns:
        The raw event, ready for ``core.envelope.validate_events``, and the problems
        found while mapping (each says which field, which expression, what was missing).
    """
    if not mapping.fields:
        if isinstance(payload, dict):
            return payload, []
        return {}, [
            f"payload is {_kind(payload)}, not an event object: send one JSON object per "
            "event, or give the source a mapping"
        ]
    compiled = mapping.compiled or parse_mapping(mapping.fields).compiled
    raw: dict[str, Any] = {}
    problems: list[str] = []
    for name, source in compiled:
        value = _evaluate(source, payload, headers, received_at_ms)
        if value is _MISSING:
            where = "request headers" if source.kind == "header" else "payload"
            problems.append(
                f"field '{name}' (mapped from {mapping.fields[name]}) found nothing in the {where}"
            )
            continue
        if name in _STRINGIFIED and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        raw[name] = value
    if "attributes" not in mapping.fields:
        raw["attributes"] = payload if isinstance(payload, dict) else {"payload": payload}
    return raw, problems


def _digest(value: Any) -> Any:
    if value is _MISSING:
        return _MISSING
    try:
        canonical = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # not JSON (a CSV row is; this is defensive): nothing to hash
        return _MISSING
    return hashlib.sha256(canonical).hexdigest()


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"
