"""``rayline backfill PREFIX --source S``: count files already in S3, as uploads are.

Each object under the prefix (in the stack's bucket) becomes an upload of the source's
tenant: a row in ``uploads``, then the same job on the Ray cluster as a file sent to
``POST /v1/uploads`` (``data_jobs.publish_upload``): its rows are validated, the recent
ones streamed, and those behind the stream counted by the history job (Ray Data, see
docs/batch.md). Files run side by side, one Ray task each; progress shows per file.

Exit codes as ``rayline upload``: 0 every row counted, 2 some rows rejected (in the
dead-letter topic), 1 a file failed or nothing matched.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import PurePosixPath
from typing import Annotated, Any

import typer
from rich.console import Console

from cluster.cli_context import settings_of
from cluster.cli_upload import _EXTENSIONS, FileFormat, render_status

console = Console()
err = Console(stderr=True)


def format_of(key: str, chosen: FileFormat | None) -> FileFormat | None:
    """The format of an object: ``--format``, else its extension; None when unknown."""
    return chosen or _EXTENSIONS.get(PurePosixPath(key).suffix.lower())


def backfill(
    ctx: typer.Context,
    prefix: Annotated[
        str,
        typer.Argument(
            help="Key prefix in the stack's bucket (s3.bucket), e.g. imports/2026-11/; "
            "a whole key counts one file."
        ),
    ],
    source: Annotated[str, typer.Option("--source", help="Upload source the rows come from.")],
    file_format: Annotated[
        FileFormat | None,
        typer.Option("--format", help="Format of every file (default: from each extension)."),
    ] = None,
    poll_seconds: Annotated[float, typer.Option(help="Seconds between progress checks.")] = 1.0,
) -> None:
    """Count files already in S3 as uploads of SOURCE: recent rows through the stream,
    older ones by the history job (Ray Data), with their days' rollups recomputed.

    Exit code 0: every row counted; 2: some rows rejected (the dead-letter topic has
    them, with origin.upload); 1: a file failed or no file matched.
    """
    from cluster.deploy import connected

    settings = settings_of(ctx)
    try:
        with connected(settings):
            finals = asyncio.run(_run(settings, prefix, source, file_format, poll_seconds))
    except _Failed as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    for body in finals:
        console.print(f"{body['object_key']}: {render_status(body)}", soft_wrap=True)
    failed = [b for b in finals if b["state"] != "done"]
    for body in failed:
        err.print(f"[red]{body['object_key']} failed:[/red] {body['error']}")
    if failed:
        raise typer.Exit(1)
    if any(b["rows_rejected"] for b in finals):
        err.print(
            f"rejected rows are in topic {settings.kafka.dlq_topic!r} with header "
            "origin.upload=<upload id> (each says its row in origin.index and why in reason)"
        )
        raise typer.Exit(2)


class _Failed(Exception):
    pass


async def _run(
    settings: Any, prefix: str, source: str, chosen: FileFormat | None, poll_seconds: float
) -> list[dict[str, Any]]:
    from adapters.s3 import S3Config, S3Store
    from adapters.sources import SourceCatalog
    from adapters.uploads import Upload, UploadTable

    catalog = SourceCatalog(settings.postgres.dsn(), max_size=1)
    table = UploadTable(settings.postgres.dsn(), max_size=1)
    try:
        found = await catalog.source(source)
        if found is None or found.kind != "upload" or found.tenant is None:
            raise _Failed(
                f"source {source!r} is not an upload source of a tenant; add one with "
                f"`rayline sources add {source} --kind upload --tenant TENANT`"
            )
        store = S3Store(S3Config.of(settings.s3))
        keys = [k for k in store.all_keys(prefix) if not k.endswith("/")]
        if not keys:
            raise _Failed(f"no object under {prefix!r} in bucket {settings.s3.bucket!r}")
        unknown = [k for k in keys if format_of(k, chosen) is None]
        if unknown:
            raise _Failed(
                f"{len(unknown)} file(s) of unknown format, e.g. {unknown[0]!r}: name them "
                "*.csv, *.ndjson, *.jsonl, *.avro or *.parquet, or pass --format"
            )
        uploads = []
        for key in keys:
            head = store.head(key) or {}
            upload = Upload(
                id=uuid.uuid4().hex,
                tenant=found.tenant,
                source=source,
                filename=PurePosixPath(key).name,
                format=str(format_of(key, chosen)),
                object_key=key,
                size_bytes=int(head.get("ContentLength", 0)),
                state="queued",
            )
            await table.add(upload)
            uploads.append(upload)
        console.print(f"{len(uploads)} file(s) under {prefix!r}; starting their jobs ...")
        refs = _start(settings, [u.id for u in uploads])
        return await _follow(table, [u.id for u in uploads], refs, poll_seconds)
    finally:
        await catalog.close()
        await table.close()


def _start(settings: Any, upload_ids: list[str]) -> list[Any]:
    from cluster.deploy import uploads_config

    start_job = uploads_config(settings).start_job
    return [start_job(upload_id) for upload_id in upload_ids]


async def _follow(
    table: Any, upload_ids: list[str], refs: list[Any], poll_seconds: float
) -> list[dict[str, Any]]:
    import ray

    with console.status("counting ...") as shown:
        while True:
            bodies = []
            for upload_id in upload_ids:
                upload = await table.get(upload_id)
                assert upload is not None  # added above; uploads are never deleted
                bodies.append(upload.as_dict())
            shown.update("\n".join(render_status(b) for b in bodies))
            if all(b["state"] in ("done", "failed") for b in bodies):
                return bodies
            # A task lost with its worker never writes its row's state: say so.
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError:
                    pass  # the job wrote `failed` with its error first
                except ray.exceptions.RayError as exc:
                    raise _Failed(f"a job was lost: {exc}") from exc
            await asyncio.sleep(poll_seconds)
