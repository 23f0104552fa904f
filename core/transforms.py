"""Transforms and enrichment declared in settings, applied to a whole micro-batch at once.

A worker decodes each micro-batch into a flat :class:`pyarrow.Table` (``event_id``,
``source``, ``tenant``, ``type``, ``ts``, ``value``, ``entity`` and the declared attributes
under dotted names such as ``attributes.device``). The steps below rewrite that table
column by column with :mod:`pyarrow.compute`, so a step costs a few Arrow kernels per
batch and never a Python call per event.

Steps
=====

Settings list the steps in order; each is a mapping with exactly one key::

    - rename: {from: attributes.temp_c, to: temp}
    - cast: {field: attributes.amount, to: float}      # float | int | string | bool
    - derive: {field: value, expr: "(attributes.temp_f - 32) * 5 / 9"}
    - filter: "type != 'debug' and value >= 0"

``rename``
    Renames a column; a column already called ``to`` is replaced. When ``from`` is not in
    the batch (an attribute no event of this batch carried), ``to`` becomes a column of
    nulls (Arrow's null type) instead of failing the batch.
``cast``
    Converts a column to ``float`` (float64), ``int`` (int64), ``string`` or ``bool``. A value
    that does not convert becomes null, and its row leaves the output and is reported in
    :attr:`TransformOutcome.failed` with the reason, for the worker to dead-letter. Strings
    convert when they are written plainly: ``float`` takes ``[+-]digits[.digits][e[+-]digits]``
    (not ``nan``, ``inf``, nor values too large for a float64), ``int`` takes ``[+-]digits``
    within int64, ``bool`` takes ``true``, ``false``, ``1`` or ``0`` in any case; there is no
    trimming of spaces. A float converts to ``int`` only when it is whole and within
    int64. Numbers convert to ``bool`` as non-zero; everything converts to ``string`` (floats
    in their shortest form: 1.0 gives ``"1"``). A missing column becomes a column of nulls
    of the target type, as for ``rename``.
``derive``
    Sets a column, new or existing, to the value of an expression.
``filter``
    Keeps the rows where the expression is true; a null result counts as false. Dropped
    rows are not failures: :attr:`TransformOutcome.kept` says which input rows remain.

Expressions
===========

Expressions use Python's syntax, parsed once and checked against a whitelist; they are
never passed to ``eval``. Allowed:

* column names: bare (``value``, ``type``) or dotted (``attributes.temp_f``). A column
  whose name is not made of identifiers (``attributes.temp-c``) or is a Python keyword
  cannot be named here: rename it first. Names starting with ``__`` are refused.
* literals: numbers (ints within int64, finite floats), strings, ``True``, ``False``, ``None``.
* arithmetic on numbers: unary ``-``, ``+ - * / % //``. ``/`` always gives a float;
  ``//`` and ``%`` follow Python's signs (floored). Any division by zero gives null.
  Integer arithmetic wraps around on int64 overflow, as Arrow does; cast to float first
  when values can be that large.
* comparisons ``== != < <= > >=`` between numbers, between strings (code-point order) or
  between booleans; chained comparisons (``0 <= value < 100``) mean the ``and`` of each
  pair. Comparing with ``None`` is refused: use ``is_null(x)``.
* ``x in [...]`` and ``x not in (...)`` with a literal list of strings, numbers or
  booleans (not ``None``).
* ``and``, ``or``, ``not`` on booleans only (a number is not a truth value here).
* functions: ``lower(s)``, ``upper(s)`` (per-character Unicode case mapping, so
  ``upper('ß')`` is ``'ẞ'``), ``abs(x)``, ``round(x)`` / ``round(x, n)`` with a literal
  ``n`` in [-15, 15] (half to even on the decimal value, so ``round(2.675, 2)`` is 2.68),
  ``coalesce(a, b, ...)`` (first non-null), ``if_else(cond, a, b)``,
  ``concat(s, ...)`` (strings only), ``is_null(x)``.

Everything else (attribute access on anything but a name, subscripts, calls of other
functions or methods, keyword arguments, lambdas, comprehensions, f-strings, ``is``,
``**``, conditional expressions...) is refused when the settings are parsed, with the
construct named. An expression is at most 1,000 characters and 50 levels deep.

Types are checked when a batch is evaluated, because only then are the column types
known: ``tenant + 1`` or ``value == 'x'`` fails with :class:`TransformError` naming the
operand, as does a name that is not a column of the batch.

Nulls follow Arrow (and SQL): an operator or function with a null operand gives null,
except that ``and``/``or`` use Kleene's three-valued logic (``False and null`` is false,
``True or null`` is true, ``True and null`` is null), ``coalesce`` and ``is_null`` look at
nulls on purpose, and ``if_else`` with a null condition gives null. ``null in [...]`` is
null, so ``null not in [...]`` is null too and a filter drops the row. ``concat`` is null
when any argument is: write ``concat(coalesce(x, ''), ...)`` to skip a missing part.
``if_else`` and ``coalesce`` need arguments of one type (ints and floats mix as floats).

Enrichment
==========

:func:`enrich` adds columns of a dimension table (``device_id -> site, region``) by
looking up an event column in the dimension's key column; see :class:`EnrichmentSpec`
and :class:`DimensionCache`.
"""

from __future__ import annotations

import ast
import difflib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

__all__ = [
    "MAX_EXPRESSION_DEPTH",
    "MAX_EXPRESSION_LENGTH",
    "Cast",
    "Derive",
    "DimensionCache",
    "EnrichmentSpec",
    "Expression",
    "Filter",
    "Rename",
    "Transform",
    "TransformError",
    "TransformOutcome",
    "apply_transforms",
    "enrich",
    "parse_enrichment",
    "parse_expression",
    "parse_transforms",
    "referenced_columns",
]

