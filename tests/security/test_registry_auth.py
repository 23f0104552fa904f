"""Attacks on the schema registry (the deployed Serve app at ``/registry``).

Before: no key was asked for. Anyone could list, read, register and delete schemas
and change compatibility levels, and a tenant that registered ``api.<type>`` (the
default source every tenant's ``POST /v1/events`` events carry) made every other
tenant's events of that type fail. Now every request needs a key, a tenant key reads
and writes only its own sources' subjects (and reads shared ones), deletions and
compatibility changes take the platform key, and hostile input gets a 4xx.

Two tenants, alice and bob, each own a source of their own; alice has one schema
registered. Every subject these tests write is under those sources or a uuid prefix,
and is removed at the end.
"""

from __future__ import annotations

import base64
import functools
import json
import string
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from adapters.sources import Source, SourceCatalog
from cluster.settings import Settings
from core.avro import subject_for
from core.avro_compat import LEVELS
from serve_apps.registry import MEDIA_TYPE
from tests.integration.conftest import api_key, catalog_call, eventually, pg

CHALLENGE = 'Basic realm="rayline-registry"'
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FUZZ_PREFIX = f"fz-{uuid.uuid4().hex[:8]}-"
"""The platform key's fuzzed subjects start with this: it may write anywhere."""


@dataclass(frozen=True)
class Party:
    """A tenant with a key and a source of its own."""

    tenant: str
    key: str
    source: str

    def subject(self, type_: str) -> str:
        return subject_for(self.source, type_)

    @property
    def bearer(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"}

    @property
    def basic(self) -> dict[str, str]:
        token = base64.b64encode(f"{self.tenant}:{self.key}".encode()).decode()
        return {"authorization": f"Basic {token}"}


def _party(settings: Settings) -> Party:
    tenant = f"t-{uuid.uuid4().hex[:12]}"
    source = Source(name=f"src-{uuid.uuid4().hex[:10]}", kind="api", tenant=tenant)
    catalog_call(settings, lambda c: c.add_source(source))
    return Party(tenant, api_key(settings, tenant, "registry attacks"), source.name)


def _record(name: str, *fields: dict[str, Any]) -> str:
    namespace = f"attack.n{uuid.uuid4().hex}"  # a schema new to the whole registry
    return json.dumps({"type": "record", "name": name, "namespace": namespace, "fields": fields})


def _event_schema(*extra: dict[str, Any]) -> str:
    return _record(
        "Ev",
        {"name": "event_id", "type": "string"},
        {"name": "tenant", "type": "string"},
        {"name": "source", "type": "string"},
        {"name": "type", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "value", "type": "double"},
        *extra,
    )


@pytest.fixture(scope="module")
def registry_url(stack: Settings) -> str:
    return f"http://{stack.serve.host}:{stack.serve.port}/registry"


@pytest.fixture(scope="module")
def registry(registry_url: str) -> Iterator[httpx.Client]:
    """A client that sends no key unless a test gives one."""
    with httpx.Client(base_url=registry_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def platform(platform_key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {platform_key}"}


@pytest.fixture(scope="module")
def alice(stack: Settings) -> Party:
    return _party(stack)


@pytest.fixture(scope="module")
def bob(stack: Settings) -> Party:
    return _party(stack)


@pytest.fixture(scope="module", autouse=True)
def cleanup(stack: Settings, alice: Party, bob: Party) -> Iterator[None]:
    yield
    for prefix in (f"{alice.source}.", f"{bob.source}.", FUZZ_PREFIX):
        pg(stack, "DELETE FROM subject_versions WHERE starts_with(subject, $1)", prefix)
        pg(stack, "DELETE FROM subject_config WHERE starts_with(subject, $1)", prefix)
    for name in (alice.source, bob.source):
        catalog_call(stack, functools.partial(SourceCatalog.remove_source, name=name))


@pytest.fixture(scope="module")
def orders(registry: httpx.Client, alice: Party) -> tuple[str, int]:
    """Alice's subject with one version: (subject, schema id)."""
    subject = alice.subject("orders")
    answer = registry.post(
        f"/subjects/{subject}/versions",
        json={"schema": _record("Order", {"name": "id", "type": "string"})},
        headers=alice.basic,
    )
    assert answer.status_code == 200, answer.text
    return subject, int(answer.json()["id"])


def _refused(answer: httpx.Response, status: int, code: int, says: str = "") -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == MEDIA_TYPE
    body = answer.json()
    assert body["error_code"] == code, body
    assert says in body["message"], body


def _versions(registry: httpx.Client, platform: dict[str, str], subject: str) -> Any:
    answer = registry.get(f"/subjects/{subject}/versions", headers=platform)
    return answer.json() if answer.status_code == 200 else answer.status_code


# ----------------------------------------------------------------- no key, a bad key


def _attempts(subject: str, schema_id: int) -> list[tuple[str, str, Any]]:
    """Every kind of request, reads and writes, on ``subject``."""
    new = {
        "schema": _record(
            "Order", {"name": "id", "type": "string"}, {"name": "n", "type": "int", "default": 0}
        )
    }
    return [
        ("GET", "/", None),
        ("GET", "/subjects", None),
        ("GET", f"/subjects/{subject}/versions", None),
        ("GET", f"/subjects/{subject}/versions/latest", None),
        ("GET", f"/subjects/{subject}/versions/1/schema", None),
        ("POST", f"/subjects/{subject}/versions", new),
        ("POST", f"/subjects/{subject}", new),
        ("DELETE", f"/subjects/{subject}", None),
        ("DELETE", f"/subjects/{subject}?permanent=true", None),
        ("DELETE", f"/subjects/{subject}/versions/1", None),
        ("GET", f"/schemas/ids/{schema_id}", None),
        ("GET", f"/schemas/ids/{schema_id}/subjects", None),
        ("GET", "/schemas/types", None),
        ("GET", "/config", None),
        ("PUT", "/config", {"compatibility": "NONE"}),
        ("DELETE", "/config", None),
        ("GET", f"/config/{subject}", None),
        ("PUT", f"/config/{subject}", {"compatibility": "NONE"}),
        ("DELETE", f"/config/{subject}", None),
        ("POST", f"/compatibility/subjects/{subject}/versions/latest", new),
    ]


def test_anonymous_requests_are_refused_with_a_basic_challenge(
    registry: httpx.Client, platform: dict[str, str], orders: tuple[str, int]
) -> None:
    subject, schema_id = orders
    global_level = registry.get("/config", headers=platform).json()
    for method, path, body in _attempts(subject, schema_id):
        answer = registry.request(method, path, json=body)
        _refused(answer, 401, 40101, "no API key")
        assert answer.headers["www-authenticate"] == CHALLENGE, (method, path)
        assert "basic.auth.user.info" in answer.json()["message"]
    # nothing was registered, deleted or reconfigured
    assert _versions(registry, platform, subject) == [1]
    assert registry.get(f"/config/{subject}", headers=platform).status_code == 404
    assert registry.get("/config", headers=platform).json() == global_level


def _basic(text: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(text.encode()).decode()}


@pytest.mark.parametrize(
    ("make_headers", "says"),
    [
        (lambda p: {"authorization": "Bearer rl_not-a-key"}, "unknown API key"),
        (lambda p: {"x-api-key": "rl_not-a-key"}, "unknown API key"),
        (lambda p: _basic(f"{p.tenant}:rl_not-a-key"), "unknown API key"),
        (lambda p: {"authorization": "Basic %%%not-base64"}, "malformed basic credentials"),
        (
            lambda p: {"authorization": "Basic " + base64.b64encode(b"\xff:\xfe").decode()},
            "malformed",
        ),
        (lambda p: _basic(p.key), "carry no key"),  # the key as the user, no password
        (lambda p: _basic(f"{p.tenant}:"), "carry no key"),
        (lambda p: _basic(f"someone-else:{p.key}"), "is not the tenant of this key"),
        (lambda p: {"authorization": "Basic " + "A" * 5000}, "not a Rayline key"),
        (lambda p: {"authorization": "Bearer " + "k" * 5000}, "too long"),
        (lambda p: {"authorization": "Digest username=x"}, "no API key"),
    ],
)
def test_bad_credentials_are_refused(
    registry: httpx.Client, alice: Party, orders: tuple[str, int], make_headers: Any, says: str
) -> None:
    subject, _ = orders
    answer = registry.get(f"/subjects/{subject}/versions", headers=make_headers(alice))
    _refused(answer, 401, 40101, says)
    assert answer.headers["www-authenticate"] == CHALLENGE


def test_a_revoked_key_is_refused(stack: Settings, registry: httpx.Client, alice: Party) -> None:
    key = api_key(stack, alice.tenant, "revoked at once")
    assert catalog_call(stack, lambda c: c.revoke_key(key))
    answer = registry.get("/subjects", headers={"authorization": f"Bearer {key}"})
    _refused(answer, 403, 40301, "revoked")


@pytest.mark.parametrize(
    "make_headers",
    [
        lambda p: p.basic,
        lambda p: _basic(f":{p.key}"),  # the user part may be left empty
        lambda p: p.bearer,
        lambda p: {"x-api-key": p.key},
    ],
    ids=["basic", "basic-without-user", "bearer", "x-api-key"],
)
def test_each_way_of_sending_the_key_works(
    registry: httpx.Client, alice: Party, orders: tuple[str, int], make_headers: Any
) -> None:
    subject, _ = orders
    answer = registry.get(f"/subjects/{subject}/versions", headers=make_headers(alice))
    assert answer.status_code == 200, answer.text
    assert answer.json() == [1]


# ------------------------------------------------------------------- tenant scope


def test_a_tenant_cannot_read_or_write_another_tenants_subjects(
    registry: httpx.Client,
    platform: dict[str, str],
    alice: Party,
    bob: Party,
    orders: tuple[str, int],
) -> None:
    subject, schema_id = orders
    for method, path, body in _attempts(subject, schema_id):
        if path in ("/", "/subjects", "/schemas/types", "/config") and method == "GET":
            continue  # not about one subject: below
        answer = registry.request(method, path, json=body, headers=bob.basic)
        assert answer.status_code in (403, 404), (method, path, answer.text)
        if answer.status_code == 403:
            assert answer.json()["error_code"] == 40301
        else:  # a schema id bob may not see does not exist for him
            assert path.startswith("/schemas/ids/"), (method, path)
            assert answer.json()["error_code"] == 40403
    assert subject not in registry.get("/subjects", headers=bob.basic).json()
    assert subject in registry.get("/subjects", headers=alice.basic).json()
    assert registry.get(f"/schemas/ids/{schema_id}", headers=alice.basic).status_code == 200
    # alice's subject is as it was
    assert _versions(registry, platform, subject) == [1]
    assert registry.get(f"/config/{subject}", headers=platform).status_code == 404


def test_a_tenant_cannot_claim_subjects_of_shared_unknown_or_foreign_sources(
    registry: httpx.Client, platform: dict[str, str], alice: Party, bob: Party
) -> None:
    schema = {"schema": _record("Squat", {"name": "id", "type": "string"})}
    unknown = f"nosuch-{uuid.uuid4().hex[:8]}"
    for subject, says in [
        (f"api.squat-{uuid.uuid4().hex[:8]}", "default source 'api'"),
        (f"{unknown}.checkout", "of no source"),  # a source someone may be given later
        (f"{unknown}-value", "of no source"),  # Confluent's TopicNameStrategy
        (bob.subject("checkout"), "other tenants' sources"),
    ]:
        answer = registry.post(f"/subjects/{subject}/versions", json=schema, headers=alice.basic)
        _refused(answer, 403, 40301, says)
        assert _versions(registry, platform, subject) == 404, subject


def test_deleting_and_compatibility_changes_take_the_platform_key(
    registry: httpx.Client, platform: dict[str, str], alice: Party, orders: tuple[str, int]
) -> None:
    subject, _ = orders
    global_level = registry.get("/config", headers=platform).json()
    for method, path, body in [
        ("DELETE", f"/subjects/{subject}", None),
        ("DELETE", f"/subjects/{subject}?permanent=true", None),
        ("DELETE", f"/subjects/{subject}/versions/1", None),
        ("DELETE", f"/subjects/{subject}/versions/latest?permanent=true", None),
        ("PUT", f"/config/{subject}", {"compatibility": "NONE"}),
        ("DELETE", f"/config/{subject}", None),
        ("PUT", "/config", {"compatibility": "NONE"}),
        ("DELETE", "/config", None),
    ]:
        answer = registry.request(method, path, json=body, headers=alice.basic)
        _refused(answer, 403, 40301, "takes the platform key")
    assert _versions(registry, platform, subject) == [1]
    assert registry.get(f"/config/{subject}", headers=platform).status_code == 404
    assert registry.get("/config", headers=platform).json() == global_level
    # ... which may: on a subject of its own
    doomed = alice.subject(f"doomed-{uuid.uuid4().hex[:6]}")
    schema = {"schema": _record("Doomed", {"name": "id", "type": "string"})}
    assert registry.post(
        f"/subjects/{doomed}/versions", json=schema, headers=alice.basic
    ).is_success
    put = registry.put(f"/config/{doomed}", json={"compatibility": "FULL"}, headers=platform)
    assert put.json() == {"compatibility": "FULL"}
    assert registry.delete(f"/subjects/{doomed}", headers=platform).json() == [1]
    assert _versions(registry, platform, doomed) == 404


def _events(party: Party, type_: str, ids: range) -> list[dict[str, Any]]:
    now = time.time()
    return [
        {"event_id": f"{type_}-{i}", "tenant": party.tenant, "type": type_, "ts": now, "value": 1}
        for i in ids
    ]


def test_poisoning_the_default_sources_subject_cannot_fail_another_tenants_events(
    http: httpx.Client, registry: httpx.Client, platform: dict[str, str], alice: Party, bob: Party
) -> None:
    """Alice tries to register, under the default source, a schema bob's events break;
    bob's events of that type are still accepted and counted. Then the platform
    registers the same schema, to show the attack would have worked."""
    type_ = f"purchase-{uuid.uuid4().hex[:8]}"
    subject = subject_for("api", type_)  # what the edge and the workers look up
    poison = {"schema": _event_schema({"name": "coupon", "type": "string"})}
    attempt = registry.post(f"/subjects/{subject}/versions", json=poison, headers=alice.basic)
    _refused(attempt, 403, 40301, "default source 'api'")
    assert _versions(registry, platform, subject) == 404

    sent = http.post("/v1/events", json=_events(bob, type_, range(3)), headers=bob.bearer)
    assert sent.status_code == 202, sent.text
    assert (sent.json()["accepted"], sent.json()["rejected"]) == (3, 0)
    window = {"from": time.time() - 3600, "to": time.time() + 3600}

    def count() -> Any:
        answer = http.get(f"/v1/query/latest/{type_}", params=window, headers=bob.bearer)
        assert answer.status_code == 200, answer.text
        return answer.json()["total"]["count"]

    assert eventually(count, lambda n: n == 3) == 3

    # The control: the same schema, registered by the platform, does fail bob's events.
    try:
        made = registry.post(f"/subjects/{subject}/versions", json=poison, headers=platform)
        assert made.status_code == 200, made.text

        def post_one() -> Any:
            answer = http.post(
                "/v1/events", json=_events(bob, type_, range(9, 10)), headers=bob.bearer
            )
            return answer.status_code, answer.json()

        _status, body = eventually(post_one, lambda r: r[0] == 422, timeout=30)
        assert "coupon" in body["errors"][0]["message"]
    finally:
        registry.delete(f"/subjects/{subject}", headers=platform)


# ------------------------------------------------------------- Confluent clients


def test_a_confluent_client_with_basic_auth_works_end_to_end(
    http: httpx.Client, registry_url: str, alice: Party
) -> None:
    type_ = f"checkout-{uuid.uuid4().hex[:8]}"
    subject = alice.subject(type_)
    schema = _event_schema()
    conf = {"url": registry_url, "basic.auth.user.info": f"{alice.tenant}:{alice.key}"}
    with SchemaRegistryClient(conf) as client:
        schema_id = client.register_schema(subject, Schema(schema, "AVRO"))
        assert client.get_latest_version(subject).schema_id == schema_id
        assert subject in client.get_subjects()
        with pytest.raises(SchemaRegistryError) as refused:
            client.set_compatibility(subject, "NONE")
        assert (refused.value.http_status_code, refused.value.error_code) == (403, 40301)
        serializer = AvroSerializer(
            client,
            schema,
            conf={
                "auto.register.schemas": False,
                "use.latest.version": True,
                "subject.name.strategy": lambda _ctx, _name: subject,
            },
        )
        context = SerializationContext("events.raw", MessageField.VALUE)
        ts_ms = int(time.time() * 1000)
        event: dict[str, Any] = {
            "event_id": "c-1",
            "tenant": alice.tenant,
            "source": alice.source,
            "type": type_,
            "ts": ts_ms,
            "value": 4.5,
        }
        body = serializer(event, context)
    assert body is not None
    # The credentials in the URL, as Confluent clients also take them
    host = registry_url.split("://", 1)[1]
    with SchemaRegistryClient({"url": f"http://{alice.tenant}:{alice.key}@{host}"}) as fresh:
        decoded = AvroDeserializer(fresh)(body, context)
    assert decoded == {**event, "ts": EPOCH + timedelta(milliseconds=ts_ms)}
    with SchemaRegistryClient({**conf, "basic.auth.user.info": f"{alice.tenant}:rl_wrong"}) as bad:
        with pytest.raises(SchemaRegistryError) as failed:
            bad.get_subjects()
        assert (failed.value.http_status_code, failed.value.error_code) == (401, 40101)

    sent = http.post(
        "/v1/events",
        content=body,
        headers={**alice.bearer, "content-type": "application/vnd.apache.avro+binary"},
    )
    assert sent.status_code == 202, sent.text
    window = {"from": time.time() - 3600, "to": time.time() + 3600}
    counted = eventually(
        lambda: http.get(f"/v1/query/latest/{type_}", params=window, headers=alice.bearer).json(),
        lambda m: m.get("total", {}).get("count") == 1,
    )
    assert counted["total"]["sum"] == 4.5


# ----------------------------------------------------------------- hostile input


def _deep(levels: int, leaf: str) -> str:
    """An array of arrays ... of ``leaf``: valid Avro, nested ``levels`` deep."""
    return '{"type": "array", "items": ' * levels + json.dumps(leaf) + "}" * levels


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"{" * 100_000, 400, 400),
        (b"[" * 2000 + b"]" * 2000, 400, 400),
        (json.dumps({"schema": "[" * 5000 + "]" * 5000}).encode(), 422, 42201),
        (json.dumps({"schema": "x" * (2 << 20)}).encode(), 413, 413),
        (b"\xff\xfe\x00garbage", 400, 400),
        (json.dumps({"schema": "\ud800"}).encode(), 400, 400),  # a lone surrogate
    ],
)
def test_hostile_bodies_are_refused_with_4xx(
    registry: httpx.Client, alice: Party, content: bytes, status: int, code: int
) -> None:
    subject = alice.subject("hostile")
    for sent in (content, iter([content])):  # with a Content-Length, then chunked
        answer = registry.post(
            f"/subjects/{subject}/versions",
            content=sent,
            headers={**alice.basic, "content-type": MEDIA_TYPE},
        )
        _refused(answer, status, code)


