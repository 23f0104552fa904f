"""The ``rayline`` command line."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cluster import local_secrets
from cluster.cli_backfill import backfill
from cluster.cli_cdc import cdc_app
from cluster.cli_context import settings_of as _settings
from cluster.cli_devices import devices_app
from cluster.cli_jobs import jobs_app
from cluster.cli_metadata import rules_app, schemas_app
from cluster.cli_rollups import rollups_app
from cluster.cli_sessions import sessions
from cluster.cli_sources import keys_app, sources_app, tenants_app
from cluster.cli_upload import upload
from cluster.cli_verify import verify
from cluster.settings import Settings, describe_settings, load_settings
from core.exceptions import RaylineError

app = typer.Typer(
    help="Rayline: a real-time analytics pipeline on Ray, Kafka and ClickHouse.\n\n"
    "Start with `rayline up`, send events to POST /v1/events, read them back from "
    "GET /v1/query/latest/{type}; `rayline demo` does all of that with a live view.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar="RAYLINE_CONFIG",
            help="YAML settings file. Environment variables (RAYLINE_...) override it.",
        ),
    ] = None,
) -> None:
    settings = load_settings(config)
    if ctx.invoked_subcommand in ("up", "demo"):
        # The first `up` generates the install's secrets; every later load reads them.
        local_secrets.ensure(settings.paths.state_dir)
        settings = load_settings(config)
    # Before anything imports ray: it reads its auth mode then (cluster.deploy.connected).
    local_secrets.export_ray_environment(settings)
    ctx.obj = settings


def _say(message: str) -> None:
    console.print(f"[dim]·[/dim] {message}")


def _stack(settings: Settings) -> Any:
    from cluster.stack import LocalStack

    return LocalStack(settings, _say)


def _bring_up(settings: Settings, services_only: bool = False) -> None:
    from cluster.deploy import connected, deploy

    _stack(settings).up()
    if services_only:
        return
    with connected(settings):
        deploy(settings, _say)


@app.command()
def up(
    ctx: typer.Context,
    services_only: bool = typer.Option(
        False,
        "--services-only",
        help="Start the services (Kafka, PostgreSQL, Redis, ...) but deploy nothing to Ray.",
    ),
) -> None:
    """Start the local stack (Kafka, PostgreSQL, Redis, S3, Kafka Connect, Mosquitto, Ray)
    and deploy the pipeline.

    Safe to run again: running services and deployed apps are kept. The first run
    downloads the Kafka, Kafka Connect and Debezium jars from Maven Central into the
    cache folder. Everything else it creates lives in the state folder (see
    `rayline down --purge`); a PostgreSQL cluster that a deleted state folder left
    outside it is removed, and said so.
    """
    settings = _settings(ctx)
    _bring_up(settings, services_only)
    if services_only:
        for row in _stack(settings).status():
            console.print(f"{row.name}: {row.state} {list(row.ports)}")
        return
    _print_status(settings)


@app.command()
def down(
    ctx: typer.Context,
    purge: Annotated[
        bool,
        typer.Option(
            "--purge",
            help="Then delete all local state: the state folder (data, logs, checkpoints) "
            "and the folders the stack keeps outside it (PostgreSQL's cluster under "
            "/var/tmp when its user cannot reach the state folder, Ray's temp folder "
            "under /tmp when the state folder's path is too long). The next `up` starts "
            "empty. The download cache stays.",
        ),
    ] = False,
) -> None:
    """Stop everything `up` started, by PID, and check that nothing still listens.

    With --purge, also delete everything `up` created, wherever it lives, so that the
    next `up` starts from nothing (what `make clean` does).
    """
    stack = _stack(_settings(ctx))
    stopped = stack.down()
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    left = stack.listening_ports()
    if left:
        err.print(f"[red]still listening on ports {left}[/red]: find the owner with `ss -ltnp`")
        if purge:
            err.print("nothing was deleted: stop those programs, then run `down --purge` again")
        raise typer.Exit(1)
    if purge:
        removed = stack.purge()
        console.print(f"deleted: {', '.join(map(str, removed)) if removed else 'nothing was left'}")


def _status_data(settings: Settings) -> dict[str, Any]:
    from cluster.deploy import actors_status, connected, pipeline_status

    stack = _stack(settings)
    services = [
        {"name": s.name, "state": s.state, "ports": list(s.ports), "pid": s.pid}
        for s in stack.status()
    ]
    pipeline = None
    actors: dict[str, Any] = {}
    ray_running = any(s["name"] == "ray" and s["state"] == "running" for s in services)
    if ray_running:
        with connected(settings):
            pipeline = pipeline_status(settings)
            if pipeline is not None:
                actors = actors_status(settings)
    return {
        "services": services,
        "local_state": stack.local_state(),
        "pipeline": pipeline,
        "sources": _source_stats(settings),
        **actors,
    }


def _source_stats(settings: Settings) -> dict[str, Any]:
    """Every source's counters from Redis (empty when Redis does not answer)."""
    import redis

    from adapters.source_stats import SourceStats

    stats = SourceStats(settings.redis.url())
    try:
        return stats.read_all(int(time.time() * 1000))
    except redis.RedisError:
        return {}
    finally:
        stats.close()


