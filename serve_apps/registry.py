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

Every request needs a Rayline API key (:class:`serve_apps.auth.ApiKeys`): HTTP basic
auth ``<tenant>:<key>`` (what Confluent clients send for ``basic.auth.user.info``; the
user part may be empty, else it must be the key's tenant, ``*`` for the platform key),
``Authorization: Bearer <key>`` or ``X-API-Key``. A tenant key reads and writes only
the subjects of its own sources and reads those of shared ones
(:mod:`core.subject_scope`); deleting and changing compatibility levels take the
platform key (``*``). Schemas by id are visible to a tenant key only through a subject
it may read.

Errors are Confluent's: ``{"error_code": ..., "message": ...}`` with 40101 (no or bad
credentials, with ``WWW-Authenticate``), 40301 (the key may not do this), 40401
(subject not found), 40402 (version not found), 40403 (schema not found), 40408 (no
subject-level compatibility), 42201 (invalid schema), 42202 (invalid version), 42203
(invalid compatibility level), 42208 (invalid subject name), 409 (incompatible
schema), 50001 (store error); and 400 (malformed JSON), 413 (body over the limit), 415
(not JSON).
"""

# No `from __future__ import annotations`: FastAPI resolves handler annotations at
# run time, and inside Serve's ingress wrapper postponed ones are not found.
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import fastavro
import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.exceptions import StoreUnavailable
from adapters.schema_registry import GLOBAL, Incompatible, SchemaRegistryStore, SubjectVersion
from adapters.sources import SourceCatalog
from core.avro import AvroError, fingerprint
from core.avro_compat import LEVELS, compatible
from core.exceptions import ConfigurationError
from core.subject_scope import Access, access, candidate_sources, subject_problem
from serve_apps.auth import ALL_TENANTS, ApiKeys, AuthFailed, presented_key
from serve_apps.http import BodyTooLarge, read_body

MEDIA_TYPE = "application/vnd.schemaregistry.v1+json"
_ACCEPTED_TYPES = (
    "application/vnd.schemaregistry.v1+json",
    "application/vnd.schemaregistry+json",
    "application/json",
    "application/octet-stream",
)
_MAX_VERSION = 2**31 - 1
REALM = "rayline-registry"
"""The basic-auth realm named in ``WWW-Authenticate`` on every 401."""
_MAX_CREDENTIALS_CHARS = 1024


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """What a registry replica needs.

    Attributes:
        dsn: PostgreSQL DSN of Rayline's database (migrated: tables of migrations 2, 3).
        default_compatibility: the level used when neither the subject nor the global
            configuration sets one.
        default_source: the source of ``POST /v1/events`` events that name none
            (``serve.default_source``); it carries every tenant's events, so its
            subjects are the platform's whatever the source catalog says.
        max_body_bytes: the largest request body; larger ones get 413.
        pool_max_size: PostgreSQL connections per replica.
    """

    dsn: str
    default_compatibility: str = "BACKWARD"
    default_source: str = "api"
    max_body_bytes: int = 1 << 20
    pool_max_size: int = 4


class RegistryJSONResponse(JSONResponse):
    """JSON in the registry's content type, written by orjson."""

    media_type = MEDIA_TYPE

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class RegistryError(Exception):
    """An answer in Confluent's error shape."""

    def __init__(
        self, status: int, error_code: int, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.headers = headers


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A schema from a request body: its text, JSON value and fingerprint."""

    text: str
    value: Any
    fingerprint: str


@dataclass(frozen=True, slots=True)
class _Caller:
    """Who a request comes from: the tenant of its key (``*``: the platform)."""

    tenant: str

    @property
    def platform(self) -> bool:
        return self.tenant == ALL_TENANTS


class _Registry:
    """The app's state: the store, the API keys and the configuration."""

    def __init__(
        self, config: RegistryConfig, store: SchemaRegistryStore, catalog: SourceCatalog
    ) -> None:
        self.config = config
        self.store = store
        self.catalog = catalog
        self.keys = ApiKeys(config.dsn, catalog)

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
    registry = _Registry(
        config,
        SchemaRegistryStore(config.dsn, max_size=config.pool_max_size),
        SourceCatalog(config.dsn, max_size=2),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await registry.store.close()
        await registry.catalog.close()

    app = FastAPI(
        title="Rayline schema registry",
        description="The Confluent Schema Registry REST API (Avro), stored in PostgreSQL.",
        default_response_class=RegistryJSONResponse,
        lifespan=lifespan,
        # No redirect from `/subjects/a%2F` to `/subjects/a`: that is another subject.
        redirect_slashes=False,
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


def _error(
    status: int, error_code: int, message: str, headers: dict[str, str] | None = None
) -> RegistryJSONResponse:
    return RegistryJSONResponse({"error_code": error_code, "message": message}, status, headers)


async def _registry_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RegistryError)
    return _error(exc.status, exc.error_code, exc.message, exc.headers)


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


# ----------------------------------------------------------------------- who may do what

_HOW_TO_AUTHENTICATE = (
    "send your Rayline API key as HTTP basic auth `<tenant>:<key>` (Confluent clients: "
    '"basic.auth.user.info"), as `Authorization: Bearer <key>` or as `X-API-Key`; '
    "`rayline keys add <tenant>` makes one"
)


def _unauthorized(message: str) -> RegistryError:
    challenge = {"WWW-Authenticate": f'Basic realm="{REALM}"'}
    return RegistryError(401, 40101, message, challenge)


def _forbidden(message: str) -> RegistryError:
    return RegistryError(403, 40301, message)


def _credentials(request: Request) -> tuple[str | None, str | None]:
    """(the basic-auth user, or None without basic auth; the key, or None)."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() == "basic":
            return _basic(value.strip())
    return None, presented_key(request)


def _basic(value: str) -> tuple[str, str]:
    if len(value) > _MAX_CREDENTIALS_CHARS:
        raise _unauthorized(
            f"basic credentials of {len(value)} characters are not a Rayline key "
            f"(at most {_MAX_CREDENTIALS_CHARS}); {_HOW_TO_AUTHENTICATE}"
        )
    try:
        user, colon, key = base64.b64decode(value, validate=True).decode().partition(":")
    except ValueError:  # not base64, or not UTF-8 underneath
        raise _unauthorized(
            f"malformed basic credentials: expected base64 of `<tenant>:<key>`; "
            f"{_HOW_TO_AUTHENTICATE}"
        ) from None
    if not colon or not key:
        raise _unauthorized(
            "the basic credentials carry no key: the user part is the tenant (or empty), "
            f"the password part the key; {_HOW_TO_AUTHENTICATE}"
        )
    return user, key


async def _authenticate(request: Request) -> None:
    """Every route's first step: the caller's tenant from its key, or 401/403."""
    user, key = _credentials(request)
    if key is None:
        raise _unauthorized(f"no API key: {_HOW_TO_AUTHENTICATE}")
    try:
        tenant = await _registry(request).keys.tenant_of_key(key)
    except AuthFailed as exc:
        if exc.status == 401:
            raise _unauthorized(f"{exc}; {_HOW_TO_AUTHENTICATE}") from None
        raise _forbidden(str(exc)) from None
    # The user part is not a credential; a wrong one means a client set up for another
    # tenant than its key's, which is better said now than found out from a 403 later.
    if user and user != tenant:
        raise _unauthorized(
            f"the basic-auth user {user[:64]!r} is not the tenant of this key: send "
            f"`{tenant}:<key>`, or an empty user (`:<key>`)"
        )
    request.state.caller = _Caller(tenant)


def _caller(request: Request) -> _Caller:
    caller = request.state.caller
    assert isinstance(caller, _Caller)
    return caller


def _check_subject(subject: str) -> None:
    problem = subject_problem(subject)
    if problem is not None:
        raise RegistryError(422, 42208, f"Invalid subject {subject[:64]!r}: {problem}")


async def _allow(request: Request, subject: str, needed: Access) -> None:
    """Go on when the caller may read (or write) ``subject``; else 403."""
    _check_subject(subject)
    caller = _caller(request)
    if caller.platform:
        return
    if await _access(request, caller, subject) >= needed:
        return
    if needed == Access.WRITE:
        raise _forbidden(
            f"tenant {caller.tenant!r} may not write subject '{subject}': a tenant key "
            "writes `<source>.<type>` subjects of its own sources only; the subjects of "
            f"shared sources (such as the default source "
            f"'{_registry(request).config.default_source}'), of other tenants' sources "
            "and of no source are the platform's"
        )
    raise _forbidden(
        f"tenant {caller.tenant!r} may not read subject '{subject}': a tenant key reads "
        "`<source>.<type>` subjects of its own sources and of shared sources only"
    )


async def _access(request: Request, caller: _Caller, subject: str) -> Access:
    registry = _registry(request)
    owners = await registry.store.source_owners(candidate_sources(subject))
    return access(subject, caller.tenant, owners, (registry.config.default_source,))


async def _readable(request: Request, subjects: list[str]) -> list[str]:
    """The ``subjects`` the caller may read, in their order."""
    caller = _caller(request)
    if caller.platform:
        return subjects
    registry = _registry(request)
    names = sorted({source for s in subjects for source in candidate_sources(s)})
    owners = await registry.store.source_owners(names)
    shared = (registry.config.default_source,)
    return [s for s in subjects if access(s, caller.tenant, owners, shared) >= Access.READ]


def _platform_only(request: Request, what: str) -> None:
    caller = _caller(request)
    if not caller.platform:
        raise _forbidden(
            f"{what} takes the platform key ('*'), not a key of tenant {caller.tenant!r}: "
            "deletions and compatibility levels are the platform's to change"
        )


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


def _number(text: str) -> int | None:
    """``text`` as a non-negative number of at most 10 ASCII digits, else None
    (``str.isdigit`` also passes digits such as ``²`` that ``int`` refuses)."""
    return int(text) if len(text) <= 10 and text.isascii() and text.isdigit() else None


def _version(text: str) -> int | None:
    """A version in a path: a number from 1, or ``latest`` / ``-1`` (None)."""
    if text in ("latest", "-1"):
        return None
    number = _number(text)
    if number is not None and 1 <= number <= _MAX_VERSION:
        return number
    raise RegistryError(
        422,
        42202,
        f"The specified version {text!r} is not a valid version id. Allowed values are "
        f'between [1, {_MAX_VERSION}] and the string "latest"',
    )


def _schema_id(text: str) -> int:
    number = _number(text)
    if number is not None and number <= 2**31 - 1:
        return number
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
        try:
            return compatible(level, candidate.value, [orjson.loads(t) for t in texts])
        except RecursionError:
            raise RegistryError(
                422, 42201, "Invalid schema: nested too deeply to check its compatibility"
            ) from None

    return check


# ------------------------------------------------------------------------------- routes

# Every route needs a key: nothing can be added here that skips it.
_router = APIRouter(dependencies=[Depends(_authenticate)])


@_router.get("/")
async def root() -> Any:
    return {}


@_router.get("/subjects")
async def list_subjects(request: Request) -> Any:
    return await _readable(request, await _registry(request).store.subjects())


@_router.get("/subjects/{subject}/versions")
async def list_versions(request: Request, subject: str) -> Any:
    await _allow(request, subject, Access.READ)
    versions = await _registry(request).store.versions(subject)
    if not versions:
        raise _subject_not_found(subject)
    return versions


@_router.post("/subjects/{subject}/versions")
async def register(request: Request, subject: str) -> Any:
    await _allow(request, subject, Access.WRITE)
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
    await _allow(request, subject, Access.READ)
    registry = _registry(request)
    candidate = _candidate(await _json_body(request, registry.config.max_body_bytes))
    found = await registry.store.lookup(subject, candidate.fingerprint)
    return _as_json(await _found(registry, subject, found, "schema"))


@_router.delete("/subjects/{subject}")
async def delete_subject(request: Request, subject: str) -> Any:
    _platform_only(request, "deleting a subject")
    _check_subject(subject)
    deleted = await _registry(request).store.delete_subject(subject)
    if not deleted:
        raise _subject_not_found(subject)
    return deleted


@_router.get("/subjects/{subject}/versions/{version}")
async def get_version(request: Request, subject: str, version: str) -> Any:
    await _allow(request, subject, Access.READ)
    registry = _registry(request)
    found = await registry.store.version(subject, _version(version))
    return _as_json(await _found(registry, subject, found, "version"))


@_router.get("/subjects/{subject}/versions/{version}/schema")
async def get_version_schema(request: Request, subject: str, version: str) -> Any:
    await _allow(request, subject, Access.READ)
    registry = _registry(request)
    found = await registry.store.version(subject, _version(version))
    sv: SubjectVersion = await _found(registry, subject, found, "version")
    return Response(sv.schema, media_type=MEDIA_TYPE)


@_router.delete("/subjects/{subject}/versions/{version}")
async def delete_version(request: Request, subject: str, version: str) -> Any:
    _platform_only(request, "deleting a version")
    _check_subject(subject)
    registry = _registry(request)
    deleted = await registry.store.delete_version(subject, _version(version))
    return await _found(registry, subject, deleted, "version")


@_router.get("/schemas/types")
async def schema_types() -> Any:
    return ["AVRO"]


@_router.get("/schemas/ids/{schema_id}")
async def get_schema(request: Request, schema_id: str) -> Any:
    text, _ = await _visible_schema(request, schema_id)
    return {"schema": text}


@_router.get("/schemas/ids/{schema_id}/schema")
async def get_raw_schema(request: Request, schema_id: str) -> Any:
    text, _ = await _visible_schema(request, schema_id)
    return Response(text, media_type=MEDIA_TYPE)


@_router.get("/schemas/ids/{schema_id}/versions")
async def get_schema_versions(request: Request, schema_id: str) -> Any:
    _, pairs = await _visible_schema(request, schema_id)
    return [{"subject": s, "version": v} for s, v in pairs]


@_router.get("/schemas/ids/{schema_id}/subjects")
async def get_schema_subjects(request: Request, schema_id: str) -> Any:
    _, pairs = await _visible_schema(request, schema_id)
    return sorted({s for s, _ in pairs})


async def _visible_schema(request: Request, schema_id: str) -> tuple[str, list[tuple[str, int]]]:
    """The schema's text and the (subject, version) pairs holding it that the caller
    may read. A tenant key sees a schema only through a subject it may read; to it,
    any other id does not exist (a 404, as for an id never given out)."""
    store = _registry(request).store
    number = _schema_id(schema_id)
    text = await store.schema(number)
    pairs = [] if text is None else await store.schema_versions(number)
    if text is not None and not _caller(request).platform:
        readable = set(await _readable(request, sorted({s for s, _ in pairs})))
        pairs = [(s, v) for s, v in pairs if s in readable]
        text = text if pairs else None
    if text is None:
        raise RegistryError(404, 40403, f"Schema {schema_id} not found.")
    return text, pairs


# ------------------------------------------------------------------------ configuration


@_router.get("/config")
async def get_global_config(request: Request) -> Any:
    registry = _registry(request)
    level = await registry.store.level(GLOBAL)
    return {"compatibilityLevel": level or registry.config.default_compatibility}


@_router.put("/config")
async def put_global_config(request: Request) -> Any:
    _platform_only(request, "setting the global compatibility level")
    return await _put_level(request, GLOBAL)


@_router.delete("/config")
async def delete_global_config(request: Request) -> Any:
    _platform_only(request, "removing the global compatibility level")
    registry = _registry(request)
    previous = await registry.store.delete_level(GLOBAL)
    return {"compatibilityLevel": previous or registry.config.default_compatibility}


@_router.get("/config/{subject}")
async def get_subject_config(
    request: Request,
    subject: str,
    default_to_global: bool = Query(False, alias="defaultToGlobal"),
) -> Any:
    await _allow(request, subject, Access.READ)
    registry = _registry(request)
    level = await registry.store.level(subject)
    if level is None and default_to_global:
        level = await registry.level(subject)
    if level is None:
        raise _no_subject_level(subject)
    return {"compatibilityLevel": level}


@_router.put("/config/{subject}")
async def put_subject_config(request: Request, subject: str) -> Any:
    _platform_only(request, "setting a subject's compatibility level")
    _check_subject(subject)
    return await _put_level(request, subject)


@_router.delete("/config/{subject}")
async def delete_subject_config(request: Request, subject: str) -> Any:
    _platform_only(request, "removing a subject's compatibility level")
    _check_subject(subject)
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
    await _allow(request, subject, Access.READ)
    registry = _registry(request)
    candidate = _candidate(await _json_body(request, registry.config.max_body_bytes))
    found = await registry.store.version(subject, _version(version))
    target: SubjectVersion = await _found(registry, subject, found, "version")
    level = await registry.level(subject)
    problems = _checker(candidate)(level, [target.schema])
    return _verdict(problems, verbose)


@_router.post("/compatibility/subjects/{subject}/versions")
async def compatibility_with_subject(request: Request, subject: str, verbose: bool = False) -> Any:
    await _allow(request, subject, Access.READ)
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
