"""The schema registry app against the real PostgreSQL (and Kafka): Confluent clients
unchanged, behind a route prefix, writing schemas the pipeline reads.

The app runs under uvicorn in a thread, built by ``create_app`` as each Serve replica
builds it, and mounted at ``/registry`` as ``serve.run(..., route_prefix="/registry")``
mounts it. Each test uses its own uuid-named subjects, which belong to no source, so
the tests speak with the platform key (``*``); tests/security/test_registry_auth.py
covers tenant keys and who may do what.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from confluent_kafka import Producer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext
from starlette.applications import Starlette
from starlette.routing import Mount

from adapters.kafka import TopicSpec, ensure_topics
from adapters.postgres import MetadataStore
from cluster.settings import Settings
from core.avro import SchemaCache, decode, fingerprint, parse_schema_text, subject_for
from serve_apps.registry import MEDIA_TYPE, RegistryConfig, create_app
from tests.integration.conftest import api_key, pg, read_from

PREFIX = "/registry"


def _record(*fields: dict[str, Any], name: str = "Order", namespace: str = "test") -> str:
    schema = {"type": "record", "name": name, "namespace": namespace, "fields": list(fields)}
    return json.dumps(schema)


V1 = _record({"name": "id", "type": "string"})
V2_DEFAULTED = _record(
    {"name": "id", "type": "string"}, {"name": "qty", "type": "int", "default": 1}
)
V2_REQUIRED = _record({"name": "id", "type": "string"}, {"name": "qty", "type": "int"})
EVENT = json.dumps(
    {
        "type": "record",
        "name": "Checkout",
        "namespace": "rayline.test",
        "fields": [
            {"name": "event_id", "type": "string"},
            {"name": "tenant", "type": "string"},
            {"name": "type", "type": "string"},
            {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "value", "type": "double"},
        ],
    }
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def registry_url(services: Settings) -> Iterator[str]:
    app = create_app(RegistryConfig(dsn=services.postgres.dsn()))

    @asynccontextmanager
    async def lifespan(_parent: Starlette) -> AsyncIterator[None]:
        # A mounted app's lifespan is not run by its parent; Serve runs it, so do it here.
        async with app.router.lifespan_context(app):
            yield

    parent = Starlette(routes=[Mount(PREFIX, app=app)], lifespan=lifespan)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(parent, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the registry app did not start under uvicorn within 30 s"
    yield f"http://127.0.0.1:{port}{PREFIX}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def registry_key(services: Settings) -> str:
    """A platform key: these tests' subjects belong to no tenant's source."""
    return api_key(services, "*", "registry tests")


def _confluent(url: str, key: str) -> SchemaRegistryClient:
    """A Confluent client as users set one up: the key by HTTP basic auth."""
    return SchemaRegistryClient({"url": url, "basic.auth.user.info": f"*:{key}"})


@pytest.fixture
def client(registry_url: str, registry_key: str) -> Iterator[SchemaRegistryClient]:
    with _confluent(registry_url, registry_key) as session:
        yield session


@pytest.fixture
def http(registry_url: str, registry_key: str) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {registry_key}"}
    with httpx.Client(base_url=registry_url, timeout=30, headers=headers) as session:
        yield session


@pytest.fixture
def subject() -> str:
    return f"test-{uuid.uuid4().hex[:12]}.order"


def _avro(text: str) -> Schema:
    return Schema(text, "AVRO")


def _fail(call: Any, *args: Any) -> SchemaRegistryError:
    with pytest.raises(SchemaRegistryError) as caught:
        call(*args)
    return caught.value


def test_registration_is_idempotent_and_readable_every_way(
    services: Settings,
    registry_url: str,
    registry_key: str,
    client: SchemaRegistryClient,
    subject: str,
) -> None:
    schema_id = client.register_schema(subject, _avro(V1))
    # A fresh client has no cache: the registry itself must answer with the same id.
    with _confluent(registry_url, registry_key) as fresh:
        assert fresh.register_schema(subject, _avro(V1)) == schema_id
    assert client.get_versions(subject) == [1]
    assert subject in client.get_subjects()
    assert json.loads(client.get_schema(schema_id).schema_str or "null") == json.loads(V1)
    for version in (1, "latest"):
        registered = (
            client.get_version(subject, version)
            if version != "latest"
            else client.get_latest_version(subject)
        )
        assert (registered.schema_id, registered.version) == (schema_id, 1)
        assert registered.subject == subject
    pairs = [(p.subject, p.version) for p in client.get_schema_versions(schema_id)]
    assert (subject, 1) in pairs
    found = client.lookup_schema(subject, _avro(V1))
    assert (found.schema_id, found.version) == (schema_id, 1)
    # The pipeline reads the same tables: the id names this schema there too.
    store = MetadataStore(services.postgres.dsn())
    try:
        assert store.schema_text(schema_id) == V1
        assert store.subjects()[subject] == (schema_id, 1, V1)  # `rayline schemas list`
        # ... and what `rayline schemas register` writes, the registry serves.
        cli_id, version = store.register_schema(subject + ".cli", EVENT, fingerprint(EVENT))
    finally:
        store.close()
    served = client.get_version(subject + ".cli", version)
    assert (served.schema_id, served.schema.schema_str) == (cli_id, EVENT)


def test_the_same_schema_under_two_subjects_has_one_id(
    client: SchemaRegistryClient, subject: str
) -> None:
    first = client.register_schema(subject, _avro(V1))
    second = client.register_schema(subject + ".copy", _avro(V1))
    assert first == second
    assert client.get_versions(subject + ".copy") == [1]


def test_compatibility_levels_decide_what_may_join(
    services: Settings, http: httpx.Client, client: SchemaRegistryClient, subject: str
) -> None:
    # A namespace of its own: the refused schema must be new to the whole registry.
    ns = f"t{uuid.uuid4().hex}"
    v1 = _record({"name": "id", "type": "string"}, namespace=ns)
    defaulted = _record(
        {"name": "id", "type": "string"}, {"name": "qty", "type": "int", "default": 1}, namespace=ns
    )
    required = _record(
        {"name": "id", "type": "string"}, {"name": "qty", "type": "int"}, namespace=ns
    )
    first = client.register_schema(subject, _avro(v1))
    refused = _fail(client.register_schema, subject, _avro(required))
    assert (refused.http_status_code, refused.error_code) == (409, 409)
    assert "qty" in refused.error_message
    assert "BACKWARD" in refused.error_message
    assert client.get_versions(subject) == [1]
    digest = fingerprint(required)
    assert pg(services, "SELECT id FROM schemas WHERE fingerprint = $1", digest) == []

    verdict = http.post(
        f"/compatibility/subjects/{subject}/versions/latest?verbose=true",
        json={"schema": required},
    ).json()
    assert verdict["is_compatible"] is False
    assert any("qty" in m for m in verdict["messages"])
    assert client.test_compatibility(subject, _avro(defaulted)) is True

    second = client.register_schema(subject, _avro(defaulted))
    assert second != first
    assert http.get(f"/subjects/{subject}/versions/latest").json()["version"] == 2

    assert client.set_compatibility(subject, "NONE") == {"compatibility": "NONE"}
    assert client.get_compatibility(subject) == "NONE"
    third = client.register_schema(subject, _avro(required))
    assert http.get(f"/subjects/{subject}/versions/latest").json()["id"] == third
    assert client.get_versions(subject) == [1, 2, 3]


def test_subject_and_global_levels(http: httpx.Client, subject: str) -> None:
    unset = http.get(f"/config/{subject}")
    assert (unset.status_code, unset.json()["error_code"]) == (404, 40408)
    global_level = http.get("/config").json()["compatibilityLevel"]
    defaulted = http.get(f"/config/{subject}", params={"defaultToGlobal": "true"}).json()
    assert defaulted == {"compatibilityLevel": global_level}
    put = http.put(f"/config/{subject}", json={"compatibility": "full_transitive"})
    assert put.json() == {"compatibility": "FULL_TRANSITIVE"}
    assert http.get(f"/config/{subject}").json() == {"compatibilityLevel": "FULL_TRANSITIVE"}
    assert http.delete(f"/config/{subject}").json() == {"compatibilityLevel": "FULL_TRANSITIVE"}
    bad = http.put(f"/config/{subject}", json={"compatibility": "SIDEWAYS"})
    assert (bad.status_code, bad.json()["error_code"]) == (422, 42203)
    assert "FULL_TRANSITIVE" in bad.json()["message"]


def test_avro_serializer_and_deserializer_round_trip(
    registry_url: str, registry_key: str, client: SchemaRegistryClient
) -> None:
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    serializer = AvroSerializer(client, V2_DEFAULTED)
    context = SerializationContext(topic, MessageField.VALUE)
    data = serializer({"id": "o-1", "qty": 3}, context)
    assert data is not None
    assert data[0] == 0
    registered = client.get_latest_version(f"{topic}-value")
    assert int.from_bytes(data[1:5], "big") == registered.schema_id
    with _confluent(registry_url, registry_key) as fresh:
        assert AvroDeserializer(fresh)(data, context) == {"id": "o-1", "qty": 3}


def test_deleting_keeps_ids_readable(
    http: httpx.Client, client: SchemaRegistryClient, subject: str
) -> None:
    client.set_compatibility(subject, "NONE")
    first = client.register_schema(subject, _avro(V1))
    client.register_schema(subject, _avro(V2_REQUIRED))
    assert client.delete_version(subject, 1) == 1
    assert client.get_versions(subject) == [2]
    assert client.delete_subject(subject) == [2]
    gone = _fail(client.get_versions, subject)
    assert (gone.http_status_code, gone.error_code) == (404, 40401)
    # Records already in Kafka name the id: it must still resolve.
    assert http.get(f"/schemas/ids/{first}").json() == {"schema": V1}
    assert http.get(f"/config/{subject}").json()["error_code"] == 40408


def test_any_avro_schema_is_accepted(client: SchemaRegistryClient, subject: str) -> None:
    key_id = client.register_schema(subject + "-key", _avro('"string"'))
    assert client.get_schema(key_id).schema_str == '"string"'
    union_id = client.register_schema(subject + "-union", _avro('["null", "long"]'))
    assert union_id != key_id


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code", "says"),
    [
        ("GET", "/subjects/{s}/versions", None, 404, 40401, "not found"),
        ("GET", "/subjects/{s}.known/versions/7", None, 404, 40402, "Version"),
        ("GET", "/subjects/{s}.known/versions/abc", None, 422, 42202, "latest"),
        ("GET", "/subjects/{s}.known/versions/0", None, 422, 42202, "latest"),
        # digits that str.isdigit passes and int refuses, and more digits than int takes
        ("GET", "/subjects/{s}.known/versions/%C2%B2", None, 422, 42202, "latest"),
        ("GET", "/subjects/{s}.known/versions/" + "9" * 5000, None, 422, 42202, "latest"),
        ("GET", "/schemas/ids/2000000000", None, 404, 40403, "2000000000"),
        ("GET", "/schemas/ids/nope", None, 404, 40403, "positive integers"),
        ("GET", "/schemas/ids/%C2%B2", None, 404, 40403, "positive integers"),
        ("GET", "/schemas/ids/" + "1" * 5000, None, 404, 40403, "positive integers"),
        # PostgreSQL text takes no NUL: refused before it gets there
        ("GET", "/subjects/{s}%00/versions", None, 422, 42208, "control characters"),
        ("POST", "/subjects/{s}%01/versions", {"schema": V1}, 422, 42208, "control"),
        ("GET", "/subjects/" + "s" * 600 + "/versions", None, 422, 42208, "at most 512"),
        ("DELETE", "/subjects/{s}%00", None, 422, 42208, "control characters"),
        ("PUT", "/config/{s}%00", {"compatibility": "NONE"}, 422, 42208, "control"),
        ("POST", "/subjects/{s}.known", {"schema": V2_DEFAULTED}, 404, 40403, "Schema"),
        ("POST", "/subjects/{s}/versions", b"{not json", 400, 400, "malformed JSON"),
        ("POST", "/subjects/{s}/versions", [V1], 400, 400, "JSON object"),
        ("POST", "/subjects/{s}/versions", {"schema": '{"type": "record"}'}, 422, 42201, "Invalid"),
        ("POST", "/subjects/{s}/versions", {"schema": "{nope"}, 422, 42201, "not JSON"),
        ("POST", "/subjects/{s}/versions", {"schema": ""}, 422, 42201, "Empty schema"),
        (
            "POST",
            "/subjects/{s}/versions",
            {"schema": "{}", "schemaType": "JSON"},
            422,
            42201,
            "only AVRO",
        ),
        (
            "POST",
            "/subjects/{s}/versions",
            {"schema": V1, "references": [{"name": "x", "subject": "y", "version": 1}]},
            422,
            42201,
            "references",
        ),
        ("POST", "/subjects/{s}/versions", {"schema": "x" * (2 << 20)}, 413, 413, "limit"),
        ("DELETE", "/subjects/{s}.known/versions/9", None, 404, 40402, "Version"),
        ("GET", "/no/such/endpoint", None, 404, 404, "Not Found"),
        ("GET", "/config/{s}.known?defaultToGlobal=maybe", None, 422, 422, "defaultToGlobal"),
    ],
)
def test_errors_come_in_confluent_shape(
    http: httpx.Client,
    client: SchemaRegistryClient,
    subject: str,
    method: str,
    path: str,
    body: Any,
    status: int,
    code: int,
    says: str,
) -> None:
    client.register_schema(subject + ".known", _avro(V1))
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body)
    response = http.request(
        method,
        path.format(s=subject),
        content=content,
        headers={"Content-Type": MEDIA_TYPE},
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == MEDIA_TYPE
    answer = response.json()
    assert answer["error_code"] == code
    assert says in answer["message"]


def test_plain_json_is_accepted_and_other_types_refused(http: httpx.Client, subject: str) -> None:
    ok = http.post(f"/subjects/{subject}/versions", json={"schema": V1})
    assert ok.status_code == 200
    assert set(ok.json()) == {"id"}
    refused = http.post(
        f"/subjects/{subject}/versions",
        content=json.dumps({"schema": V1}),
        headers={"Content-Type": "text/plain"},
    )
    assert (refused.status_code, refused.json()["error_code"]) == (415, 415)
    assert http.get("/schemas/types").json() == ["AVRO"]


def test_concurrent_registrations_cannot_both_pass_the_check(http: httpx.Client) -> None:
    """Each of two schemas is compatible with v1 but not with the other: one must lose."""
    as_string = _record(
        {"name": "id", "type": "string"}, {"name": "n", "type": "string", "default": ""}
    )
    as_int = _record({"name": "id", "type": "string"}, {"name": "n", "type": "int", "default": 0})
    with ThreadPoolExecutor(2) as pool:
        for _ in range(5):
            subject = f"test-{uuid.uuid4().hex[:12]}.race"
            assert http.post(f"/subjects/{subject}/versions", json={"schema": V1}).is_success
            futures = [
                pool.submit(http.post, f"/subjects/{subject}/versions", json={"schema": s})
                for s in (as_string, as_int)
            ]
            statuses = sorted(f.result().status_code for f in futures)
            assert statuses == [200, 409]
            assert http.get(f"/subjects/{subject}/versions").json() == [1, 2]


def test_the_pipeline_decodes_what_a_confluent_producer_writes(
    services: Settings, client: SchemaRegistryClient
) -> None:
    parse_schema_text(EVENT)  # a Rayline event schema, as the workers will check it
    topic = f"registry-{uuid.uuid4().hex[:8]}"
    ensure_topics(services.kafka.bootstrap, [TopicSpec(topic, 1)])
    context = SerializationContext(topic, MessageField.VALUE)
    event = {
        "event_id": "e-1",
        "tenant": "acme",
        "type": "checkout",
        "ts": 1_795_931_400_000,
        "value": 12.5,
    }
    # Rayline's subject is <source>.<type>: registered first, then used as docs show.
    subject = subject_for(f"web-{uuid.uuid4().hex[:8]}", "checkout")
    registered_id = client.register_schema(subject, _avro(EVENT))
    serializer = AvroSerializer(
        client,
        EVENT,
        conf={
            "auto.register.schemas": False,
            "use.latest.version": True,
            "subject.name.strategy": lambda _ctx, _record_name: subject,
        },
    )
    producer = Producer({"bootstrap.servers": services.kafka.bootstrap})
    producer.produce(topic, value=serializer(event, context), key=b"e-1")
    assert producer.flush(30) == 0
    [message] = read_from(services, topic, {0: 0}, 1)
    store = MetadataStore(services.postgres.dsn())
    try:
        envelope, schema_id = decode(message.value(), SchemaCache(store.schema_text))
    finally:
        store.close()
    assert schema_id == registered_id
    assert envelope == {**event, "entity": "e-1", "attributes": {}}