MAX_EXPRESSION_LENGTH = 1_000
MAX_EXPRESSION_DEPTH = 50


class TransformError(ValueError):
    """A transform or enrichment setting is invalid, or cannot apply to a batch."""


# --------------------------------------------------------------------------- expressions

_FUNCTIONS: dict[str, tuple[int, int | None]] = {  # name -> (fewest, most arguments)
    "abs": (1, 1),
    "coalesce": (1, None),
    "concat": (1, None),
    "if_else": (3, 3),
    "is_null": (1, 1),
    "lower": (1, 1),
    "round": (1, 2),
    "upper": (1, 1),
}
_BINOPS: dict[type[ast.operator], str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.Mod: "%",
    ast.FloorDiv: "//",
}
_CMPOPS: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: pc.equal,
    ast.NotEq: pc.not_equal,
    ast.Lt: pc.less,
    ast.LtE: pc.less_equal,
    ast.Gt: pc.greater,
    ast.GtE: pc.greater_equal,
}
_OTHER_OPERATORS = {
    "Pow": "**",
    "MatMult": "@",
    "LShift": "<<",
    "RShift": ">>",
    "BitOr": "|",
    "BitXor": "^",
    "BitAnd": "&",
    "Invert": "~",
    "UAdd": "unary +",
}
_CONSTRUCTS: dict[type[ast.AST], str] = {
    ast.Subscript: "subscript",
    ast.Slice: "slice",
    ast.Lambda: "lambda",
    ast.ListComp: "list comprehension",
    ast.SetComp: "set comprehension",
    ast.DictComp: "dict comprehension",
    ast.GeneratorExp: "generator expression",
    ast.JoinedStr: "f-string",
    ast.FormattedValue: "f-string",
    ast.Dict: "dict literal",
    ast.List: "list literal (only allowed after 'in')",
    ast.Tuple: "tuple literal (only allowed after 'in')",
    ast.Set: "set literal (only allowed after 'in')",
    ast.IfExp: "conditional expression (use if_else(cond, a, b))",
    ast.NamedExpr: "assignment expression",
    ast.Starred: "starred argument",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}


class _Rejected(Exception):
    """A construct outside the whitelist; parse_expression adds the expression's text."""


