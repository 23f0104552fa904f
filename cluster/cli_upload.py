"""``rayline upload FILE``: stream a file to ``POST /v1/uploads`` and follow its job.

Exit codes: 0 when every row was published, 2 when some rows were rejected (they are
in the dead-letter topic, and the command says how to find them), 1 on failure.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from cluster.settings import Settings

CHUNK_BYTES = 1024 * 1024
console = Console()
err = Console(stderr=True)


class FileFormat(StrEnum):
    csv = "csv"
    ndjson = "ndjson"
    avro = "avro"
    parquet = "parquet"


CONTENT_TYPES = {
    FileFormat.csv: "text/csv",
    FileFormat.ndjson: "application/x-ndjson",
    FileFormat.avro: "application/vnd.apache.avro+container",
    FileFormat.parquet: "application/vnd.apache.parquet",
}
_EXTENSIONS = {
    ".csv": FileFormat.csv,
    ".ndjson": FileFormat.ndjson,
    ".jsonl": FileFormat.ndjson,
    ".avro": FileFormat.avro,
    ".parquet": FileFormat.parquet,
}


def content_type_for(path: Path, fmt: FileFormat | None) -> str:
    """The Content-Type to send: from ``--format``, else from the file's extension
    (``application/octet-stream`` when unknown: the server then goes by the name)."""
    chosen = fmt or _EXTENSIONS.get(path.suffix.lower())
    return CONTENT_TYPES[chosen] if chosen else "application/octet-stream"


def render_status(body: dict[str, Any]) -> str:
    """One line about an upload's progress."""
    line = (
        f"upload {body['id']}: {body['state']} · {body['rows_read']:,} rows read · "
        f"{body['rows_accepted']:,} accepted · {body['rows_rejected']:,} rejected"
    )
    parts = body.get("parts")
    if parts:
        line += f" · parts {parts['done']}/{parts['total']} done"
    historical = body.get("rows_historical") or 0
    if historical:
        line += (
            f" · {historical:,} behind the stream, counted by the history job "
            f"({body.get('history_written') or 0:,} written, "
            f"{body.get('history_stored') or 0:,} stored already)"
        )
    return line


def exit_code(body: dict[str, Any]) -> int:
    """0 done without rejects, 2 done with rejects, 1 failed."""
    if body["state"] != "done":
        return 1
    return 2 if body["rows_rejected"] else 0


def rejected_hint(body: dict[str, Any]) -> str:
    """Where the rejected rows of an upload went, in words."""
    where = body.get("rejected_to") or {}
    headers = ", ".join(f"{k}={v}" for k, v in (where.get("headers") or {}).items())
    return (
        f"{body['rows_rejected']:,} rejected row(s) are in topic {where.get('topic')!r}, "
        f"with headers {headers} (each dead letter says its row in origin.index and why "
        "in reason)"
    )


def _chunks(path: Path, progress: Progress, task: Any) -> Iterator[bytes]:
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            progress.advance(task, len(chunk))
            yield chunk


def _send(client: httpx.Client, path: Path, source: str, content_type: str) -> dict[str, Any]:
    size = path.stat().st_size
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(f"sending {path.name}", total=size)
        answer = client.post(
            "/v1/uploads",
            params={"source": source, "filename": path.name},
            headers={"content-type": content_type, "content-length": str(size)},
            content=_chunks(path, progress, task),
        )
    if answer.status_code != 202:
        raise _Failed(f"the upload was refused ({answer.status_code}): {_reason(answer)}")
    body: dict[str, Any] = answer.json()
    return body


def _follow(client: httpx.Client, status_url: str, poll_seconds: float) -> dict[str, Any]:
    with console.status("waiting for the job ...") as shown:
        while True:
            answer = client.get(status_url)
            if answer.status_code != 200:
                raise _Failed(f"status check failed ({answer.status_code}): {_reason(answer)}")
            body: dict[str, Any] = answer.json()
            shown.update(render_status(body))
            if body["state"] in ("done", "failed"):
                return body
            time.sleep(poll_seconds)


class _Failed(Exception):
    pass


def _reason(answer: httpx.Response) -> str:
    try:
        return str(answer.json().get("error", answer.text))
    except ValueError:
        return answer.text[:500]


def upload(
    ctx: typer.Context,
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="File to send.")
    ],
    source: Annotated[str, typer.Option("--source", help="Upload source the rows come from.")],
    api_key: Annotated[str, typer.Option("--api-key", help="The tenant's API key.")],
    file_format: Annotated[
        FileFormat | None,
        typer.Option("--format", help="File format (default: from the file's extension)."),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option("--url", help="Base URL of the API (default: the local Serve proxy)."),
    ] = None,
    poll_seconds: Annotated[float, typer.Option(help="Seconds between status checks.")] = 1.0,
) -> None:
    """Upload a CSV, NDJSON, Avro or Parquet file and follow its rows into Kafka.

    Exit code 0: every row published; 2: some rows rejected (the dead-letter topic has
    them); 1: the upload or its job failed.
    """
    settings = ctx.obj
    assert isinstance(settings, Settings)
    base = url or f"http://{settings.serve.host}:{settings.serve.port}"
    content_type = content_type_for(file, file_format)
    headers = {"authorization": f"Bearer {api_key}"}
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(60.0)) as client:
            sent = _send(client, file, source, content_type)
            console.print(
                f"stored as {sent['object_key']}; publishing its rows ...", soft_wrap=True
            )
            final = _follow(client, sent["status_url"], poll_seconds)
    except _Failed as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    except httpx.HTTPError as exc:
        err.print(f"[red]error:[/red] could not reach {base}: {exc} (is `rayline up` done?)")
        raise typer.Exit(1) from exc
    console.print(render_status(final), soft_wrap=True)
    code = exit_code(final)
    if final["state"] == "failed":
        err.print(f"[red]the job failed:[/red] {final.get('error')}")
    elif code == 2:
        err.print(rejected_hint(final), soft_wrap=True)
    raise typer.Exit(code)
