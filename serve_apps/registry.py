"""Schema registry Serve app: the Confluent Schema Registry REST API on PostgreSQL.

Confluent clients (``SchemaRegistryClient``, ``AvroSerializer``, ``AvroDeserializer``)
work against it unchanged; point them at the app's URL, route prefix included
(``http://127.0.0.1:8000/registry``). Schemas land in the tables the pipeline reads,
so an id a Confluent producer writes into a record is the id the workers decode with.

Only Avro is served, without schema references. Any valid Avro schema is accepted
(checked with fastavro); the schemas of Rayline events must in addition pass
``core.avro.parse_schema_text`` when the workers load them. Compatibility is checked
by ``core.avro_compat`` under the subject's level, else the global one, else
:attr:`RegistryConfig.default_compatibility`. A schema is identified by
``core.avro.fingerprint`` (Parsing Canonical Form plus logical types and defaults), so
the same schema spelt differently gets the same id.

Errors are Confluent's: ``{"error_code": ..., "message": ...}`` with 40401 (subject
not found), 40402 (version not found), 40403 (schema not found), 40408 (no
subject-level compatibility), 42201 (invalid schema), 42202 (invalid version), 42203
(invalid compatibility level), 409 (incompatible schema), 50001 (store error); and 400
(malformed JSON), 413 (body over the limit), 415 (not JSON).
"""

# No `from __future__ import annotations`: FastAPI resolves handler annotations at
# run time, and inside Serve's ingress wrapper postponed ones are not found.
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import fastavro
import orjson
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.exceptions import StoreUnavailable
from adapters.schema_registry import GLOBAL, Incompatible, SchemaRegistryStore, SubjectVersion
from core.avro import AvroError, fingerprint
from core.avro_compat import LEVELS, compatible
from core.exceptions import ConfigurationError
from serve_apps.http import BodyTooLarge, read_body

MEDIA_TYPE = "application/vnd.schemaregistry.v1+json"
_ACCEPTED_TYPES = (
    "application/vnd.schemaregistry.v1+json",
    "application/vnd.schemaregistry+json",
    "application/json",
    "application/octet-stream",
)
_MAX_VERSION = 2**31 - 1


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """What a registry replica needs.

    Attributes:
        dsn: PostgreSQL DSN of Rayline's database (migrated: tables of migrations 2, 3).
        default_compatibility: the level used when neither the subject nor the global
            configuration sets one.
        max_body_bytes: the largest request body; larger ones get 413.
        pool_max_size: PostgreSQL connections per replica.
    """

    dsn: str
    default_compatibility: str = "BACKWARD"
    max_body_bytes: int = 1 << 20
    pool_max_size: int = 4


class RegistryJSONResponse(JSONResponse):
    """JSON in the registry's content type, written by orjson."""

    media_type = MEDIA_TYPE

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class RegistryError(Exception):
    """An answer in Confluent's error shape."""

    def __init__(self, status: int, error_code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A schema from a request body: its text, JSON value and fingerprint."""

    text: str
    value: Any
    fingerprint: str


class _Registry:
    """The app's state: the store and the configuration."""

    def __init__(self, config: RegistryConfig, store: SchemaRegistryStore) -> None:
        self.config = config
        self.store = store

    async def level(self, subject: str) -> str:
        return await self.store.effective_level(subject, self.config.default_compatibility)


# ------------------------------------------------------------------------------ the app


def create_app(config: RegistryConfig) -> FastAPI:
    """The registry's FastAPI app, as each Serve replica (and the tests) build it."""
    if config.default_compatibility not in LEVELS:
        raise ConfigurationError(
            f"default_compatibility {config.default_compatibility!r} is not a compatibility "
            f"level: expected one of {', '.join(LEVELS)}"
        )
    registry = _Registry(config, SchemaRegistryStore(config.dsn, max_size=config.pool_max_size))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await registry.store.close()

    app = FastAPI(
        title="Rayline schema registry",
        description="The Confluent Schema Registry REST API (Avro), stored in PostgreSQL.",
        default_response_class=RegistryJSONResponse,
        lifespan=lifespan,
    )
    app.state.registry = registry
    app.add_exception_handler(RegistryError, _registry_error)
    app.add_exception_handler(StoreUnavailable, _store_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.include_router(_router)
    return app


@serve.deployment
@serve.ingress()
class SchemaRegistryAPI:
    """The registry as a Serve deployment; each replica builds its app with :func:`create_app`."""

    def __init__(self, config: RegistryConfig) -> None:
        self._config = config

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self._config)


def _error(status: int, error_code: int, message: str) -> RegistryJSONResponse:
    return RegistryJSONResponse({"error_code": error_code, "message": message}, status)


async def _registry_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RegistryError)
    return _error(exc.status, exc.error_code, exc.message)


