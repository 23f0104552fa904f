"""Alerting Serve app, mounted at ``/v1/alerts``: rules, incidents, silences.

* ``GET/POST /rules``, ``GET/PUT/DELETE /rules/{id}``: alert rules (docs/alerting.md);
  a bad spec answers 422 naming the field.
* ``GET /incidents?state=``, ``GET /incidents/{id}`` (with its notification log),
  ``POST /incidents/{id}/acknowledge``.
* ``GET/POST /silences``, ``DELETE /silences/{id}``.

The tenant is the API key's; a key sees and changes only its tenant's rules, incidents
and silences (others' answer 404). The platform key (``'*'``) sees every tenant, and
names one with ``?tenant=`` where a change needs it.

Acknowledging marks the incident acknowledged at once and queues a request that the
alerting engine picks up on its next poll: it acknowledges the incident in its book and
sends PagerDuty's ``acknowledge`` event and a Slack message. So the API never talks to
a channel, and a channel outage never fails an acknowledge.

Errors have one shape: ``{"error": "...", "errors": [{"field": ..., "message": ...}]}``.
"""

# No `from __future__ import annotations`: FastAPI resolves handler annotations at
# run time, and inside Serve's ingress wrapper postponed ones are not found.
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from adapters.alert_store import AlertCatalog
from adapters.exceptions import StoreUnavailable
from adapters.sources import SourceCatalog
from core.alert_rules import AlertRule
from core.cep_alerts import parse_rule_spec
from core.exceptions import ConfigurationError
from core.incidents import Silence
from serve_apps.auth import ApiKeys, AuthFailed

ROUTE_PREFIX = "/v1/alerts"
SEALED_WINDOW = "1m"
_FIELD = re.compile(r"field '([^']+)'")


@dataclass(frozen=True, slots=True)
class AlertsApiConfig:
    """What an alerting API replica needs.

    Attributes:
        dsn: PostgreSQL DSN of Rayline's database (migrated).
        pool_max_size: PostgreSQL connections per replica.
    """

    dsn: str
    pool_max_size: int = 4


class ApiError(Exception):
    """An answer in the app's error shape."""

    def __init__(self, status: int, message: str, errors: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors


class SilenceIn(BaseModel):
    """A new silence: mutes new incidents of the tenant that match, between two times."""

    model_config = ConfigDict(extra="forbid")
    rule_id: str | None = Field(None, description="Only this rule's incidents; all if absent.")
    group_key: str | None = Field(None, description="Only this group; all if absent.")
    starts_at: datetime | None = Field(None, description="Start (RFC 3339); now if absent.")
    ends_at: datetime | None = Field(None, description="End (RFC 3339), exclusive.")
    duration_minutes: int | None = Field(
        None, ge=1, le=527_040, description="Length instead of ends_at."
    )
    comment: str = Field("", max_length=1000, description="Why, for the next on-call.")


class AcknowledgeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    by: str | None = Field(None, max_length=200, description="Who; the tenant if absent.")


class _App:
    """The app's state: the stores."""

    def __init__(self, catalog: AlertCatalog, tenants: SourceCatalog) -> None:
        self.catalog = catalog
        self.tenants = tenants
        self.keys = ApiKeys("", tenants)

    async def close(self) -> None:
        await self.catalog.close()
        await self.tenants.close()


def create_app(config: AlertsApiConfig) -> FastAPI:
    """The alerting FastAPI app, as each Serve replica (and the tests) build it."""
    state = _App(
        AlertCatalog(config.dsn, max_size=config.pool_max_size),
        SourceCatalog(config.dsn, max_size=2),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await state.close()

    app = FastAPI(
        title="Rayline alerting API",
        description="Alert rules, incidents and silences of the key's tenant.",
        lifespan=lifespan,
    )
    app.state.alerting = state
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(AuthFailed, _auth_error)
    app.add_exception_handler(StoreUnavailable, _store_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.include_router(_router)
    return app


@serve.deployment
@serve.ingress()
class AlertsAPI:
    """The alerting API as a Serve deployment; each replica builds :func:`create_app`."""

    def __init__(self, config: AlertsApiConfig) -> None:
        self._config = config

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self._config)


def _error(status: int, message: str, errors: list[dict[str, str]] | None = None) -> JSONResponse:
    content: dict[str, Any] = {"error": message}
    if errors is not None:
        content["errors"] = errors
    return JSONResponse(content, status_code=status)


async def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error(exc.status, exc.message, exc.errors)


async def _auth_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AuthFailed)
    return _error(exc.status, str(exc))


async def _store_error(_request: Request, exc: Exception) -> Response:
    response = _error(503, f"the alerting store is unavailable: {exc}; retry later")
    response.headers["Retry-After"] = "5"
    return response


async def _validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": ".".join(str(p) for p in e.get("loc", ())[1:]) or "body", "message": e["msg"]}
        for e in exc.errors()
    ]
    return _error(422, "invalid request", errors)


