"""The uploads endpoints: ``POST /v1/uploads`` streams a file into S3 and starts its job.

``POST /v1/uploads?source=NAME&filename=F`` with the raw file as the body; the
``Content-Type`` (or the file name's extension) names the format: CSV, NDJSON, Avro
container or Parquet. The body is never held whole: it goes to S3 as a multipart
upload of 8 MiB parts while it arrives. Answers:

* 202 ``{"id", "status_url", ...}`` once the whole file is in S3 and the job
  (``data_jobs/publish_upload.py``) has been started;
* 400 without ``source`` or ``filename``, or for a source that is not an upload source;
* 401 without a known API key, 403 with a revoked one or for a disabled source;
* 404 when the source does not exist or belongs to another tenant;
* 413 over :attr:`UploadsConfig.max_upload_bytes` (the parts sent so far are aborted:
  nothing stays in S3);
* 415 for a format that is not one of the four;
* 503 with ``Retry-After`` when S3 or PostgreSQL fails.

``GET /v1/uploads/{id}`` reports the upload's state and counters (and ``parts``, total
and done, for a file read in parts), and where its rejected rows went (``rejected_to``:
the dead-letter topic and the header that marks this upload's dead letters). Another
tenant's upload is answered 404, like one that does not exist.

This module does not depend on Ray Serve: the Serve deployment
(``serve_apps/uploads.py``) and :func:`standalone_app` (uvicorn, tests) both wrap
:class:`UploadsHandler`.
"""

# No `from __future__ import annotations`: FastAPI resolves handler annotations at
# run time.
import asyncio
import re
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from adapters.exceptions import StoreUnavailable
from adapters.s3 import MultipartWriter, S3Config, S3Store
from adapters.sources import Source, SourceCatalog
from adapters.uploads import Upload, UploadTable
from core import formats
from core.envelope import name_problem
from serve_apps.auth import ApiKeys, AuthFailed

ROUTE_PREFIX = "/v1/uploads"
# Formats a file may have (``core.formats`` names); the others are request bodies.
UPLOAD_FORMATS = ("csv", "ndjson", "avro-container", "parquet")
# The default for `UploadsConfig.max_upload_bytes` (10 GiB).
MAX_UPLOAD_BYTES = 10 * 1024**3
_FILENAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_FILENAME = 200
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True, slots=True)
class UploadsConfig:
    """What the uploads app needs; ``start_job(upload_id)`` starts the publish job."""

    dsn: str
    s3: S3Config
    dlq_topic: str
    start_job: Callable[[str], object]
    max_upload_bytes: int = MAX_UPLOAD_BYTES