async def _store_error(_request: Request, exc: Exception) -> Response:
    return _error(500, 50001, f"Error in the backend data store: {exc}; retry later")


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return _error(exc.status_code, exc.status_code, str(exc.detail))


async def _validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    where = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
    )
    return _error(422, 422, f"invalid request: {where}")


def _registry(request: Request) -> _Registry:
    registry = request.app.state.registry
    assert isinstance(registry, _Registry)
    return registry


# ----------------------------------------------------------------------------- requests


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "application/json")
    if content_type.split(";")[0].strip().lower() not in _ACCEPTED_TYPES:
        raise RegistryError(
            415,
            415,
            f"expected Content-Type {MEDIA_TYPE} or application/json, got {content_type!r}",
        )
    try:
        body = await read_body(request, limit)
    except BodyTooLarge as exc:
        raise RegistryError(413, 413, f"{exc}: schemas are small; send one at a time") from None
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RegistryError(400, 400, f"malformed JSON body: {exc}") from None
    if not isinstance(value, dict):
        raise RegistryError(
            400, 400, f'expected a JSON object such as {{"schema": "..."}}, got {_kind(value)}'
        )
    return value


def _candidate(body: dict[str, Any]) -> _Candidate:
    """The schema of a registration, lookup or compatibility request, checked."""
    schema_type = body.get("schemaType") or "AVRO"
    if schema_type != "AVRO":
        raise RegistryError(
            422, 42201, f"schema type {schema_type!r} is not supported: only AVRO is supported"
        )
    if body.get("references"):
        raise RegistryError(
            422,
            42201,
            "schema references are not supported: define the referenced types inline, "
            "in the schema itself",
        )
    text = body.get("schema")
    if not isinstance(text, str) or not text.strip():
        raise RegistryError(
            422, 42201, f"Empty schema: 'schema' must be the schema's JSON text, got {_kind(text)}"
        )
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise RegistryError(422, 42201, f"Invalid schema: not JSON: {exc}") from None
    try:
        fastavro.parse_schema(value)
        digest = fingerprint(text)
    except Exception as exc:  # fastavro raises many types on malformed schemas
        raise RegistryError(422, 42201, f"Invalid schema: {_reason(exc)}") from None
    return _Candidate(text, value, digest)


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, AvroError) else f"{type(exc).__name__}: {exc}"


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _version(text: str) -> int | None:
    """A version in a path: a number from 1, or ``latest`` / ``-1`` (None)."""
    if text in ("latest", "-1"):
        return None
    if text.isdigit() and 1 <= int(text) <= _MAX_VERSION:
        return int(text)
    raise RegistryError(
        422,
        42202,
        f"The specified version {text!r} is not a valid version id. Allowed values are "
        f'between [1, {_MAX_VERSION}] and the string "latest"',
    )


def _schema_id(text: str) -> int:
    if text.isdigit() and int(text) <= 2**31 - 1:
        return int(text)
    raise RegistryError(404, 40403, f"Schema {text} not found: schema ids are positive integers")


def _check_level(level: Any) -> str:
    if not isinstance(level, str) or level.upper() not in LEVELS:
        raise RegistryError(
            422,
            42203,
            f"Invalid compatibility level {level!r}: expected one of {', '.join(LEVELS)}",
        )
    return level.upper()


def _subject_not_found(subject: str) -> RegistryError:
    return RegistryError(404, 40401, f"Subject '{subject}' not found.")