def _short(value: object, limit: int = 80) -> str:
    """The repr of a value, cut so that one hostile value cannot flood a log line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _snippet(node: ast.AST) -> str:
    """The source text of a node, cut to a readable length."""
    text = ast.unparse(node)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Expression:
    """A checked expression: its text, its tree and the columns it reads.

    Attributes:
        source: The expression as written in the settings.
        tree: The checked syntax tree (only whitelisted nodes).
        columns: Every column name the expression reads.
    """

    source: str
    tree: ast.expr = field(repr=False, compare=False)
    columns: frozenset[str]

    def evaluate(self, table: pa.Table) -> pa.Array:
        """Evaluate against the columns of ``table``, giving one value per row.

        Raises:
            TransformError: A column is missing or an operand has the wrong type.
        """
        try:
            return _Evaluator(table).eval(self.tree)
        except TransformError as exc:
            raise TransformError(f"expression {_short(self.source)}: {exc}") from None
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            # Unforeseen type combinations surface as Arrow errors: give them one type.
            raise TransformError(f"expression {_short(self.source)}: {exc}") from exc


def parse_expression(source: str) -> Expression:
    """Parse and check one expression of the transform language.

    Raises:
        TransformError: The text is too long, too deep, not valid syntax, or uses a
            construct outside the whitelist; the message names the construct.
    """
    if len(source) > MAX_EXPRESSION_LENGTH:
        raise TransformError(
            f"expression {_short(source)} is {len(source)} characters long; "
            f"the limit is {MAX_EXPRESSION_LENGTH}"
        )
    try:
        tree = ast.parse(source.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        reason = exc.msg if isinstance(exc, SyntaxError) else type(exc).__name__
        raise TransformError(f"expression {_short(source)} is not valid syntax: {reason}") from None
    depth = _depth(tree)
    if depth > MAX_EXPRESSION_DEPTH:
        raise TransformError(
            f"expression {_short(source)} nests {depth} levels deep; "
            f"the limit is {MAX_EXPRESSION_DEPTH}"
        )
    checker = _Checker()
    try:
        checker.check(tree)
    except _Rejected as exc:
        raise TransformError(f"expression {_short(source)}: {exc}") from None
    return Expression(source, tree, frozenset(checker.columns))


def _depth(tree: ast.expr) -> int:
    """Nesting depth counted in expression nodes, iteratively: the tree is still untrusted."""
    deepest = 0
    stack: list[tuple[ast.AST, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        for child in ast.iter_child_nodes(node):
            stack.append((child, depth + 1 if isinstance(child, ast.expr) else depth))
    return deepest


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` as the column name "a.b.c"; None when the chain does not start at a name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


class _Checker:
    """Walks a parsed tree, refusing anything outside the whitelist, collecting columns."""

    def __init__(self) -> None:
        self.columns: set[str] = set()

    def check(self, node: ast.AST) -> None:
        match node:
            case ast.Constant():
                _check_constant(node)
            case ast.Name() | ast.Attribute():
                self._column(node)
            case ast.UnaryOp(op=ast.USub() | ast.Not()):
                self.check(node.operand)
            case ast.BinOp(op=op) if type(op) in _BINOPS:
                self.check(node.left)
                self.check(node.right)
            case ast.BoolOp():
                for value in node.values:
                    self.check(value)
            case ast.Compare():
                self._compare(node)
            case ast.Call():
                self._call(node)
            case _:
                raise _Rejected(_refusal(node))

    def _column(self, node: ast.Name | ast.Attribute) -> None:
        name = _dotted(node)
        if name is None:
            raise _Rejected(
                f"attribute access on a non-name ({_snippet(node)!r}) is not allowed; "
                "dotted names must be column names such as attributes.device"
            )
        if any(part.startswith("__") for part in name.split(".")):
            raise _Rejected(f"name {name!r} is not allowed: names starting with '__' are refused")
        self.columns.add(name)

    def _compare(self, node: ast.Compare) -> None:
        operands = [node.left, *node.comparators]
        for position, op in enumerate(node.ops):
            left, right = operands[position], operands[position + 1]
            if isinstance(op, ast.Is | ast.IsNot):
                raise _Rejected(f"'is' in {_snippet(node)!r} is not allowed; use is_null(x)")
            if isinstance(op, ast.In | ast.NotIn):
                if position + 1 < len(node.ops):
                    raise _Rejected(f"a literal list cannot be compared in {_snippet(node)!r}")
                _literal_list(right)
            elif _is_none(left) or _is_none(right):
                raise _Rejected(
                    f"comparison with None in {_snippet(node)!r} is always null; use is_null(x)"
                )
            else:
                self.check(right)
        self.check(node.left)

    def _call(self, node: ast.Call) -> None:
        if not isinstance(node.func, ast.Name):
            raise _Rejected(
                f"call {_snippet(node)!r} is not allowed: only the listed functions, "
                "called by name, e.g. lower(x)"
            )
        name = node.func.id
        if name not in _FUNCTIONS:
            raise _Rejected(
                f"function {name!r} is not allowed; allowed functions: {', '.join(_FUNCTIONS)}"
            )
        if node.keywords:
            raise _Rejected(f"keyword arguments in {_snippet(node)!r} are not allowed")
        fewest, most = _FUNCTIONS[name]
        if len(node.args) < fewest or (most is not None and len(node.args) > most):
            expected = str(fewest) if fewest == most else f"{fewest} to {most or 'any number'}"
            raise _Rejected(f"{name}() takes {expected} argument(s), got {len(node.args)}")
        if name == "round" and len(node.args) == 2:
            _round_digits(node.args[1])
        for argument in node.args[:1] if name == "round" else node.args:
            self.check(argument)


def _refusal(node: ast.AST) -> str:
    """Names a refused construct, with the way to write it when there is one."""
    if isinstance(node, ast.BinOp | ast.UnaryOp):
        name = type(node.op).__name__
        what = f"operator {_OTHER_OPERATORS.get(name, name)!r}"
    else:
        what = _CONSTRUCTS.get(type(node), type(node).__name__)
    text = f" {_snippet(node)!r}" if isinstance(node, ast.expr) else ""
    return f"{what}{text} is not allowed"


def _check_constant(node: ast.Constant) -> None:
    value = node.value
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return
    if isinstance(value, float) and math.isfinite(value):
        return
    raise _Rejected(f"literal {_snippet(node)!r} is not allowed (not an int64, float or string)")


def _is_none(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def _literal_number(node: ast.expr) -> int | float | None:
    """The value of ``3``, ``-2.5`` and the like; None for anything else."""
    negative = isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
    inner = node.operand if isinstance(node, ast.UnaryOp) and negative else node
    if not isinstance(inner, ast.Constant) or isinstance(inner.value, bool):
        return None
    if not isinstance(inner.value, int | float):
        return None
    _check_constant(inner)
    return -inner.value if negative else inner.value


def _literal_list(node: ast.expr) -> list[Any]:
    """The constants after ``in``: all strings, all numbers or all booleans."""
    if not isinstance(node, ast.List | ast.Tuple | ast.Set):
        raise _Rejected(f"'in' needs a literal list such as ('a', 'b'), got {_snippet(node)!r}")
    values: list[Any] = []
    for element in node.elts:
        number = _literal_number(element)
        if number is not None:
            values.append(number)
        elif isinstance(element, ast.Constant) and isinstance(element.value, str | bool):
            values.append(element.value)
        else:
            hint = "; use is_null(x)" if _is_none(element) else ""
            raise _Rejected(f"{_snippet(element)!r} cannot be in a literal list{hint}")
    if len({_value_kind(value) for value in values}) > 1:
        raise _Rejected(f"literal list {_snippet(node)!r} mixes strings, numbers and booleans")
    return values


def _value_kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    return "string" if isinstance(value, str) else "number"


def _round_digits(node: ast.expr) -> int:
    digits = _literal_number(node)
    if not isinstance(digits, int) or not -15 <= digits <= 15:
        raise _Rejected(
            f"round() needs a literal int in [-15, 15] as digits, got {_snippet(node)!r}"
        )
    return digits


# --------------------------------------------------------------------------- evaluation


def _kind(type_: pa.DataType) -> str:
    """The family of an Arrow type, as the type rules of the language see it."""
    if pa.types.is_null(type_):
        return "null"
    if pa.types.is_boolean(type_):
        return "bool"
    if pa.types.is_integer(type_):
        return "int"
    if pa.types.is_floating(type_):
        return "float"
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        return "string"
    return str(type_)


_NUMERIC = frozenset({"int", "float", "null"})


def _literal(value: object, length: int) -> pa.Array:
    if value is None:
        return pa.nulls(length)
    return pa.repeat(pa.scalar(value), length)


def _null_mask(values: pa.Array) -> np.ndarray:
    return np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=bool)


def _common_type(arrays: Sequence[pa.Array], what: str) -> pa.DataType | None:
    """The type that arrays of mixed families convert to; None when all are null."""
    kinds = {_kind(a.type) for a in arrays} - {"null"}
    if not kinds:
        return None
    if kinds <= {"int", "float"}:
        return pa.float64() if "float" in kinds else pa.int64()
    if kinds == {"string"}:
        return pa.string()
    if len(kinds) == 1:
        return next(a.type for a in arrays if _kind(a.type) != "null")
    raise TransformError(f"{what} needs arguments of one type, got {', '.join(sorted(kinds))}")


def _unify(arrays: Sequence[pa.Array], what: str) -> list[pa.Array]:
    target = _common_type(arrays, what)
    if target is None:
        return list(arrays)
    return [a if a.type == target else pc.cast(a, target) for a in arrays]


def _true_divide(left: pa.Array, right: pa.Array) -> pa.Array:
    """``/`` in float64; a zero divisor gives null rather than inf or an error."""
    a = pc.cast(left, pa.float64())
    b = pc.cast(right, pa.float64())
    return pc.if_else(pc.equal(b, 0.0), pa.scalar(None, pa.float64()), pc.divide(a, b))


def _floored(op: ast.operator, left: pa.Array, right: pa.Array) -> pa.Array:
    """``//`` and ``%`` with Python's signs, which NumPy's kernels share; x // 0 is null."""
    integral = _kind(left.type) == "int" and _kind(right.type) == "int"
    target = pa.int64() if integral else pa.float64()
    a = pc.fill_null(pc.cast(left, target), 0).to_numpy(zero_copy_only=False)
    b = pc.fill_null(pc.cast(right, target), 0).to_numpy(zero_copy_only=False)
    zero = b == 0
    invalid = _null_mask(left) | _null_mask(right) | zero
    with np.errstate(all="ignore"):  # int64 overflow wraps, as Arrow's own kernels do
        divisor = np.where(zero, 1, b).astype(a.dtype)
        out = np.floor_divide(a, divisor) if isinstance(op, ast.FloorDiv) else np.mod(a, divisor)
    return pa.array(out, type=target, mask=invalid)