def test_deeply_nested_schemas_get_an_answer(registry: httpx.Client, alice: Party) -> None:
    """Nested as deep as JSON parsing allows, checked against each other: registered,
    or refused as invalid, never a crash."""
    subject = alice.subject(f"deep-{uuid.uuid4().hex[:6]}")
    unions = "[" * 900 + '"int"' + "]" * 900  # fastavro lets unions in unions pass
    for text in (_deep(900, "int"), _deep(900, "string"), _deep(900, "long"), unions):
        schema = {"schema": text}
        answer = registry.post(f"/subjects/{subject}/versions", json=schema, headers=alice.basic)
        assert answer.status_code in (200, 409, 422), answer.text
        answer = registry.post(
            f"/compatibility/subjects/{subject}/versions?verbose=true",
            json=schema,
            headers=alice.basic,
        )
        assert answer.status_code in (200, 422), answer.text


_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
_HOSTILE = st.sampled_from(
    [
        "..",
        "../config",
        "a/b",
        "a%2Fb",
        "\x00",
        "\u202e",
        "api.x",
        "-1",
        "latest",
        "²",
        "0",
        "9" * 40,
        "x" * 600,
        " ",
        "%",
        "?",
        "#",
        "*",
    ]
)
_SEGMENT = _TEXT | _HOSTILE
_TEMPLATES = [
    "/",
    "/subjects",
    "/subjects/{s}",
    "/subjects/{s}/versions",
    "/subjects/{s}/versions/{v}",
    "/subjects/{s}/versions/{v}/schema",
    "/schemas/ids/{v}",
    "/schemas/ids/{v}/schema",
    "/schemas/ids/{v}/versions",
    "/schemas/ids/{v}/subjects",
    "/schemas/types",
    "/config",
    "/config/{s}",
    "/compatibility/subjects/{s}/versions",
    "/compatibility/subjects/{s}/versions/{v}",
]
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)
_NAME = st.sampled_from(["A", "B", "ns.A", "bad name", ""])
_FIELD = st.sampled_from(["a", "b", "c", "1x"])
_AVRO = st.recursive(
    st.sampled_from(["null", "boolean", "int", "long", "float", "double", "bytes", "string"])
    | st.builds(
        lambda name, symbols: {"type": "enum", "name": name, "symbols": symbols},
        _NAME,
        st.lists(st.sampled_from(["X", "Y", "Z"]), max_size=3),
    )
    | st.builds(
        lambda name, size: {"type": "fixed", "name": name, "size": size}, _NAME, st.integers(-1, 9)
    )
    | st.sampled_from(
        [
            {"type": "long", "logicalType": "timestamp-millis"},
            {"type": "int", "logicalType": "date"},
            {"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": 2},
        ]
    ),
    lambda inner: (
        st.builds(lambda t: {"type": "array", "items": t}, inner)
        | st.builds(lambda t: {"type": "map", "values": t}, inner)
        | st.lists(inner, min_size=1, max_size=3)
        | st.builds(
            lambda name, fields: {"type": "record", "name": name, "fields": fields},
            _NAME,
            st.lists(
                st.fixed_dictionaries(
                    {"name": _FIELD, "type": inner},
                    optional={"default": _JSON, "aliases": st.lists(_FIELD, max_size=2)},
                ),
                max_size=3,
            ),
        )
    ),
    max_leaves=10,
)
_BODY = st.one_of(
    st.none(),
    st.binary(max_size=200),
    _JSON.map(lambda v: json.dumps(v).encode()),
    _AVRO.map(lambda t: json.dumps({"schema": json.dumps(t)}).encode()),
    st.fixed_dictionaries(
        {"schema": _TEXT | _AVRO.map(json.dumps)},
        optional={"schemaType": _JSON, "references": _JSON, "metadata": _JSON},
    ).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"compatibility": st.sampled_from(LEVELS) | _JSON}).map(
        lambda v: json.dumps(v).encode()
    ),
)
_PRINTABLE = st.text(st.sampled_from(string.printable[:95]), max_size=60)


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    template=st.sampled_from(_TEMPLATES),
    who=st.sampled_from(["platform", "tenant", "own", "nobody", "garbage"]),
    subject=_SEGMENT,
    version=_SEGMENT,
    body=_BODY,
    content_type=st.sampled_from([MEDIA_TYPE, "application/json", "text/plain", "", "a/b; x"]),
    params=st.dictionaries(
        st.sampled_from(["verbose", "defaultToGlobal", "permanent", "deleted"]), _TEXT, max_size=2
    ),
    garbage=_PRINTABLE.map(str.strip),
)
def test_hostile_requests_get_2xx_or_4xx_never_5xx(
    registry: httpx.Client,
    platform: dict[str, str],
    alice: Party,
    method: str,
    template: str,
    who: str,
    subject: str,
    version: str,
    body: bytes | None,
    content_type: str,
    params: dict[str, str],
    garbage: str,
) -> None:
    # The platform key may write anywhere: keep its subjects under this run's prefix,
    # and leave the global level alone. Tenant keys may aim anywhere.
    assume(not (who == "platform" and template == "/config" and method in ("PUT", "DELETE")))
    if who == "platform":
        subject = FUZZ_PREFIX + subject
    elif who == "own":
        subject = f"{alice.source}.{subject}"
    headers = {
        "platform": platform,
        "tenant": alice.basic,
        "own": alice.basic,
        "nobody": {},
        "garbage": {"authorization": garbage},
    }[who]
    path = template.format(s=quote(subject, safe=""), v=quote(version, safe=""))
    answer = registry.request(
        method,
        path,
        params=params,
        content=body,
        headers={**headers, "content-type": content_type} if content_type else headers,
    )
    assert 200 <= answer.status_code < 500, (method, path, answer.status_code, answer.text)
    if answer.status_code >= 400:
        shape = answer.json()
        assert set(shape) == {"error_code", "message"}, shape
        assert shape["message"], shape
        if answer.status_code == 401:
            assert answer.headers["www-authenticate"] == CHALLENGE


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    schemas=st.lists(_AVRO.map(json.dumps) | _TEXT, min_size=1, max_size=4),
    level=st.sampled_from(LEVELS),
)
def test_schemas_of_every_shape_get_2xx_or_4xx_never_5xx(
    registry: httpx.Client,
    platform: dict[str, str],
    alice: Party,
    schemas: list[str],
    level: str,
) -> None:
    """Valid and broken Avro, registered one after the other under a level, and
    checked against each other: registered, incompatible (409) or invalid (422)."""
    subject = alice.subject(f"shape-{uuid.uuid4().hex[:8]}")
    put = registry.put(f"/config/{subject}", json={"compatibility": level}, headers=platform)
    assert put.status_code == 200, put.text
    for text in schemas:
        for path in (
            f"/subjects/{subject}/versions",
            f"/compatibility/subjects/{subject}/versions?verbose=true",
            f"/compatibility/subjects/{subject}/versions/latest",
            f"/subjects/{subject}",
        ):
            answer = registry.post(path, json={"schema": text}, headers=alice.basic)
            assert answer.status_code in (200, 404, 409, 422), (path, text, answer.text)