async def _found(registry: _Registry, subject: str, found: Any, what: str) -> Any:
    """``found`` when it is not None, else the right 404: no subject, or no ``what``."""
    if found is not None:
        return found
    if not await registry.store.versions(subject):
        raise _subject_not_found(subject)
    code = 40402 if what == "version" else 40403
    raise RegistryError(404, code, f"{what.capitalize()} not found under subject '{subject}'.")


def _as_json(sv: SubjectVersion) -> dict[str, Any]:
    return {"subject": sv.subject, "version": sv.version, "id": sv.schema_id, "schema": sv.schema}


def _checker(candidate: _Candidate) -> Any:
    def check(level: str, texts: Any) -> list[str]:
        if level == "NONE":
            return []
        if level not in LEVELS:
            return [
                f"the stored compatibility level {level!r} is unknown: set one with PUT /config"
            ]
        return compatible(level, candidate.value, [orjson.loads(t) for t in texts])

    return check


# ------------------------------------------------------------------------------- routes

_router = APIRouter()


@_router.get("/")
async def root() -> Any:
    return {}


@_router.get("/subjects")
async def list_subjects(request: Request) -> Any:
    return await _registry(request).store.subjects()


@_router.get("/subjects/{subject}/versions")
async def list_versions(request: Request, subject: str) -> Any:
    versions = await _registry(request).store.versions(subject)
    if not versions:
        raise _subject_not_found(subject)
    return versions


@_router.post("/subjects/{subject}/versions")
async def register(request: Request, subject: str) -> Any:
    registry = _registry(request)
    candidate = _candidate(await _json_body(request, registry.config.max_body_bytes))
    try:
        registered = await registry.store.register(
            subject,
            candidate.text,
            candidate.fingerprint,
            _checker(candidate),
            registry.config.default_compatibility,
        )
    except Incompatible as exc:
        raise RegistryError(
            409,
            409,
            f"Schema being registered is incompatible with an earlier schema for subject "
            f"'{subject}' under {exc.level}, details: {exc.problems}",
        ) from None
    return {"id": registered.schema_id}


@_router.post("/subjects/{subject}")
async def lookup(request: Request, subject: str) -> Any:
    registry = _registry(request)
    candidate = _candidate(await _json_body(request, registry.config.max_body_bytes))
    found = await registry.store.lookup(subject, candidate.fingerprint)
    return _as_json(await _found(registry, subject, found, "schema"))


@_router.delete("/subjects/{subject}")
async def delete_subject(request: Request, subject: str) -> Any:
    deleted = await _registry(request).store.delete_subject(subject)
    if not deleted:
        raise _subject_not_found(subject)
    return deleted


@_router.get("/subjects/{subject}/versions/{version}")
async def get_version(request: Request, subject: str, version: str) -> Any:
    registry = _registry(request)
    found = await registry.store.version(subject, _version(version))
    return _as_json(await _found(registry, subject, found, "version"))


@_router.get("/subjects/{subject}/versions/{version}/schema")
async def get_version_schema(request: Request, subject: str, version: str) -> Any:
    registry = _registry(request)
    found = await registry.store.version(subject, _version(version))
    sv: SubjectVersion = await _found(registry, subject, found, "version")
    return Response(sv.schema, media_type=MEDIA_TYPE)


@_router.delete("/subjects/{subject}/versions/{version}")
async def delete_version(request: Request, subject: str, version: str) -> Any:
    registry = _registry(request)
    deleted = await registry.store.delete_version(subject, _version(version))
    return await _found(registry, subject, deleted, "version")


@_router.get("/schemas/types")
async def schema_types() -> Any:
    return ["AVRO"]


@_router.get("/schemas/ids/{schema_id}")
async def get_schema(request: Request, schema_id: str) -> Any:
    return {"schema": await _schema_text(request, schema_id)}


@_router.get("/schemas/ids/{schema_id}/schema")
async def get_raw_schema(request: Request, schema_id: str) -> Any:
    return Response(await _schema_text(request, schema_id), media_type=MEDIA_TYPE)