def _member(values: pa.Array, options: list[Any], negate: bool, text: str) -> pa.Array:
    """SQL's IN: true, false, or null when the value itself is null."""
    kind = _kind(values.type)
    if kind == "null":
        return pa.nulls(len(values), pa.bool_())
    wanted = {_value_kind(o) for o in options}
    family = "number" if kind in ("int", "float") else kind
    if wanted and wanted != {family}:
        raise TransformError(f"{text!r} is {kind} but the list after 'in' holds {wanted.pop()}s")
    value_set = pa.array(options, type=values.type if family != "number" else None)
    if family == "number" and (kind == "float" or any(isinstance(o, float) for o in options)):
        # is_in hashes bits, so -0.0 would miss 0; adding 0.0 turns -0.0 into 0.0.
        values = pc.add(pc.cast(values, pa.float64()), 0.0)
        value_set = pc.add(pc.cast(value_set, pa.float64()), 0.0)
    elif family == "number":
        value_set = pc.cast(value_set, values.type)
    found = pc.is_in(values, value_set=value_set, skip_nulls=True)
    found = pc.invert(found) if negate else found
    return pc.if_else(values.is_valid(), found, pa.scalar(None, pa.bool_()))


class _Evaluator:
    """Evaluates a checked tree against one table; each node costs a few Arrow kernels."""

    def __init__(self, table: pa.Table) -> None:
        self._table = table
        self._length = table.num_rows

    def eval(self, node: ast.expr) -> pa.Array:
        match node:
            case ast.Constant(value=value):
                return _literal(value, self._length)
            case ast.Name() | ast.Attribute():
                return self._column(str(_dotted(node)))
            case ast.UnaryOp(op=ast.USub(), operand=operand):
                return pc.negate(self._numeric(operand, "unary '-'"))
            case ast.UnaryOp(op=ast.Not(), operand=operand):
                return pc.invert(self._boolean(operand, "not"))
            case ast.BinOp():
                return self._binop(node)
            case ast.BoolOp():
                return self._boolop(node)
            case ast.Compare():
                return self._compare(node)
            case ast.Call(func=ast.Name(id=name)):
                return self._call(name, node.args)
        raise AssertionError(f"unchecked node {ast.dump(node)}")  # the checker admits no other

    def _column(self, name: str) -> pa.Array:
        if name not in self._table.column_names:
            available = ", ".join(self._table.column_names)
            raise TransformError(f"column {name!r} does not exist; available columns: {available}")
        return self._table.column(name).combine_chunks()

    def _typed(self, node: ast.expr, kinds: frozenset[str], what: str) -> pa.Array:
        values = self.eval(node)
        kind = _kind(values.type)
        if kind not in kinds:
            wanted = " or ".join(sorted(kinds - {"null"}))
            raise TransformError(f"{what} needs {wanted}, but {_snippet(node)!r} is {kind}")
        return values

    def _numeric(self, node: ast.expr, what: str) -> pa.Array:
        values = self._typed(node, _NUMERIC, what)
        # A column of nulls (or None) has no number type: int64 lets kernels run on it.
        return pc.cast(values, pa.int64()) if _kind(values.type) == "null" else values

    def _boolean(self, node: ast.expr, what: str) -> pa.Array:
        values = self._typed(node, frozenset({"bool", "null"}), what)
        return pc.cast(values, pa.bool_())

    def _binop(self, node: ast.BinOp) -> pa.Array:
        what = f"operator {_BINOPS[type(node.op)]!r}"
        left = self._numeric(node.left, what)
        right = self._numeric(node.right, what)
        if isinstance(node.op, ast.Div):
            return _true_divide(left, right)
        if isinstance(node.op, ast.FloorDiv | ast.Mod):
            return _floored(node.op, left, right)
        left, right = _unify([left, right], what)
        kernel = {ast.Add: pc.add, ast.Sub: pc.subtract, ast.Mult: pc.multiply}[type(node.op)]
        return kernel(left, right)

    def _boolop(self, node: ast.BoolOp) -> pa.Array:
        # Kleene logic, as SQL: a null operand only matters when it decides the result.
        kernel = pc.and_kleene if isinstance(node.op, ast.And) else pc.or_kleene
        what = "'and'" if isinstance(node.op, ast.And) else "'or'"
        result = self._boolean(node.values[0], what)
        for value in node.values[1:]:
            result = kernel(result, self._boolean(value, what))
        return result

    def _compare(self, node: ast.Compare) -> pa.Array:
        left_node, left = node.left, self.eval(node.left)
        result: pa.Array | None = None
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            if isinstance(op, ast.In | ast.NotIn):
                options = _literal_list(right_node)
                part = _member(left, options, isinstance(op, ast.NotIn), ast.unparse(left_node))
            else:
                right = self.eval(right_node)
                part = _compare_pair(op, (left_node, left), (right_node, right))
                left_node, left = right_node, right
            result = part if result is None else pc.and_kleene(result, part)
        assert result is not None  # a Compare has at least one operator
        return result

    def _call(self, name: str, args: list[ast.expr]) -> pa.Array:
        if name == "round":
            digits = _round_digits(args[1]) if len(args) == 2 else 0
            values = self._numeric(args[0], "round()")
            return pc.round(values, ndigits=digits, round_mode="half_to_even")
        if name in ("lower", "upper"):
            values = self._typed(args[0], frozenset({"string", "null"}), f"{name}()")
            values = pc.cast(values, pa.string())
            return pc.utf8_lower(values) if name == "lower" else pc.utf8_upper(values)
        if name == "abs":
            return pc.abs(self._numeric(args[0], "abs()"))
        if name == "is_null":
            return pc.is_null(self.eval(args[0]))
        if name == "if_else":
            condition = self._boolean(args[0], "if_else() condition")
            then, otherwise = _unify([self.eval(args[1]), self.eval(args[2])], "if_else()")
            return pc.if_else(condition, then, otherwise)
        return self._variadic(name, args)

    def _variadic(self, name: str, args: list[ast.expr]) -> pa.Array:
        if name == "coalesce":
            values = _unify([self.eval(a) for a in args], "coalesce()")
            return values[0] if len(values) == 1 else pc.coalesce(*values)
        strings = frozenset({"string", "null"})
        parts = [pc.cast(self._typed(a, strings, "concat()"), pa.string()) for a in args]
        return pc.binary_join_element_wise(*parts, "")