def _state(request: Request) -> _App:
    state = request.app.state.alerting
    assert isinstance(state, _App)
    return state


async def _scope(request: Request, tenant: str | None) -> str | None:
    """The tenant the request acts for; None: every tenant (platform key, no ?tenant=)."""
    return await _state(request).keys.acting_tenant(request, tenant)


def _one_tenant(scope: str | None) -> str:
    if scope is None:
        raise ApiError(
            422,
            "the platform key must name the tenant",
            [{"field": "tenant", "message": "add ?tenant=<tenant>"}],
        )
    return scope


def _not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, f"no {what} {ident!r} for this key's tenant")


_TENANT_QUERY = Query(None, description="Platform key only: the tenant to act for.")
_RULE_BODY = Body(..., description="The rule spec (docs/alerting.md); `enabled` optional.")


async def _refuse_nul(request: Request) -> None:
    """A NUL anywhere in the path, the query or the body is a 422: PostgreSQL, where
    rules, incidents and silences live, refuses it (text and jsonb alike), which
    would otherwise surface as a 503 that no retry can fix."""
    where = None
    if any("\x00" in str(v) for v in request.path_params.values()):
        where = "path"
    elif "%00" in request.url.query or "\x00" in request.url.query:
        where = "query"
    else:
        body = await request.body()  # cached: the handler reads it again
        if b"\x00" in body or b"\\u0000" in body:
            where = "body"
    if where is not None:
        raise ApiError(
            422,
            "invalid request",
            [{"field": where, "message": "contains a NUL character, which cannot be stored"}],
        )


_router = APIRouter(dependencies=[Depends(_refuse_nul)])


# -------------------------------------------------------------------------------- rules


def _checked_spec(spec: dict[str, Any], tenant: str, rule_id: str | None) -> tuple[Any, bool]:
    """(normalised spec, enabled) of a request body, or a 422 naming the field."""
    body = dict(spec)
    enabled = body.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise _spec_error("alert rule field 'enabled' must be true or false")
    if body.setdefault("tenant", tenant) != tenant:
        raise _spec_error(f"alert rule field 'tenant' must be {tenant!r} (the key's) or absent")
    if rule_id is not None and body.setdefault("id", rule_id) != rule_id:
        raise _spec_error(f"alert rule field 'id' must be {rule_id!r} (the URL's) or absent")
    try:
        rule = parse_rule_spec(body)
    except ConfigurationError as exc:
        raise _spec_error(str(exc)) from exc
    if isinstance(rule, AlertRule) and rule.window != SEALED_WINDOW:
        raise _spec_error(
            f"alert rule field 'window' must be {SEALED_WINDOW!r}: rules are evaluated on "
            f"sealed one-minute windows, not {rule.window!r}"
        )
    return rule, enabled


def _spec_error(message: str) -> ApiError:
    found = _FIELD.search(message)
    field = found.group(1) if found else "body"
    return ApiError(422, "invalid alert rule", [{"field": field, "message": message}])


@_router.get("/rules", summary="List alert rules")
async def list_rules(request: Request, tenant: str | None = _TENANT_QUERY) -> Any:
    scope = await _scope(request, tenant)
    return {"rules": await _state(request).catalog.rules(scope)}


@_router.post("/rules", status_code=201, summary="Create an alert rule")
async def create_rule(
    request: Request,
    spec: dict[str, Any] = _RULE_BODY,
    tenant: str | None = _TENANT_QUERY,
) -> Any:
    scope = await _scope(request, tenant)
    if scope is None and isinstance(spec.get("tenant"), str):
        scope = spec["tenant"]  # the platform key may name the tenant in the spec
    target = _one_tenant(scope)
    rule, enabled = _checked_spec(spec, target, None)
    made = await _state(request).catalog.put_rule(
        target, rule.id, rule.to_spec(), enabled, create=True
    )
    if made is None:
        raise ApiError(409, f"rule {rule.id!r} exists; change it with PUT /rules/{rule.id}")
    return made


@_router.get("/rules/{rule_id}", summary="Read an alert rule")
async def get_rule(request: Request, rule_id: str, tenant: str | None = _TENANT_QUERY) -> Any:
    target = _one_tenant(await _scope(request, tenant))
    found = await _state(request).catalog.rule(target, rule_id)
    if found is None:
        raise _not_found("rule", rule_id)
    return found