def _print_sources(sources: dict[str, Any]) -> None:
    if not sources:
        return
    table = Table(title="sources")
    columns = ("source", "events/s", "accepted", "rejected", "errors", "last success", "last error")
    for column in columns:
        table.add_column(column)
    now_ms = time.time() * 1000
    for name, row in sorted(sources.items()):
        last = row.get("last_success_ms")
        ago = "-" if not isinstance(last, int) else f"{(now_ms - last) / 1000:,.0f} s ago"
        table.add_row(
            name,
            f"{row.get('events_per_second', 0):,}",
            f"{row.get('accepted', 0):,}",
            f"{row.get('rejected', 0):,}",
            f"{row.get('errors', 0):,}",
            ago,
            str(row.get("last_error", ""))[:60],
        )
    console.print(table)


def _print_actors(data: dict[str, Any]) -> None:
    """One line each for the rollups, the archiver and the alerting engine."""

    def iso(ms: Any) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(int(ms) / 1000))

    rollups = data.get("rollups", {})
    sealed = rollups.get("sealed") or {}
    line = ", ".join(f"{t} {iso(ms)}" for t, ms in sorted(sealed.items())) or "nothing yet"
    problem = rollups.get("error")
    console.print(f"rollups sealed: {line}" + (f"  [red]{problem}[/red]" if problem else ""))
    archive = data.get("archiver", {})
    problem = archive.get("last_error") or archive.get("error")
    console.print(
        f"archiver: {archive.get('state', '-')}, {archive.get('files_written', 0):,} files, "
        f"{archive.get('rows_written', 0):,} rows" + (f"  [red]{problem}[/red]" if problem else "")
    )
    alerting = data.get("alerting", {})
    problem = alerting.get("last_error") or alerting.get("error")
    console.print(
        f"alerting: {alerting.get('state', '-')}, {alerting.get('rules', 0)} rules, "
        f"{alerting.get('open_incidents', 0)} open incidents"
        + (f"  [red]{problem}[/red]" if problem else "")
    )


def _print_checkpoint_resets(workers: list[dict[str, Any]]) -> None:
    """Each checkpoint that did not fit its topic's offsets, and what the worker did
    (docs/architecture.md, "Checkpoints that no longer fit the topic")."""
    for w in workers:
        for r in w.get("checkpoint_resets", []):
            console.print(
                f"[yellow]checkpoint {r['action']}[/yellow] (worker {w['worker']}, {r['at']}): "
                + escape(str(r["reason"]))
            )


