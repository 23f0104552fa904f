"""``rayline rules`` and ``rayline schemas``: the metadata workers reload at run time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from cluster.cli_context import settings_of as _settings
from cluster.settings import Settings
from core.exceptions import ConfigurationError, InvalidInputError

console = Console()

rules_app = typer.Typer(
    help="CEP rules (threshold, sequence, absence). Workers pick up changes within "
    "`pipeline.rules_refresh_seconds`, without a restart; matches go to the alerts topic."
)
schemas_app = typer.Typer(
    help="Avro schemas per (source, type), enforced on the events of that source and type."
)


def _store(settings: Settings) -> Any:
    from adapters.postgres import MetadataStore, migrate

    migrate(settings.postgres.dsn())
    return MetadataStore(settings.postgres.dsn())


def _read_specs(path: Path) -> list[dict[str, Any]]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInputError(f"cannot read rules from {path}: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("rules", [data])
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise InvalidInputError(
            f"{path}: expected a rule (a mapping), a list of rules, or `rules: [...]`"
        )
    return data


@rules_app.command("apply")
def rules_apply(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="YAML or JSON: one rule, a list, or `rules:`.")],
) -> None:
    """Add or replace the rules in FILE (by id). Every rule is checked first; one bad
    rule stores nothing."""
    from core.cep import load_rules

    specs = _read_specs(file)
    rules, problems = load_rules(specs)
    if problems:
        raise ConfigurationError(
            f"{file}: {len(problems)} rule(s) rejected, nothing stored:\n"
            + "\n".join(f"  {p}" for p in problems)
        )
    store = _store(_settings(ctx))
    try:
        for rule, spec in zip(rules, specs, strict=True):
            store.put_rule(rule.id, dict(spec))
    finally:
        store.close()
    console.print(f"stored {len(rules)} rule(s): {', '.join(r.id for r in rules)}")


@rules_app.command("list")
def rules_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The stored rules."""
    store = _store(_settings(ctx))
    try:
        rows = store.rules()
    finally:
        store.close()
    if as_json:
        console.print_json(json.dumps([dict(spec, enabled=on) for spec, on in rows]))
        return
    table = Table("id", "kind", "tenant", "enabled", "spec")
    for spec, enabled in rows:
        rest = {k: v for k, v in spec.items() if k not in ("id", "kind", "tenant")}
        table.add_row(
            str(spec.get("id")), str(spec.get("kind")), str(spec.get("tenant") or "*"),
            "yes" if enabled else "no", json.dumps(rest),
        )  # fmt: skip
    console.print(table)


@rules_app.command("delete")
def rules_delete(ctx: typer.Context, rule_id: Annotated[str, typer.Argument()]) -> None:
    """Delete one rule by id."""
    store = _store(_settings(ctx))
    try:
        found = store.delete_rule(rule_id)
    finally:
        store.close()
    if not found:
        raise InvalidInputError(f"no rule {rule_id!r}: `rayline rules list` shows the ids")
    console.print(f"deleted rule {rule_id}")


@schemas_app.command("register")
def schemas_register(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="An Avro record schema (.avsc, JSON).")],
    source: Annotated[str, typer.Option(help="The events' source.")],
    type_: Annotated[str, typer.Option("--type", help="The events' type.")],
) -> None:
    """Register FILE for the events of SOURCE and TYPE (subject `<source>.<type>`).
    Registering the same schema again is a no-op; a changed one is a new version."""
    from core.avro import AvroError, fingerprint, parse_schema_text, subject_for

    try:
        text = file.read_text()
        parse_schema_text(text)
        subject = subject_for(source, type_)
    except (OSError, AvroError) as exc:
        raise InvalidInputError(f"{file}: {exc}") from exc
    store = _store(_settings(ctx))
    try:
        schema_id, version = store.register_schema(subject, text, fingerprint(text))
    finally:
        store.close()
    console.print(f"subject {subject}: version {version}, schema id {schema_id}")


@schemas_app.command("list")
def schemas_list(ctx: typer.Context) -> None:
    """Every subject's newest version."""
    store = _store(_settings(ctx))
    try:
        subjects = store.subjects()
    finally:
        store.close()
    table = Table("subject", "version", "schema id")
    for subject, (schema_id, version, _text) in sorted(subjects.items()):
        table.add_row(subject, str(version), str(schema_id))
    console.print(table)