def _json(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def _json_error(status: int, message: str, *, retry_after: float | None = None) -> Response:
    """The error shape of every Rayline endpoint: ``{"error": ...}`` (+ ``Retry-After``)."""
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else None
    return _json({"error": message}, status, headers)


class _Refused(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def safe_filename(name: str) -> str:
    """The last path segment of ``name`` with anything but ``[A-Za-z0-9._-]`` made ``_``.

    Raises:
        ValueError: nothing usable is left (empty, ``.``, ``..``).
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _FILENAME_UNSAFE.sub("_", base).strip("_")[-_MAX_FILENAME:]
    if cleaned in ("", ".", ".."):
        raise ValueError(f"file name {name!r} has no usable characters; name the file")
    return cleaned


def object_key(tenant: str, upload_id: str, filename: str) -> str:
    """Where an upload lives in the bucket: ``uploads/<tenant>/<id>/<file name>``."""
    return f"uploads/{tenant}/{upload_id}/{safe_filename(filename)}"


def status_body(
    upload: Upload, dlq_topic: str, parts: tuple[int, int] = (0, 0)
) -> dict[str, Any]:
    """The answer of ``GET /v1/uploads/{id}``; ``parts`` (total, done) of a file read in
    parts, shown as ``{"total", "done"}`` (``null`` for a file read in one pass)."""
    body = upload.as_dict()
    body["parts"] = {"total": parts[0], "done": parts[1]} if parts[0] else None
    body["status_url"] = f"{ROUTE_PREFIX}/{upload.id}"
    body["rejected_to"] = {"topic": dlq_topic, "headers": {"origin.upload": upload.id}}
    return body


class UploadsHandler:
    """The two endpoints, on plain Starlette requests."""

    def __init__(self, config: UploadsConfig) -> None:
        self._config = config
        self._catalog = SourceCatalog(config.dsn)
        self._keys = ApiKeys(config.dsn, self._catalog)
        self._table = UploadTable(config.dsn)
        self._store = S3Store(config.s3)
        # Handles of recent jobs, so that they are not released while they run.
        self._jobs: deque[object] = deque(maxlen=1000)

    async def post(self, request: Request) -> Response:
        try:
            tenant = await self._keys.tenant_for(request)
            upload = await self._accept(request, tenant)
        except AuthFailed as exc:
            return _json_error(exc.status, str(exc))
        except _Refused as exc:
            return _json_error(exc.status, str(exc), retry_after=exc.retry_after)
        except StoreUnavailable as exc:
            return _json_error(503, str(exc), retry_after=5)
        body = {
            "id": upload.id,
            "status_url": f"{ROUTE_PREFIX}/{upload.id}",
            "format": upload.format,
            "size_bytes": upload.size_bytes,
            "object_key": upload.object_key,
        }
        return _json(body, 202)

    async def get(self, upload_id: str, request: Request) -> Response:
        try:
            tenant = await self._keys.tenant_for(request)
            if not _UPLOAD_ID.match(upload_id):  # checked here: PostgreSQL refuses a NUL
                return _json_error(
                    404, f"no upload {upload_id[:80]!r}: an upload id is 32 hex digits"
                )
            upload = await self._table.get(upload_id, tenant)
            if upload is None:
                return _json_error(404, f"no upload {upload_id!r} of your tenant")
            parts = await self._table.part_counts(upload_id)
        except AuthFailed as exc:
            return _json_error(exc.status, str(exc))
        except StoreUnavailable as exc:
            return _json_error(503, str(exc), retry_after=5)
        return _json(status_body(upload, self._config.dlq_topic, parts))

    async def _accept(self, request: Request, tenant: str) -> Upload:
        source_name = request.query_params.get("source")
        filename = request.query_params.get("filename")
        if not source_name or not filename:
            raise _Refused(400, "expected query parameters ?source=NAME&filename=FILE")
        try:
            clean_name = safe_filename(filename)
        except ValueError as exc:
            raise _Refused(400, str(exc)) from exc
        await self._check_source(source_name, tenant)
        content_type = request.headers.get("content-type", "")
        try:
            fmt = formats.format_of(content_type, clean_name)
        except formats.UnsupportedFormat as exc:
            raise _Refused(415, str(exc)) from exc
        if fmt not in UPLOAD_FORMATS:
            raise _Refused(
                415,
                f"{fmt} is a request body format; upload files as one of {UPLOAD_FORMATS} "
                "(text/csv, application/x-ndjson, application/vnd.apache.avro+container, "
                "application/vnd.apache.parquet), or send events to POST /v1/events",
            )
        self._check_declared_size(request)
        upload_id = uuid.uuid4().hex
        key = object_key(tenant, upload_id, clean_name)
        size = await self._stream_to_s3(request, key, content_type or "application/octet-stream")
        upload = Upload(upload_id, tenant, source_name, clean_name, fmt, key, size, "queued")
        await self._table.add(upload)
        try:
            self._jobs.append(self._config.start_job(upload_id))
        except Exception as exc:
            await self._table.finish(upload_id, error=f"the job could not start: {exc}")
            raise _Refused(503, f"the file is stored, but its job did not start: {exc}", 5) from exc
        return upload

    async def _check_source(self, name: str, tenant: str) -> None:
        problem = name_problem("source", name)
        if problem is not None:
            raise _Refused(400, f"query parameter 'source' {problem}")
        source: Source | None = await self._catalog.source(name)
        if source is None or source.tenant != tenant:
            raise _Refused(
                404,
                f"source {name!r} is not a source of your tenant: create it with "
                f"`rayline sources add {name} --kind upload --tenant {tenant}`",
            )
        if source.kind != "upload":
            raise _Refused(
                400, f"source {name!r} is of kind {source.kind!r}; files go to an upload source"
            )
        if not source.enabled:
            raise _Refused(403, f"source {name!r} is disabled")

    def _check_declared_size(self, request: Request) -> None:
        declared = request.headers.get("content-length")
        limit = self._config.max_upload_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _Refused(413, f"file of {declared} bytes is over the limit of {limit} bytes")

    async def _stream_to_s3(self, request: Request, key: str, content_type: str) -> int:
        limit = self._config.max_upload_bytes
        with self._store.writer(key, content_type) as writer:
            try:
                async for chunk in request.stream():
                    writer.feed(chunk)
                    if writer.size > limit:
                        raise _Refused(413, f"file is over the limit of {limit} bytes")
                    if writer.ready:
                        await asyncio.to_thread(writer.upload_ready)
            except ClientDisconnect as exc:
                raise _Refused(400, "the client went away before the whole file came") from exc
            return await asyncio.to_thread(_complete, writer)

    async def close(self) -> None:
        await self._table.close()
        await self._catalog.close()


def _complete(writer: MultipartWriter) -> int:
    return writer.complete()


def _closing(handler: UploadsHandler) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await handler.close()

    return lifespan


def build_app(handler: UploadsHandler, prefix: str = ROUTE_PREFIX) -> FastAPI:
    """The FastAPI app of the two endpoints under ``prefix`` ("" behind Serve's route
    prefix, which Serve strips)."""
    api = FastAPI(
        title="Rayline uploads API",
        description="Takes files (CSV, NDJSON, Avro, Parquet) into S3 and publishes their rows.",
        lifespan=_closing(handler),
    )
    api.add_api_route(prefix, handler.post, methods=["POST"], status_code=202)
    api.add_api_route(prefix + "/{upload_id}", handler.get, methods=["GET"])
    return api


def standalone_app(config: UploadsConfig) -> FastAPI:
    """The app without Ray Serve, e.g. under uvicorn."""
    return build_app(UploadsHandler(config))
