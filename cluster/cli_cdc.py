"""``rayline cdc``: which PostgreSQL tables Debezium captures into Kafka.

``add`` registers a table in Rayline's ``cdc_tables``, makes its updates and deletes
carry the whole old row (``REPLICA IDENTITY FULL``), and writes the Debezium
connector's configuration through Kafka Connect's REST API with every registered
table. The applier (``actors.cdc_applier``) mirrors the change topics in ClickHouse.
"""

from __future__ import annotations

import re
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cluster import connect
from cluster.cli_context import settings_of as _settings
from cluster.settings import Settings
from core.exceptions import InvalidInputError

console = Console()

CONNECTOR_NAME = "rayline-cdc"
SLOT_NAME = "rayline_cdc"
PUBLICATION_NAME = "rayline_cdc"

cdc_app = typer.Typer(
    help="Database change data capture (Kafka Connect + Debezium): tables of "
    "`cdc.database` whose changes Rayline mirrors in ClickHouse (`cdc_<schema>_<table>`)."
)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


def parse_table(text: str) -> tuple[str, str]:
    """``schema.table`` (or ``table``, in ``public``) as (schema, table).

    Raises:
        InvalidInputError: not one or two plain identifiers.
    """
    parts = text.split(".")
    if len(parts) == 1:
        parts = ["public", *parts]
    if len(parts) != 2 or not all(_NAME.match(p) for p in parts):
        raise InvalidInputError(
            f"--table {text!r}: expected SCHEMA.TABLE of plain identifiers "
            "(letters, digits, _), e.g. public.customers"
        )
    return parts[0], parts[1]


def connector_config(settings: Settings, tables: list[tuple[str, str]]) -> dict[str, str]:
    """The Debezium PostgreSQL connector's configuration for ``tables``."""
    pg = settings.postgres
    config = {
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "tasks.max": "1",
        "plugin.name": "pgoutput",
        "database.hostname": pg.host,
        "database.port": str(pg.port),
        "database.user": pg.user,
        "database.dbname": settings.cdc.database,
        "topic.prefix": settings.cdc.topic_prefix,
        # Debezium's include lists are regular expressions over schema.table.
        "table.include.list": ",".join(f"{re.escape(s)}\\.{re.escape(t)}" for s, t in tables),
        "publication.name": PUBLICATION_NAME,
        "publication.autocreate.mode": "filtered",
        "slot.name": SLOT_NAME,
        "snapshot.mode": "initial",
        "heartbeat.interval.ms": "10000",
        "decimal.handling.mode": "precise",
        "time.precision.mode": "adaptive_time_microseconds",
        "tombstones.on.delete": "true",
        # The broker does not create topics on its own: Connect creates the change topics.
        "topic.creation.default.replication.factor": "1",
        "topic.creation.default.partitions": "1",
    }
    if pg.password is not None and settings.cdc.managed:
        # The local worker reads it from its secrets file (see cluster.connect).
        config["database.password"] = connect.password_reference(settings)
    elif pg.password is not None:
        config["database.password"] = pg.password.get_secret_value()
    return config


def _captured_dsn(settings: Settings) -> str:
    return settings.postgres.model_copy(update={"database": settings.cdc.database}).dsn()


@cdc_app.command("add")
def add(
    ctx: typer.Context,
    table: Annotated[
        str, typer.Option("--table", help="SCHEMA.TABLE in `cdc.database` to capture.")
    ],
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for the connector to run (0: do not wait).")
    ] = 90.0,
) -> None:
    """Capture TABLE: its rows and every later change land in ClickHouse."""
    from adapters.cdc_catalog import CapturedDatabase, CdcCatalog
    from adapters.kafka_connect import KafkaConnect
    from adapters.postgres import migrate

    settings = _settings(ctx)
    schema, name = parse_table(table)
    captured = CapturedDatabase(_captured_dsn(settings))
    try:
        key = captured.primary_key(schema, name)
        captured.set_replica_identity_full(schema, name)
    finally:
        captured.close()
    migrate(settings.postgres.dsn())
    catalog = CdcCatalog(settings.postgres.dsn())
    try:
        new = catalog.add(schema, name)
        tables = catalog.tables()
    finally:
        catalog.close()
    connect = KafkaConnect(settings.cdc.url)
    try:
        connect.put_config(CONNECTOR_NAME, connector_config(settings, tables))
        if wait > 0:
            _wait_published(settings, schema, name, wait)
            connect.wait_running(CONNECTOR_NAME, timeout=wait)
    finally:
        connect.close()
    what = "now captured" if new else "was captured already"
    console.print(
        f"{schema}.{name} (primary key {', '.join(key)}) {what}; changes go to topic "
        f"{settings.cdc.topic_prefix}.{schema}.{name}, ClickHouse table cdc_{schema}_{name}"
    )


def _wait_published(settings: Settings, schema: str, name: str, timeout: float) -> None:
    """Wait until Debezium added the table to its publication: changes from then on are
    captured (the restarted connector updates the publication when it starts streaming)."""
    from adapters.cdc_catalog import CapturedDatabase
    from adapters.exceptions import StoreUnavailable

    captured = CapturedDatabase(_captured_dsn(settings))
    deadline = time.monotonic() + timeout
    try:
        while not captured.published(PUBLICATION_NAME, schema, name):
            if time.monotonic() > deadline:
                raise StoreUnavailable(
                    f"Debezium did not add {schema}.{name} to publication {PUBLICATION_NAME} "
                    f"within {timeout:.0f} s; see the connector's state with `rayline cdc list` "
                    "and the Connect log (logs/connect.log in the state folder)"
                )
            time.sleep(0.5)
    finally:
        captured.close()


@cdc_app.command("list")
def list_tables(ctx: typer.Context) -> None:
    """The captured tables, and the state of the connector in Kafka Connect."""
    from adapters.cdc_catalog import CdcCatalog
    from adapters.exceptions import StoreUnavailable
    from adapters.kafka_connect import KafkaConnect
    from adapters.postgres import migrate

    settings = _settings(ctx)
    migrate(settings.postgres.dsn())
    catalog = CdcCatalog(settings.postgres.dsn())
    try:
        tables = catalog.tables()
    finally:
        catalog.close()
    connect = KafkaConnect(settings.cdc.url)
    try:
        status = connect.status(CONNECTOR_NAME)
        state = "not created" if status is None else status["connector"]["state"]
    except StoreUnavailable as exc:
        state = f"unknown ({exc})"
    finally:
        connect.close()
    out = Table(title=f"connector {CONNECTOR_NAME}: {state}")
    for column in ("table", "topic", "ClickHouse table"):
        out.add_column(column)
    for schema, name in tables:
        out.add_row(
            f"{schema}.{name}",
            f"{settings.cdc.topic_prefix}.{schema}.{name}",
            f"cdc_{schema}_{name}",
        )
    console.print(out)