def _compare_pair(
    op: ast.cmpop, left: tuple[ast.expr, pa.Array], right: tuple[ast.expr, pa.Array]
) -> pa.Array:
    """One comparison; the families must match (ints and floats compare as numbers)."""
    kinds = {_kind(left[1].type), _kind(right[1].type)}
    if "null" in kinds:
        return pa.nulls(len(left[1]), pa.bool_())
    if len(kinds) > 1 and not kinds <= {"int", "float"}:
        raise TransformError(
            f"cannot compare {_snippet(left[0])!r} ({_kind(left[1].type)}) with "
            f"{_snippet(right[0])!r} ({_kind(right[1].type)}); cast one side first"
        )
    return _CMPOPS[type(op)](left[1], right[1])


# --------------------------------------------------------------------------- casts

_CAST_TYPES: dict[str, pa.DataType] = {
    "float": pa.float64(),
    "int": pa.int64(),
    "string": pa.string(),
    "bool": pa.bool_(),
}
# Stricter than Arrow's parsers, so that what passes surely parses: the rest is a failure.
_PATTERNS = {
    "float": r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$",
    "int": r"^[+-]?\d+$",
    "bool": r"(?i)^(true|false|1|0)$",
}


def _castable(values: pa.Array, kind: str, to: str) -> pa.Array | None:
    """Which values will convert, tested on the whole column; None when all will."""
    if kind == "string" and to in _PATTERNS:
        return pc.match_substring_regex(values, _PATTERNS[to])
    if kind == "float" and to == "int":
        whole = pc.and_(pc.is_finite(values), pc.equal(pc.floor(values), values))
        in_range = pc.and_(pc.greater_equal(values, -(2.0**63)), pc.less(values, 2.0**63))
        return pc.and_(whole, in_range)
    return None


def _failing_positions(values: pa.Array, options: pc.CastOptions, offset: int = 0) -> list[int]:
    """Positions whose cast fails. Arrow's cast is all or nothing; halving finds the k
    culprits in O(k log n) casts, for values that pass the patterns but still fail
    (an int beyond int64, say)."""
    try:
        pc.cast(values, options=options)
    except pa.ArrowInvalid:
        if len(values) == 1:
            return [offset]
        half = len(values) // 2
        first = _failing_positions(values.slice(0, half), options, offset)
        return first + _failing_positions(values.slice(half), options, offset + half)
    return []


