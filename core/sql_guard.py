"""The guard of the query API's read-only SQL endpoint (``POST /v1/query/sql``).

A tenant's text is parsed here with a real SQL parser (sqlglot, ClickHouse dialect) and
never spliced into another statement. It passes only if it is exactly one SELECT (or a
UNION/INTERSECT/EXCEPT of SELECTs, CTEs and subqueries included) that:

* reads nothing but Rayline's tenant tables (:data:`TENANT_TABLES`, bare or qualified
  by Rayline's database): no other database, no ``system.*``, no table function
  (``file``, ``url``, ``s3``, ``postgresql``, ``executable``, ``remote``, ``numbers``,
  ``merge`` ...), no CTE named like a tenant table;
* calls only functions of :data:`ALLOWED_FUNCTIONS` (an allowlist: aggregates and their
  ``-If``/``-State``/``-Merge`` combinators, date/time, maths, strings, conditionals,
  type conversion, array basics), so ``dictGet``, ``joinGet``, ``getSetting``,
  ``input`` and every function added to ClickHouse later are refused;
* has no ``SETTINGS``, ``FORMAT`` or ``INTO OUTFILE`` clause and no query parameter;
* is at most :data:`MAX_SQL_CHARS` characters, :data:`MAX_DEPTH` brackets deep and
  :data:`MAX_NODES` syntax nodes large (hostile nesting is a refusal, not a crash).

What runs is sqlglot's regeneration of the checked tree (:attr:`Checked.sql`), not the
tenant's text: two parsers may read the same text differently (they do: sqlglot takes
``#`` as a comment, the ClickHouse of chDB 4.4 refuses it; comments and backslash
escapes in strings are the usual other places). The regenerated text has no comments
and canonical quoting, and the function names checked are the ones it calls, so what
ClickHouse runs is what was checked. The price: sqlglot writes a few functions as
equivalents (``toStartOfHour(ts)`` runs as ``dateTrunc('HOUR', ts)``, ``if`` as
``CASE``), and ClickHouse syntax sqlglot cannot parse is refused rather than run.

The engine enforces the rest, whatever the statement says (:func:`guarded_settings`):
``readonly = 1`` (no write, no setting changed), time, memory, read and result limits
(rows and bytes, ``result_overflow_mode = 'throw'``), and ``additional_table_filters``
that show every tenant table with only the caller's rows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.tokens import TokenType

from core.exceptions import InvalidInputError

TENANT_TABLES = (
    "events",
    "windows_1m",
    "rollup_1h",
    "rollup_1d",
    "data_quality_1m",
    "window_results",
    "sessions",
)
MAX_SQL_CHARS = 16_384
MAX_DEPTH = 32
"""Most brackets open at once: deeper text is refused before it is parsed."""
MAX_NODES = 4_000
"""Most syntax nodes in one statement."""
DIALECT = "clickhouse"

_AGGREGATES = """
count sum avg min max any anyLast argMin argMax uniq uniqExact uniqCombined uniqCombined64
uniqHLL12 uniqTheta quantile quantiles quantileExact quantilesExact quantileTDigest
quantilesTDigest quantileTiming quantilesTiming median groupArray groupUniqArray
groupBitAnd groupBitOr groupBitXor stddevPop stddevSamp varPop varSamp covarPop covarSamp
corr topK topKWeighted sumWithOverflow simpleLinearRegression histogram
"""
_COMBINATOR = re.compile(r"^(?P<base>[A-Za-z0-9]+?)(?:If|State|Merge|MergeState|Array|OrNull)+$")
_FUNCTIONS = """
case cast if multiIf coalesce ifNull nullIf isNull isNotNull assumeNotNull toNullable
greatest least abs round floor ceil trunc roundDown sqrt exp log log2 log10 pow power
intDiv intDivOrZero modulo sign sin cos tan pi e plus minus multiply divide negate
cityHash64 sipHash64 xxHash64 murmurHash3_64
toInt8 toInt16 toInt32 toInt64 toUInt8 toUInt16 toUInt32 toUInt64 toFloat32 toFloat64
toDecimal32 toDecimal64 toString toDate toDateTime toDateTime64 toDateOrNull
toDateTimeOrNull toInt64OrNull toFloat64OrNull toInt64OrZero toFloat64OrZero toTypeName
parseDateTimeBestEffort parseDateTimeBestEffortOrNull reinterpretAsString
now now64 today yesterday toStartOfMinute toStartOfFiveMinutes toStartOfFifteenMinutes
toStartOfHour toStartOfDay toStartOfWeek toStartOfMonth toStartOfQuarter toStartOfYear
toStartOfInterval toMonday toYear toMonth toDayOfMonth toDayOfWeek toHour toMinute
toSecond toUnixTimestamp toUnixTimestamp64Milli fromUnixTimestamp fromUnixTimestamp64Milli
fromUnixTimestamp64Micro dateDiff date_diff dateAdd date_add dateSub date_sub dateTrunc
date_trunc addSeconds addMinutes addHours addDays addWeeks addMonths subtractSeconds
subtractMinutes subtractHours subtractDays subtractWeeks subtractMonths formatDateTime
toIntervalSecond toIntervalMinute toIntervalHour toIntervalDay toIntervalWeek
toIntervalMonth timeSlot extract interval
length lengthUTF8 empty notEmpty lower upper lowerUTF8 upperUTF8 concat substring
substr substringUTF8 startsWith endsWith position positionCaseInsensitive trim trimLeft
trimRight replaceAll replaceOne replaceRegexpAll replaceRegexpOne like notLike ilike
match extract splitByChar splitByString arrayStringConcat leftPad rightPad left right
reverse format toFixedString base64Encode hex lpad rpad
array range arrayJoin has hasAll hasAny indexOf arrayElement arraySort arrayReverse
arrayDistinct arrayMap arrayFilter arrayExists arrayAll arrayCount arraySum arrayMin
arrayMax arrayAvg arraySlice arrayConcat arrayUniq arrayEnumerate arrayZip
arrayFirst arrayLast arrayFlatten emptyArrayString
tuple tupleElement map mapKeys mapValues mapContains JSONExtractString JSONExtractInt
JSONExtractFloat JSONExtractBool JSONHas
exists and or not xor equals notEquals less greater lessOrEquals greaterOrEquals
bitAnd bitOr bitXor bitShiftLeft bitShiftRight rowNumberInAllBlocks
row_number rank dense_rank lag lead first_value last_value lagInFrame leadInFrame
sleepEachRow sleep
"""
ALLOWED_FUNCTIONS = frozenset(_AGGREGATES.split()) | frozenset(_FUNCTIONS.split())
"""Functions a statement may call. ``sleep``/``sleepEachRow`` stay: the time limit
bounds them, and the tests of the per-tenant slots need a statement that waits."""
_ALLOWED_LOWER = frozenset(name.lower() for name in ALLOWED_FUNCTIONS)
_AGGREGATES_LOWER = frozenset(name.lower() for name in _AGGREGATES.split())
_CALLED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*\(")
_SHOWN = ", ".join(TENANT_TABLES)


class SqlRefused(InvalidInputError):
    """The statement is not one the endpoint runs; the message says what and why."""


@dataclass(frozen=True, slots=True)
class Checked:
    """A statement that passed the guard."""

    sql: str
    """What runs: the regenerated text of the checked tree (no comments)."""


def check(text: str, database: str) -> Checked:
    """Parse ``text`` and return what may run, or refuse it.

    Args:
        text: the tenant's statement, as sent.
        database: Rayline's database; its tenant tables may be named with or without it.

    Raises:
        SqlRefused: the statement is empty, too long or deep, not one SELECT, or reads or
            calls what the endpoint does not allow. Nothing else escapes.
    """
    _check_text(text)
    try:
        parsed = sqlglot.parse(text, dialect=DIALECT)
    except SqlglotError as exc:
        raise SqlRefused(f"the statement could not be parsed: {_first_line(exc)}") from exc
    except RecursionError as exc:
        raise SqlRefused("the statement is nested too deeply") from exc
    except (IndexError, KeyError, TypeError, ValueError, AttributeError) as exc:
        # sqlglot's own bugs on malformed text (``MAP(0`` raises IndexError in 30.x):
        # still a refusal, never a 500
        raise SqlRefused(f"the statement could not be parsed ({type(exc).__name__})") from exc
    statements = [p for p in parsed if p is not None]
    if len(statements) != 1:
        raise SqlRefused(
            f"send exactly one statement, found {len(statements)}: no ';' between statements"
        )
    (root,) = statements
    if not isinstance(root, exp.Select | exp.SetOperation):
        raise SqlRefused(f"only a SELECT statement is allowed here, found {root.key.upper()}")
    try:
        _check_tree(root, database)
        return Checked(root.sql(dialect=DIALECT, comments=False))
    except RecursionError as exc:
        raise SqlRefused("the statement is nested too deeply") from exc
    except SqlglotError as exc:
        raise SqlRefused(f"the statement could not be rewritten: {_first_line(exc)}") from exc


def _check_text(text: str) -> None:
    if not text.strip():
        raise SqlRefused('the statement is empty: send {"sql": "SELECT ..."}')
    if len(text) > MAX_SQL_CHARS:
        raise SqlRefused(f"the statement is {len(text):,} characters, more than {MAX_SQL_CHARS:,}")
    try:
        tokens = sqlglot.tokenize(text, dialect=DIALECT)
    except SqlglotError as exc:
        raise SqlRefused(f"the statement could not be parsed: {_first_line(exc)}") from exc
    depth = deepest = 0
    for token in tokens:
        if token.token_type in (TokenType.L_PAREN, TokenType.L_BRACKET, TokenType.L_BRACE):
            depth += 1
            deepest = max(deepest, depth)
        elif token.token_type in (TokenType.R_PAREN, TokenType.R_BRACKET, TokenType.R_BRACE):
            depth -= 1
    if deepest > MAX_DEPTH:
        raise SqlRefused(f"the statement nests {deepest} brackets deep, more than {MAX_DEPTH}")


def _check_tree(root: exp.Expression, database: str) -> None:
    nodes = list(root.walk())
    if len(nodes) > MAX_NODES:
        raise SqlRefused(f"the statement has {len(nodes):,} parts, more than {MAX_NODES:,}")
    ctes = {cte.alias_or_name for cte in root.find_all(exp.CTE)}
    shadowing = sorted(ctes & set(TENANT_TABLES))
    if shadowing:
        raise SqlRefused(f"a WITH query may not be named like a table: {', '.join(shadowing)}")
    for node in nodes:
        for clause in ("settings", "format", "into"):
            if node.args.get(clause):
                raise SqlRefused(
                    f"{clause.upper()} is not allowed here: the endpoint sets the limits and "
                    "the format, and answers in the response"
                )
        if isinstance(node, exp.Select) and not node.expressions:
            raise SqlRefused("the SELECT names no column: write SELECT <columns> FROM <table>")
        if isinstance(node, exp.From) or (
            isinstance(node, exp.Join) and str(node.args.get("kind") or "").upper() != "ARRAY"
        ):  # an ARRAY JOIN unfolds an expression, whose nodes are checked as any other
            _check_source(node.this)
        if isinstance(node, exp.Table):
            _check_table(node, database, ctes)
        elif isinstance(node, exp.Placeholder | exp.Parameter | exp.SessionParameter):
            raise SqlRefused(f"query parameters are not allowed here, found {node.sql()!r}")
        elif isinstance(node, exp.Command | exp.DDL | exp.DML):
            raise SqlRefused(f"only a SELECT statement is allowed here, found {node.key}")
        elif isinstance(node, exp.In) and isinstance(node.args.get("field"), exp.Column):
            raise SqlRefused(
                f"IN {node.args['field'].sql()} names a table: write IN (SELECT ... FROM "
                f"table) over one of {_SHOWN}"
            )
        elif isinstance(node, exp.Func):
            _check_function(node)


def _check_source(source: exp.Expression | None) -> None:
    """What a FROM or JOIN reads must be a table or a subquery (checked as nodes of their
    own); anything else the parser put there (``FROM IN {x:String}`` parses as a map) is
    refused, so the regenerated text can never name a table function."""
    if isinstance(source, exp.Table | exp.Subquery):
        return
    shown = source.sql(dialect=DIALECT, comments=False) if source is not None else "nothing"
    raise SqlRefused(
        f"{shown} is read like a table but is none: read one of Rayline's tables ({_SHOWN})"
    )


def _check_table(table: exp.Table, database: str, ctes: set[str]) -> None:
    if not isinstance(table.this, exp.Identifier):
        called = _called_name(table.this) if isinstance(table.this, exp.Func) else None
        called = called or table.sql(dialect=DIALECT)
        raise SqlRefused(
            f"table function {called}() is not allowed: read one of Rayline's tables ({_SHOWN})"
        )
    name, db, catalog = table.name, table.db, table.catalog
    shown = ".".join(part for part in (catalog, db, name) if part)
    if catalog or (db and db != database):
        raise SqlRefused(f"table {shown!r} is not readable here; read one of {_SHOWN}")
    if name in TENANT_TABLES or (not db and name in ctes):
        return
    raise SqlRefused(f"table {shown!r} is not readable here; read one of {_SHOWN}")


def _check_function(node: exp.Func) -> None:
    name = _called_name(node)
    if name is None:  # an operator (a OR b, x[1], CASE ...): its operands are checked
        return
    if name.lower() in _ALLOWED_LOWER:
        return
    combined = _COMBINATOR.match(name)
    if combined is not None and combined.group("base").lower() in _AGGREGATES_LOWER:
        return
    raise SqlRefused(
        f"function {name}() is not allowed in this endpoint: use aggregates (and their "
        "If/State/Merge forms), date/time, maths, string, conditional, conversion and "
        "array functions"
    )


_OPERATORS = (exp.Binary, exp.Unary, exp.Connector, exp.Predicate, exp.Case, exp.Bracket)


def _called_name(node: exp.Func | exp.Expression) -> str | None:
    """The function ClickHouse will be asked to call for ``node`` in the regenerated
    text, or None where the node is written as an operator."""
    if isinstance(node, exp.Anonymous | exp.AnonymousAggFunc | exp.ParameterizedAgg):
        return str(node.name)
    if isinstance(node, _OPERATORS):
        return None
    # Nested calls need brackets, so MAX_DEPTH bounds what this regeneration costs.
    called = _CALLED.match(node.sql(dialect=DIALECT, comments=False))
    return called.group(1) if called is not None else node.key


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # sqlglot underlines the offending token with ANSI codes: keep plain text only.
    return re.sub(r"\x1b\[[0-9;]*m", "", text[0] if text else type(exc).__name__)


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def guarded_settings(
    tenant: str,
    database: str,
    *,
    max_seconds: float,
    max_rows: int,
    max_rows_to_read: int,
    max_memory_bytes: int = 2_000_000_000,
    max_result_bytes: int = 64_000_000,
) -> Mapping[str, Any]:
    """The settings a checked statement runs with: read-only, limited, one tenant's rows."""
    condition = f"tenant = {_quoted(tenant)}"
    return {
        "readonly": 1,
        "max_execution_time": max_seconds,
        "max_result_rows": max_rows,
        "max_result_bytes": max_result_bytes,
        "result_overflow_mode": "throw",
        "max_rows_to_read": max_rows_to_read,
        "max_memory_usage": max_memory_bytes,
        "additional_table_filters": {f"{database}.{t}": condition for t in TENANT_TABLES},
    }