@_router.get("/schemas/ids/{schema_id}/versions")
async def get_schema_versions(request: Request, schema_id: str) -> Any:
    await _schema_text(request, schema_id)
    pairs = await _registry(request).store.schema_versions(int(schema_id))
    return [{"subject": s, "version": v} for s, v in pairs]


@_router.get("/schemas/ids/{schema_id}/subjects")
async def get_schema_subjects(request: Request, schema_id: str) -> Any:
    await _schema_text(request, schema_id)
    pairs = await _registry(request).store.schema_versions(int(schema_id))
    return sorted({s for s, _ in pairs})


async def _schema_text(request: Request, schema_id: str) -> str:
    text = await _registry(request).store.schema(_schema_id(schema_id))
    if text is None:
        raise RegistryError(404, 40403, f"Schema {schema_id} not found.")
    return text


# ------------------------------------------------------------------------ configuration


@_router.get("/config")
async def get_global_config(request: Request) -> Any:
    registry = _registry(request)
    level = await registry.store.level(GLOBAL)
    return {"compatibilityLevel": level or registry.config.default_compatibility}


@_router.put("/config")
async def put_global_config(request: Request) -> Any:
    return await _put_level(request, GLOBAL)


@_router.delete("/config")
async def delete_global_config(request: Request) -> Any:
    registry = _registry(request)
    previous = await registry.store.delete_level(GLOBAL)
    return {"compatibilityLevel": previous or registry.config.default_compatibility}


@_router.get("/config/{subject}")
async def get_subject_config(
    request: Request,
    subject: str,
    default_to_global: bool = Query(False, alias="defaultToGlobal"),
) -> Any:
    registry = _registry(request)
    level = await registry.store.level(subject)
    if level is None and default_to_global:
        level = await registry.level(subject)
    if level is None:
        raise _no_subject_level(subject)
    return {"compatibilityLevel": level}


@_router.put("/config/{subject}")
async def put_subject_config(request: Request, subject: str) -> Any:
    return await _put_level(request, subject)


@_router.delete("/config/{subject}")
async def delete_subject_config(request: Request, subject: str) -> Any:
    previous = await _registry(request).store.delete_level(subject)
    if previous is None:
        raise _no_subject_level(subject)
    return {"compatibilityLevel": previous}


async def _put_level(request: Request, subject: str) -> Any:
    registry = _registry(request)
    body = await _json_body(request, registry.config.max_body_bytes)
    level = _check_level(body.get("compatibility", body.get("compatibilityLevel")))
    await registry.store.set_level(subject, level)
    return {"compatibility": level}


def _no_subject_level(subject: str) -> RegistryError:
    return RegistryError(
        404,
        40408,
        f"Subject '{subject}' does not have subject-level compatibility configured: "
        "add ?defaultToGlobal=true for the level in effect",
    )


# ------------------------------------------------------------------------ compatibility


@_router.post("/compatibility/subjects/{subject}/versions/{version}")
async def compatibility_with_version(
    request: Request, subject: str, version: str, verbose: bool = False
) -> Any:
    registry = _registry(request)
    candidate = _candidate(await _json_body(request, registry.config.max_body_bytes))
    found = await registry.store.version(subject, _version(version))
    target: SubjectVersion = await _found(registry, subject, found, "version")
    level = await registry.level(subject)
    problems = _checker(candidate)(level, [target.schema])
    return _verdict(problems, verbose)


@_router.post("/compatibility/subjects/{subject}/versions")
async def compatibility_with_subject(request: Request, subject: str, verbose: bool = False) -> Any:
    registry = _registry(request)
    candidate = _candidate(await _json_body(request, registry.config.max_body_bytes))
    versions = await registry.store.all_versions(subject)
    level = await registry.level(subject)
    problems = _checker(candidate)(level, [v.schema for v in versions])
    return _verdict(problems, verbose)


def _verdict(problems: list[str], verbose: bool) -> dict[str, Any]:
    answer: dict[str, Any] = {"is_compatible": not problems}
    if verbose:
        answer["messages"] = problems
    return answer