def _cast_values(values: pa.Array, to: str) -> pa.Array:
    """Cast a column; a value that does not convert becomes null instead of an error."""
    target = _CAST_TYPES[to]
    kind = _kind(values.type)
    if kind == "null":
        return pa.nulls(len(values), target)
    candidates = _castable(values, kind, to)
    if candidates is not None:
        values = pc.if_else(candidates, values, pa.scalar(None, values.type))
    if kind == "string" and to == "int":
        values = pc.replace_substring_regex(values, pattern=r"^\+", replacement="")
    # Between numbers the candidates were checked above; int -> float may round, by design.
    safe = not (kind in ("int", "float", "bool") and to in ("int", "float"))
    options = pc.CastOptions(target) if safe else pc.CastOptions.unsafe(target)
    try:
        result = pc.cast(values, options=options)
    except pa.ArrowInvalid:
        bad = np.zeros(len(values), dtype=bool)
        bad[_failing_positions(values, options)] = True
        values = pc.if_else(pa.array(bad), pa.scalar(None, values.type), values)
        result = pc.cast(values, options=options)
    except pa.ArrowNotImplementedError:
        raise TransformError(f"a column of type {values.type} cannot be cast to {to}") from None
    if kind == "string" and to == "float":  # "1e999" parses, as inf
        result = pc.if_else(pc.is_finite(result), result, pa.scalar(None, target))
    return result


# --------------------------------------------------------------------------- steps


@dataclass
class _Batch:
    """The table being transformed and, for each of its rows, the input row it came from."""

    table: pa.Table
    rows: np.ndarray
    failed: dict[int, str]

    def keep(self, mask: np.ndarray) -> None:
        self.table = self.table.filter(pa.array(mask, type=pa.bool_()))
        self.rows = self.rows[mask]