def _print_status(settings: Settings) -> None:
    data = _status_data(settings)
    table = Table(title="services")
    for column in ("service", "state", "ports", "pid"):
        table.add_column(column)
    for s in data["services"]:
        style = "green" if s["state"] == "running" else "red"
        table.add_row(
            s["name"],
            f"[{style}]{s['state']}[/{style}]",
            ", ".join(map(str, s["ports"])),
            str(s["pid"] or "-"),
        )
    console.print(table)
    where = data["local_state"]
    outside = f" and {', '.join(where['outside'])}" if where["outside"] else ""
    console.print(f"local state: {where['folder']}{outside}")
    _print_sources(data["sources"])
    pipeline = data["pipeline"]
    if pipeline is None:
        console.print("pipeline: not deployed (run `rayline up`)")
        return
    workers = Table(title=f"pipeline: topic {pipeline['topic']}, epoch {pipeline['epoch']}")
    for column in (
        "worker",
        "alive",
        "partitions",
        "processed",
        "lag",
        "dead-lettered",
        "last error",
    ):
        workers.add_column(column)
    for w in pipeline["workers"]:
        workers.add_row(
            str(w["worker"]),
            "yes" if w.get("alive") else "[red]no[/red]",
            ",".join(map(str, w["partitions"])),
            f"{w.get('processed', 0):,}",
            f"{sum(w.get('lag', {}).values()):,}",
            f"{w.get('dead_lettered', 0):,}",
            (w.get("last_error") or "")[:60],
        )
    console.print(workers)
    _print_checkpoint_resets(pipeline["workers"])
    _print_actors(data)
    s = settings
    console.print(
        f"ingest: http://{s.serve.host}:{s.serve.port}/v1/events   "
        f"query: http://{s.serve.host}:{s.serve.port}/v1/query/docs   "
        f"Ray dashboard: http://{s.ray.host}:{s.ray.dashboard_port}"
    )