@_router.put("/rules/{rule_id}", summary="Replace an alert rule")
async def put_rule(
    request: Request,
    rule_id: str,
    spec: dict[str, Any] = _RULE_BODY,
    tenant: str | None = _TENANT_QUERY,
) -> Any:
    target = _one_tenant(await _scope(request, tenant))
    rule, enabled = _checked_spec(spec, target, rule_id)
    changed = await _state(request).catalog.put_rule(
        target, rule_id, rule.to_spec(), enabled, create=False
    )
    if changed is None:
        raise _not_found("rule", rule_id)
    return changed


@_router.delete(
    "/rules/{rule_id}", status_code=204, response_class=Response, summary="Delete an alert rule"
)
async def delete_rule(
    request: Request, rule_id: str, tenant: str | None = _TENANT_QUERY
) -> Response:
    target = _one_tenant(await _scope(request, tenant))
    if not await _state(request).catalog.delete_rule(target, rule_id):
        raise _not_found("rule", rule_id)
    return Response(status_code=204)


# ---------------------------------------------------------------------------- incidents


@_router.get("/incidents", summary="List incidents, newest first")
async def list_incidents(
    request: Request,
    state: Literal["firing", "acknowledged", "resolved"] | None = Query(None),
    limit: int = Query(100, ge=1, le=1000),
    tenant: str | None = _TENANT_QUERY,
) -> Any:
    scope = await _scope(request, tenant)
    return {"incidents": await _state(request).catalog.incidents(scope, state, limit)}


@_router.get("/incidents/{incident_id}", summary="Read an incident and its notification log")
async def get_incident(
    request: Request, incident_id: str, tenant: str | None = _TENANT_QUERY
) -> Any:
    scope = await _scope(request, tenant)
    catalog = _state(request).catalog
    found = await catalog.incident(scope, incident_id)
    if found is None:
        raise _not_found("incident", incident_id)
    return {**found, "notifications": await catalog.notification_log(incident_id)}


@_router.post(
    "/incidents/{incident_id}/acknowledge",
    status_code=202,
    summary="Acknowledge an incident (the channels are told on the engine's next poll)",
)
async def acknowledge(
    request: Request,
    incident_id: str,
    body: AcknowledgeIn | None = None,
    tenant: str | None = _TENANT_QUERY,
) -> Any:
    scope = await _scope(request, tenant)
    catalog = _state(request).catalog
    found = await catalog.incident(scope, incident_id)
    if found is None:
        raise _not_found("incident", incident_id)
    if found["state"] == "resolved":
        raise ApiError(409, f"incident {incident_id!r} is resolved; nothing to acknowledge")
    by = (body.by if body is not None else None) or found["tenant"]
    if found["state"] == "firing":
        await catalog.request_acknowledge(incident_id, found["tenant"], by)
    return await catalog.incident(scope, incident_id)


# ----------------------------------------------------------------------------- silences


@_router.get("/silences", summary="List silences that have not ended")
async def list_silences(request: Request, tenant: str | None = _TENANT_QUERY) -> Any:
    scope = await _scope(request, tenant)
    return {"silences": await _state(request).catalog.silences(scope)}


@_router.post("/silences", status_code=201, summary="Create a silence")
async def create_silence(
    request: Request, body: SilenceIn, tenant: str | None = _TENANT_QUERY
) -> Any:
    target = _one_tenant(await _scope(request, tenant))
    starts = _ms(body.starts_at) if body.starts_at else int(time.time() * 1000)
    if body.ends_at is not None and body.duration_minutes is None:
        ends = _ms(body.ends_at)
    elif body.duration_minutes is not None and body.ends_at is None:
        ends = starts + body.duration_minutes * 60_000
    else:
        raise ApiError(
            422,
            "invalid silence",
            [{"field": "ends_at", "message": "give exactly one of ends_at, duration_minutes"}],
        )
    try:
        silence = Silence(target, starts, ends, body.rule_id, body.group_key, body.comment)
    except ConfigurationError as exc:
        raise ApiError(422, "invalid silence", [{"field": "ends_at", "message": str(exc)}]) from exc
    return await _state(request).catalog.add_silence(uuid.uuid4().hex, silence, target)


@_router.delete(
    "/silences/{silence_id}", status_code=204, response_class=Response, summary="Delete a silence"
)
async def delete_silence(
    request: Request, silence_id: str, tenant: str | None = _TENANT_QUERY
) -> Response:
    scope = await _scope(request, tenant)
    if not await _state(request).catalog.delete_silence(scope, silence_id):
        raise _not_found("silence", silence_id)
    return Response(status_code=204)


def _ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ApiError(
            422,
            "invalid silence",
            [{"field": "starts_at/ends_at", "message": "give a time zone, e.g. 2025-01-01T09:00Z"}],
        )
    return int(moment.timestamp() * 1000)