def _put(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Set a column in place when it exists (keeping its position), else append it."""
    position = table.schema.get_field_index(name)
    if position >= 0:
        return table.set_column(position, name, values)
    return table.append_column(name, values)


@dataclass(frozen=True)
class Transform:
    """One parsed step. :func:`parse_transforms` makes them; :func:`apply_transforms` runs them.

    Attributes:
        index: Position of the step in the settings, for error messages.
    """

    index: int
    kind: ClassVar[str] = ""

    def reads(self) -> frozenset[str]:
        """Columns the step reads."""
        return frozenset()

    def writes(self) -> frozenset[str]:
        """Columns the step creates or replaces."""
        return frozenset()

    def describe(self) -> str:
        """How error messages name the step."""
        return f"transform step {self.index} ({self.kind})"

    def _apply(self, batch: _Batch) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Rename(Transform):
    """``{"rename": {"from": ..., "to": ...}}``; a missing source gives a column of nulls."""

    source: str
    target: str
    kind: ClassVar[str] = "rename"

    def reads(self) -> frozenset[str]:
        return frozenset({self.source})

    def writes(self) -> frozenset[str]:
        return frozenset({self.target})

    def _apply(self, batch: _Batch) -> None:
        table = batch.table
        if self.source not in table.column_names:
            batch.table = _put(table, self.target, pa.nulls(table.num_rows))
            return
        if self.target != self.source and self.target in table.column_names:
            table = table.drop_columns([self.target])
        names = [self.target if n == self.source else n for n in table.column_names]
        batch.table = table.rename_columns(names)


@dataclass(frozen=True)
class Cast(Transform):
    """``{"cast": {"field": ..., "to": ...}}``; rows whose value does not convert fail."""

    field: str
    to: Literal["float", "int", "string", "bool"]
    kind: ClassVar[str] = "cast"

    def reads(self) -> frozenset[str]:
        return frozenset({self.field})

    def writes(self) -> frozenset[str]:
        return frozenset({self.field})

    def _apply(self, batch: _Batch) -> None:
        table = batch.table
        if self.field in table.column_names:
            values = table.column(self.field).combine_chunks()
        else:
            values = pa.nulls(table.num_rows)
        result = _cast_values(values, self.to)
        failed = ~_null_mask(values) & _null_mask(result)
        batch.table = _put(table, self.field, result)
        if failed.any():
            self._report(batch, values.filter(pa.array(failed)).to_pylist(), failed)
            batch.keep(~failed)

    def _report(self, batch: _Batch, bad: list[Any], failed: np.ndarray) -> None:
        # One entry per failed row: these go to the dead-letter topic with their reason.
        for row, value in zip(batch.rows[failed].tolist(), bad, strict=True):
            batch.failed[row] = f"cast of {self.field!r} to {self.to} failed: got {_short(value)}"


@dataclass(frozen=True)
class Derive(Transform):
    """``{"derive": {"field": ..., "expr": ...}}``: a new or replaced column."""

    field: str
    expr: Expression
    kind: ClassVar[str] = "derive"

    def reads(self) -> frozenset[str]:
        return self.expr.columns

    def writes(self) -> frozenset[str]:
        return frozenset({self.field})

    def _apply(self, batch: _Batch) -> None:
        batch.table = _put(batch.table, self.field, self.expr.evaluate(batch.table))


@dataclass(frozen=True)
class Filter(Transform):
    """``{"filter": expr}``: keeps the rows where ``expr`` is true (null counts as false)."""

    expr: Expression
    kind: ClassVar[str] = "filter"

    def reads(self) -> frozenset[str]:
        return self.expr.columns

    def _apply(self, batch: _Batch) -> None:
        result = self.expr.evaluate(batch.table)
        if _kind(result.type) not in ("bool", "null"):
            raise TransformError(
                f"a filter must be true or false, but {_short(self.expr.source)} "
                f"is {_kind(result.type)}; compare it, e.g. x > 0"
            )
        mask = pc.fill_null(pc.cast(result, pa.bool_()), False)
        batch.keep(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))


@dataclass
class TransformOutcome:
    """What :func:`apply_transforms` made of a batch.

    Every input row is exactly one of: kept (in :attr:`table`), failed (in :attr:`failed`),
    or filtered out (neither).

    Attributes:
        table: The transformed table: the kept rows, in input order.
        kept: Boolean mask over the input rows; True for the rows in ``table``.
        failed: Input row index -> reason, for rows a cast could not convert.
    """

    table: pa.Table
    kept: np.ndarray
    failed: dict[int, str]

    @property
    def filtered(self) -> int:
        """How many input rows a filter dropped (failed rows not included)."""
        return int(self.kept.size - np.count_nonzero(self.kept)) - len(self.failed)


def apply_transforms(table: pa.Table, steps: Sequence[Transform]) -> TransformOutcome:
    """Apply parsed steps, in order, to a whole batch.

    Raises:
        TransformError: An expression reads a missing column or mistyped operand; the
            message names the step.
    """
    batch = _Batch(table, np.arange(table.num_rows), {})
    for step in steps:
        try:
            step._apply(batch)
        except TransformError as exc:
            raise TransformError(f"{step.describe()}: {exc}") from exc
    kept = np.zeros(table.num_rows, dtype=bool)
    kept[batch.rows] = True
    return TransformOutcome(batch.table, kept, batch.failed)


def referenced_columns(steps: Sequence[Transform]) -> frozenset[str]:
    """Columns the steps read from the decoded batch, for the decoder to extract.

    A column that an earlier step creates (``derive``, ``rename``'s target) is not
    counted, since the decoder cannot provide it.
    """
    needed: set[str] = set()
    produced: set[str] = set()
    for step in steps:
        needed |= step.reads() - produced
        produced |= step.writes()
    return frozenset(needed)


# --------------------------------------------------------------------------- settings

_Name = Annotated[str, StringConstraints(min_length=1, max_length=500)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _RenameSpec(_Model):
    source: _Name = Field(alias="from")
    to: _Name


class _CastSpec(_Model):
    field: _Name
    to: Literal["float", "int", "string", "bool"]


class _DeriveSpec(_Model):
    field: _Name
    expr: str


class _Step(_Model):
    rename: _RenameSpec | None = None
    cast: _CastSpec | None = None
    derive: _DeriveSpec | None = None
    filter: str | None = None


_EXAMPLES = {
    "rename": '{"rename": {"from": "attributes.temp_c", "to": "temp"}}',
    "cast": '{"cast": {"field": "attributes.amount", "to": "float"}}',
    "derive": '{"derive": {"field": "temp", "expr": "(attributes.temp_f - 32) * 5 / 9"}}',
    "filter": '{"filter": "type != \'debug\' and value >= 0"}',
}


def _pydantic_problems(exc: ValidationError) -> Iterator[str]:
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        got = "" if error["type"] == "missing" else f", got {_short(error.get('input'))}"
        yield f"field {where!r}: {error['msg']}{got}"


def _step_kind(index: int, step: object) -> str:
    """The one key of a step, or an error saying what a step looks like."""
    keys = list(step) if isinstance(step, Mapping) else None
    if keys is not None and len(keys) == 1 and keys[0] in _EXAMPLES:
        return str(keys[0])
    got = f"keys {keys}" if keys is not None else f"{type(step).__name__} {_short(step)}"
    close = difflib.get_close_matches(str(keys[0]), _EXAMPLES, n=1) if keys else []
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise TransformError(
        f"transform step {index}: expected a mapping with exactly one of the keys "
        f"{', '.join(_EXAMPLES)}, got {got}. Fix: {hint}write e.g. {_EXAMPLES['filter']}"
    )


def _parse_step(index: int, step: Mapping[str, Any]) -> Transform:
    kind = _step_kind(index, step)
    try:
        model = _Step.model_validate(dict(step))
    except ValidationError as exc:
        problems = "; ".join(_pydantic_problems(exc))
        raise TransformError(
            f"transform step {index} ({kind}): {problems}. Fix: write it like {_EXAMPLES[kind]}"
        ) from None
    if model.rename is not None:
        return Rename(index, model.rename.source, model.rename.to)
    if model.cast is not None:
        return Cast(index, model.cast.field, model.cast.to)
    if model.derive is not None:
        return Derive(index, model.derive.field, _step_expression(index, kind, model.derive.expr))
    assert model.filter is not None  # _step_kind saw exactly one known key
    return Filter(index, _step_expression(index, kind, model.filter))


def _step_expression(index: int, kind: str, source: str) -> Expression:
    try:
        return parse_expression(source)
    except TransformError as exc:
        where = "derive.expr" if kind == "derive" else "filter"
        raise TransformError(
            f"transform step {index} ({kind}): field {where!r}: {exc}. Fix: use only column "
            "names, literals, operators and the functions abs, coalesce, concat, if_else, "
            "is_null, lower, round and upper (see core.transforms)"
        ) from None


def parse_transforms(steps: Sequence[Mapping[str, Any]]) -> tuple[Transform, ...]:
    """Validate the steps of the settings and parse their expressions, once.

    Raises:
        TransformError: A step is malformed; the message names the step index, the
            field, what was expected, what came and how to write it.
    """
    if isinstance(steps, str | bytes) or not isinstance(steps, Sequence):
        raise TransformError(f"transforms: expected a list of steps, got {_short(steps)}")
    return tuple(_parse_step(index, step) for index, step in enumerate(steps))


# --------------------------------------------------------------------------- enrichment


@dataclass(frozen=True)
class EnrichmentSpec:
    """Which dimension table enriches events, and how.

    Attributes:
        table: Name of the dimension table (for loading and for messages).
        key: Key column of the dimension table.
        on: Column of the events looked up in ``key`` (``entity``, ``attributes.device``).
        columns: Dimension columns to add to the events.
        prefix: Prepended to each added column's name.
    """

    table: str
    key: str
    on: str
    columns: tuple[str, ...]
    prefix: str = ""

    def output_names(self) -> tuple[str, ...]:
        """Names of the columns :func:`enrich` adds."""
        return tuple(self.prefix + column for column in self.columns)


class _EnrichmentModel(_Model):
    table: _Name
    key: _Name
    on: _Name
    columns: tuple[_Name, ...] = Field(min_length=1)
    prefix: str = ""

    @field_validator("columns")
    @classmethod
    def _distinct(cls, columns: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(columns)) != len(columns):
            raise ValueError("columns must not repeat")
        return columns


_ENRICHMENT_EXAMPLE = (
    '{"table": "devices", "key": "device_id", "on": "attributes.device", '
    '"columns": ["site", "region"], "prefix": "device_"}'
)


def parse_enrichment(spec: Mapping[str, Any]) -> EnrichmentSpec:
    """Validate an enrichment setting.

    Raises:
        TransformError: A field is missing, mistyped or unknown.
    """
    try:
        model = _EnrichmentModel.model_validate(spec)
    except ValidationError as exc:
        problems = "; ".join(_pydantic_problems(exc))
        raise TransformError(
            f"enrichment: {problems}. Fix: write it like {_ENRICHMENT_EXAMPLE}"
        ) from None
    return EnrichmentSpec(model.table, model.key, model.on, model.columns, model.prefix)


def _require(table: pa.Table, names: Sequence[str], what: str) -> None:
    missing = [name for name in names if name not in table.column_names]
    if missing:
        raise TransformError(
            f"{what} has no column {', '.join(map(repr, missing))}; "
            f"available columns: {', '.join(table.column_names)}"
        )


def _lookup(keys: pa.ChunkedArray, dim_keys: pa.ChunkedArray) -> pa.Array:
    """Row of the dimension for each key, or null when there is none."""
    # Strings on both sides: ids come as strings in events and often as ints from SQL.
    keys = pc.cast(keys, pa.string())
    dim = pc.cast(dim_keys, pa.string()).combine_chunks()
    # index_in finds the first match; searching the reversed keys lets the last row win,
    # as the latest upsert would.
    last = len(dim) - 1
    reverse = pa.array(np.arange(last, -1, -1, dtype=np.int64))
    found = pc.index_in(keys, value_set=dim.take(reverse), skip_nulls=True)
    return pc.subtract(pa.scalar(last, pa.int64()), pc.cast(found, pa.int64()))


def enrich(table: pa.Table, dim: pa.Table, spec: EnrichmentSpec) -> tuple[pa.Table, int]:
    """Add the dimension's columns to the events, looked up by key in one vectorised pass.

    Keys compare as strings (both sides are cast), so the int 42 matches "42". When the
    dimension repeats a key, its last row wins. A null event key, or one the dimension
    lacks, is a miss: its new columns are null. Added columns replace same-named ones.

    Returns:
        The enriched table and the number of rows whose key had no match.

    Raises:
        TransformError: The dimension lacks ``key`` or a column, or the events lack ``on``.
    """
    _require(dim, [spec.key, *spec.columns], f"dimension table {spec.table!r}")
    _require(table, [spec.on], f"events enriched from {spec.table!r}")
    rows = _lookup(table.column(spec.on), dim.column(spec.key))
    for column, name in zip(spec.columns, spec.output_names(), strict=True):
        table = _put(table, name, dim.column(column).take(rows))
    return table, rows.null_count


class DimensionCache:
    """TTL cache of one dimension table with change detection.

    The worker asks :meth:`needs_refresh` with its clock; when it does, it computes a
    cheap version in the database (``max(updated_at)`` and ``count(*)``, say) and calls
    :meth:`update`, which loads the table only when that version changed.
    """

    def __init__(self, spec: EnrichmentSpec, ttl_ms: int) -> None:
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be positive, got {ttl_ms}")
        self.spec = spec
        self.ttl_ms = ttl_ms
        self._table: pa.Table | None = None
        self._version: Any = None
        self._checked_at: int | None = None

    def needs_refresh(self, now_ms: int) -> bool:
        """True when never loaded or when ``ttl_ms`` or more passed since the last check."""
        return self._checked_at is None or now_ms - self._checked_at >= self.ttl_ms

    def version(self) -> Any:
        """The version of the cached table; None before the first load."""
        return self._version

    def update(self, now_ms: int, version: Any, load: Callable[[], pa.Table]) -> bool:
        """Renew the cache: reload only when ``version`` differs from the cached one.

        If ``load`` raises, or returns a table without the spec's key and columns, the
        error propagates and the cache keeps its previous table, version and age, so the
        worker can keep enriching with it and retry.

        Returns:
            Whether ``load`` was called and the table replaced.
        """
        if self._table is not None and version == self._version:
            self._checked_at = now_ms
            return False
        table = load()
        spec = self.spec
        _require(table, [spec.key, *spec.columns], f"dimension table {spec.table!r}")
        self._table, self._version, self._checked_at = table, version, now_ms
        return True

    @property
    def table(self) -> pa.Table:
        """The cached dimension table.

        Raises:
            RuntimeError: Nothing was loaded yet.
        """
        if self._table is None:
            raise RuntimeError(f"dimension table {self.spec.table!r} was never loaded")
        return self._table
