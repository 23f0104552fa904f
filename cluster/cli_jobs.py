"""``rayline jobs submit|list|logs|stop``: batch jobs through the Ray Jobs API.

A job is a command that runs as a Ray job's driver on the head node: Rayline's batch
entry points are commands of its own (docs/batch.md lists them)::

    rayline jobs submit -- rayline verify --from 2026-12-04T00:00:00Z --to 2026-12-05T00:00:00Z
    rayline jobs submit -- rayline backfill imports/2026-11/ --source billing
    rayline jobs submit -- rayline rollups rebuild --from 2026-11-01 --to 2026-11-08

It is the same API as ``ray job submit --address http://HEAD:8265 -- ...`` (with the
cluster's auth token, which this command sends). The job's runtime environment carries
the ``RAYLINE_*`` settings of this process, so the job sees the cluster as this command
does; on a cluster whose image holds Rayline nothing else is needed.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cluster.cli_context import settings_of

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

console = Console()
err = Console(stderr=True)

jobs_app = typer.Typer(
    help="Batch jobs on the Ray cluster (the Ray Jobs API): submit, list, logs, stop."
)

_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _client(ctx: typer.Context) -> JobSubmissionClient:
    from ray.job_submission import JobSubmissionClient

    settings = settings_of(ctx)
    address = f"http://{settings.ray.host}:{settings.ray.dashboard_port}"
    try:
        return JobSubmissionClient(address)
    except ConnectionError as exc:
        err.print(
            f"[red]error:[/red] no Ray Jobs API at {address}: {exc}. Start the stack with "
            "`rayline up`, or set ray.host and ray.dashboard_port to the cluster's head"
        )
        raise typer.Exit(2) from exc


_SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "KEY")


def job_environment(environ: dict[str, str]) -> dict[str, str]:
    """The variables a job's driver needs to see the cluster as this process does: the
    Rayline settings (``RAYLINE_*``), not the Ray token (the cluster gives its own).

    Secrets stay out: a job's runtime environment is shown by ``ray job list`` and the
    dashboard. The job reads them where the head does (the local state directory, or
    the cluster image's environment).
    """
    return {
        name: value
        for name, value in environ.items()
        if name.startswith("RAYLINE_") and not any(w in name.upper() for w in _SECRET_WORDS)
    }


@jobs_app.command("submit", context_settings={"allow_extra_args": True})
def submit(
    ctx: typer.Context,
    entrypoint: Annotated[
        list[str],
        typer.Argument(help="The command to run, after --: e.g. -- rayline verify --from ..."),
    ],
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow the job's logs until it ends.")
    ] = True,
    submission_id: Annotated[
        str | None, typer.Option("--id", help="Submission id (default: rayline-<random>).")
    ] = None,
    num_cpus: Annotated[
        float, typer.Option(min=0, help="CPUs the job's driver reserves (default 0).")
    ] = 0,
) -> None:
    """Run a command as a Ray job; with --wait (the default) its logs show as it runs and
    the exit code is 0 when it succeeded, 1 when it failed or was stopped."""
    client = _client(ctx)
    command = shlex.join(entrypoint)
    job_id = _submitted(
        client,
        entrypoint=command,
        submission_id=submission_id or f"rayline-{uuid.uuid4().hex[:12]}",
        runtime_env={"env_vars": job_environment(dict(os.environ))},
        entrypoint_num_cpus=num_cpus,
        metadata={"submitted_by": "rayline jobs submit"},
    )
    err.print(f"submitted {job_id}: {command}")
    if not wait:
        console.print(job_id)
        return
    asyncio.run(_follow(client, job_id))
    status = _wait_status(client, job_id)
    err.print(f"{job_id}: {status}")
    if status != "SUCCEEDED":
        raise typer.Exit(1)


def _submitted(client: JobSubmissionClient, attempts: int = 3, **job: Any) -> str:
    """The job's id once the cluster took it. The head answers "no available agent"
    while its dashboard agent is not serving yet (just after `rayline up`): that is
    retried; what stays refused is said, with what to check."""
    attempt = 1
    while True:
        try:
            return str(client.submit_job(**job))
        except RuntimeError as exc:
            agentless = "No available agent" in str(exc)
            if not agentless or attempt == attempts:
                hint = (
                    "the head's dashboard agent does not serve: see dashboard_agent.log in "
                    "the Ray session's logs (a port taken by another Ray? ray.agent_port "
                    "sets it)"
                    if agentless
                    else "see the message"
                )
                err.print(f"[red]error:[/red] the cluster refused the job: {exc} ({hint})")
                raise typer.Exit(2) from exc
        time.sleep(2.0 * attempt)
        attempt += 1


async def _follow(client: JobSubmissionClient, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def _wait_status(client: JobSubmissionClient, job_id: str, timeout: float = 30) -> str:
    """The job's status once terminal (the log stream may end a little before)."""
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in _TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


@jobs_app.command("list")
def list_jobs(ctx: typer.Context) -> None:
    """Every job the cluster knows, newest first."""
    jobs = sorted(_client(ctx).list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
    table = Table()
    table.add_column("id", no_wrap=True)
    table.add_column("status")
    table.add_column("started", no_wrap=True)
    table.add_column("took", no_wrap=True)
    table.add_column("entrypoint", overflow="fold")
    for job in jobs:
        table.add_row(
            str(job.submission_id or job.job_id),
            str(job.status.value),
            _when(job.start_time),
            _took(job.start_time, job.end_time),
            job.entrypoint,
        )
    console.print(table)


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _took(start: int | None, end: int | None) -> str:
    if not start:
        return "-"
    return f"{((end or int(time.time() * 1000)) - start) / 1000:.1f} s"


@jobs_app.command("logs")
def logs(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job's submission id (rayline jobs list).")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")
    ] = False,
) -> None:
    """The job's driver output (what it printed, Ray Data's progress included)."""
    client = _client(ctx)
    _known(client, job_id)
    if follow:
        asyncio.run(_follow(client, job_id))
    else:
        print(client.get_job_logs(job_id), end="")


@jobs_app.command("stop")
def stop(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job's submission id (rayline jobs list).")],
) -> None:
    """Stop a running job (its driver gets SIGTERM, then SIGKILL); waits until it has."""
    client = _client(ctx)
    info = _known(client, job_id)
    if str(info.status.value) in _TERMINAL:
        console.print(f"{job_id} already ended: {info.status.value}")
        return
    client.stop_job(job_id)
    console.print(f"{job_id}: {_wait_status(client, job_id)}")


def _known(client: JobSubmissionClient, job_id: str) -> Any:
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        err.print(f"[red]error:[/red] no job {job_id!r} ({exc}); `rayline jobs list` shows them")
        raise typer.Exit(2) from exc