@app.command()
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show each service (state, ports, PID), where local state lives, and the pipeline
    (workers, partitions, lag).

    A worker whose checkpoint did not fit its topic's offsets (topic recreated or
    truncated, retention passed) is listed with what it did about it.
    """
    settings = _settings(ctx)
    if as_json:
        print(json.dumps(_status_data(settings), indent=2))
    else:
        _print_status(settings)


scale_app = typer.Typer(help="Change how many actors do the work, while it runs.")
app.add_typer(scale_app, name="scale")


@scale_app.command("workers")
def scale_workers(
    ctx: typer.Context,
    count: Annotated[int, typer.Argument(min=1, help="Partition workers to run.")],
) -> None:
    """Reassign the raw topic's partitions over COUNT workers under a new epoch.

    Ingest goes on meanwhile; the old workers save their snapshots and stop, the new
    ones resume from them. A lasting change belongs in `pipeline.workers` too.
    """
    from cluster.deploy import connected
    from cluster.deploy import scale_workers as scale

    settings = _settings(ctx)
    with connected(settings):
        report = scale(settings, count)
    owned = {w["worker"]: w["partitions"] for w in report["workers"]}
    console.print(f"epoch {report['epoch']}: {len(owned)} workers, partitions {owned}")


app.add_typer(rules_app, name="rules")
app.add_typer(schemas_app, name="schemas")
app.add_typer(cdc_app, name="cdc")
app.add_typer(rollups_app, name="rollups")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(sources_app, name="sources")
app.command("upload")(upload)
app.command("backfill")(backfill)
app.command("verify")(verify)
app.command("sessions")(sessions)
app.add_typer(devices_app, name="devices")
app.add_typer(jobs_app, name="jobs")


class Then(StrEnum):
    wait = "wait"
    stop = "stop"
    keep = "keep"


@app.command()
def demo(
    ctx: typer.Context,
    rate: Annotated[int, typer.Option(min=1, help="Events per second to send.")] = 5000,
    duration: Annotated[float, typer.Option(min=1, help="Seconds to send for.")] = 60,
    batch_size: Annotated[int, typer.Option(min=1, help="Events per HTTP request.")] = 500,
    then: Annotated[
        Then | None,
        typer.Option(
            help="After the summary: wait for Ctrl-C then stop the stack, stop it "
            "at once, or keep it running. Default: wait in a terminal, else stop."
        ),
    ] = None,
) -> None:
    """Bring the stack up, send synthetic events at a steady rate with a live view, and
    check that the query API counts every one of them. Ctrl-C stops the stack cleanly.
    """
    from cluster import demo as demo_mod
    from cluster.deploy import base_url, connected

    settings = _settings(ctx)
    after = then or (Then.wait if sys.stdin.isatty() else Then.stop)
    ok = False
    try:
        _bring_up(settings)
        with connected(settings):
            run, base, final = asyncio.run(
                demo_mod.run_demo(settings, console, rate, duration, batch_size)
            )
        rows = demo_mod.check_counts(settings, run)
        ok = _print_summary(settings, run, base, final, rows)
        tenant = rows[0][0] if rows else "acme"
        console.print(
            f'try: curl -H "Authorization: Bearer $(rayline keys add {tenant})" '
            f"'{base_url(settings)}/v1/query/latest/purchase'"
        )
        if after is Then.wait:
            console.print("The stack keeps running; press Ctrl-C to stop it.")
            threading.Event().wait()
    except KeyboardInterrupt:
        console.print("\nstopping the stack ...")
        after = Then.stop
    finally:
        if after is Then.stop:
            stopped = _stack(settings).down()
            console.print(f"stopped: {', '.join(stopped) or 'nothing'}")
        elif after is Then.keep:
            console.print("The stack keeps running; stop it with `rayline down`.")
    if not ok:
        raise typer.Exit(1)


def _print_summary(
    settings: Settings,
    run: Any,
    base: dict[str, int],
    final: dict[str, int],
    rows: list[tuple[str, str, int, int, int, float]],
) -> bool:
    from cluster.deploy import base_url

    table = Table(title="sent vs. counted by the query API")
    for column in ("tenant", "type", "sent", "counted", "sum sent", "sum counted"):
        table.add_column(column, justify="right")
    ok = run.failed_requests == 0 and final["lag"] == 0
    for tenant, type_, sent, counted, sum_sent, sum_counted in rows:
        good = sent == counted and abs(sum_sent - sum_counted) < 1e-6
        ok = ok and good
        mark = "" if good else "[red]"
        table.add_row(
            tenant,
            type_,
            f"{sent:,}",
            f"{mark}{counted:,}",
            f"{sum_sent:,}",
            f"{mark}{sum_counted:,.0f}",
        )
    console.print(table)
    processed = final["processed"] - base["processed"]
    verdict = "[green]every event counted[/green]" if ok else "[red]counts do not add up[/red]"
    console.print(
        f"{verdict}: sent {run.sent:,}, processed {processed:,}, lag {final['lag']}, "
        f"failed requests {run.failed_requests}"
    )
    console.print(
        f"event time to Kafka's ack: p50 {run.age_quantile(0.5):.2f} s, "
        f"p99 {run.age_quantile(0.99):.2f} s, max {run.age_quantile(1.0):.2f} s "
        f"(allowed lateness {settings.pipeline.allowed_lateness_seconds:g} s)"
    )
    s = settings
    console.print(f"query API: {base_url(s)}/v1/query/docs (API keys: rayline keys add <tenant>)")
    console.print(f"Ray dashboard: http://{s.ray.host}:{s.ray.dashboard_port}")
    return ok


@app.command("ray-env")
def ray_env(ctx: typer.Context) -> None:
    """Print the shell lines that let `ray` commands (`ray job submit`, `ray status`) and
    your own drivers reach the local Ray head: its auth mode and the file holding its
    token. The token itself is not printed."""
    settings = _settings(ctx)
    for name, value in local_secrets.ray_environment(settings).items():
        console.print(f"export {name}={shlex.quote(value)}", highlight=False, soft_wrap=True)


@app.command()
def config(
    ctx: typer.Context,
    describe: Annotated[
        bool, typer.Option("--describe", help="List every setting with its variable and meaning.")
    ] = False,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="With --describe: a Markdown table (for docs/).")
    ] = False,
) -> None:
    """Print the effective settings (secrets hidden) as YAML."""
    if not describe:
        print(yaml.safe_dump(_settings(ctx).redacted(), sort_keys=False), end="")
        return
    rows = describe_settings()
    if markdown:
        print("| setting | environment variable | default | meaning |")
        print("|---|---|---|---|")
        for key, env, default, text in rows:
            print(f"| `{key}` | `{env}` | `{default}` | {text} |")
        return
    table = Table()
    for column in ("setting", "environment variable", "default", "meaning"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def run() -> None:
    """Entry point: errors of Rayline print as one clear message, not a traceback."""
    try:
        app()
    except RaylineError as exc:
        # A DSN quoted in a message never shows its password.
        err.print(f"[red]error:[/red] {local_secrets.redact(str(exc))}")
        sys.exit(2)
