"""The package arrows of docs/architecture.md point one way: checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cluster.settings import PROJECT_ROOT

PROJECT_PACKAGES = {"core", "adapters", "actors", "serve_apps", "data_jobs", "cluster"}
ALLOWED = {
    "core": {"core"},
    "adapters": {"core", "adapters"},
    "actors": {"core", "adapters", "actors"},
    "serve_apps": {"core", "adapters", "serve_apps"},
    "data_jobs": {"core", "adapters", "data_jobs"},
}
# The pure core does no I/O and imports no driver, framework or clock reader.
CORE_FORBIDDEN = {
    "ray",
    "confluent_kafka",
    "clickhouse_connect",
    "chdb",
    "asyncpg",
    "redis",
    "boto3",
    "httpx",
    "fastapi",
    "starlette",
    "socket",
    "subprocess",
    "os",
    "time",
}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def sources(package: str) -> list[Path]:
    return sorted((PROJECT_ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down_the_table(package: str) -> None:
    for path in sources(package):
        upward = (imports(path) & PROJECT_PACKAGES) - ALLOWED[package]
        assert not upward, f"{path.relative_to(PROJECT_ROOT)} imports {sorted(upward)}"


def test_core_is_pure() -> None:
    assert sources("core")
    for path in sources("core"):
        bad = imports(path) & CORE_FORBIDDEN
        assert not bad, f"{path.relative_to(PROJECT_ROOT)} imports {sorted(bad)}"
        text = path.read_text()
        for clock in ("datetime.now(", "date.today(", "time.time("):
            assert clock not in text, f"{path.name} reads the clock: pass a clock in"


def test_library_code_never_reads_the_environment() -> None:
    for package in ALLOWED:
        for path in sources(package):
            text = path.read_text()
            assert "os.environ" not in text, path
            assert "getenv(" not in text, path
