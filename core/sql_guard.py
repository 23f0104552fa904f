"""The guard of the query API's read-only SQL endpoint.

A statement passes only if ClickHouse parses it as one SELECT (its ``EXPLAIN AST`` is
checked here) reading nothing but Rayline's tenant tables: no other database, no
system table, no table function (``url``, ``file``, ``s3``, ``numbers`` ...), no
dictionary or join-engine lookup, no ``INTO OUTFILE``. What passes then runs with
``readonly = 1`` (so it cannot change a setting either), a time limit, result and
read limits, and ``additional_table_filters`` that make every tenant table show only
the caller's rows — the isolation holds whatever the statement's own WHERE says.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

TENANT_TABLES = (
    "events",
    "windows_1m",
    "rollup_1h",
    "rollup_1d",
    "data_quality_1m",
    "window_results",
)
MAX_SQL_CHARS = 16_384
_DENIED_FUNCTION = re.compile(
    r"^(dict\w*|joinGet\w*|file|url|s3\w*|remote\w*|input|executable|mysql|postgresql|"
    r"hdfs\w*|azure\w*|cluster\w*|gcs|jdbc|odbc|mongodb|redis|sqlite|iceberg\w*|"
    r"deltaLake\w*|hudi\w*|merge|loop|view|viewIfPermitted|generateRandom|getSetting\w*)$",
    re.IGNORECASE,
)
_OUTFILE = re.compile(r"\bINTO\s+OUTFILE\b", re.IGNORECASE)
_NODE = re.compile(r"^(\s*)(\w+)(?:\s+(\S+))?")


def text_problem(sql: str) -> str | None:
    """What is wrong with the text before ClickHouse parses it, or None."""
    if not sql.strip():
        return 'the statement is empty: send {"sql": "SELECT ..."}'
    if len(sql) > MAX_SQL_CHARS:
        return f"the statement is {len(sql):,} characters, more than {MAX_SQL_CHARS:,}"
    if _OUTFILE.search(sql):
        return "INTO OUTFILE is not allowed: results come back in the response"
    return None


def ast_problem(ast_lines: Iterable[str], database: str) -> str | None:
    """What makes a parsed statement unsafe to run, or None.

    Args:
        ast_lines: the rows of ``EXPLAIN AST <statement>``, one node per line,
            indented by depth.
        database: Rayline's database; its tenant tables may be named with or without it.
    """
    lines = list(ast_lines)
    if not lines or not lines[0].strip().startswith("SelectWithUnionQuery"):
        return "only a SELECT statement is allowed here"
    allowed = set(TENANT_TABLES) | {f"{database}.{t}" for t in TENANT_TABLES}
    previous = ""
    for line in lines:
        match = _NODE.match(line)
        if match is None:
            continue
        kind, name = match.group(2), (match.group(3) or "")
        if kind == "TableIdentifier" and name not in allowed:
            return f"table {name!r} is not readable here; read one of {', '.join(TENANT_TABLES)}"
        if kind == "Function" and previous == "TableExpression":
            return f"table function {name}() is not allowed; read one of Rayline's tables"
        if kind == "Function" and _DENIED_FUNCTION.match(name):
            return f"function {name}() is not allowed in this endpoint"
        previous = kind
    return None


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
) -> Mapping[str, Any]:
    """The settings a checked statement runs with: read-only, limited, one tenant's rows."""
    condition = f"tenant = {_quoted(tenant)}"
    return {
        "readonly": 1,
        "max_execution_time": max_seconds,
        "max_result_rows": max_rows,
        "result_overflow_mode": "throw",
        "max_rows_to_read": max_rows_to_read,
        "max_memory_usage": max_memory_bytes,
        "additional_table_filters": {f"{database}.{t}": condition for t in TENANT_TABLES},
    }
