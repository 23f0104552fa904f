"""Attacks on the webhook endpoint by replaying signed deliveries, against the running
stack: the deployed ingest edge (Ray Serve), real Redis for the replay window, real Kafka
for what was counted.

Whoever sees one signed delivery (a proxy log, a leaked request) holds a body and its
valid signature. GitHub signs neither ``X-GitHub-Delivery`` nor a time; a Stripe header
may carry several ``v1`` entries, of which the receiver checks whether ANY matches.
Neither may turn one delivery into several counted events.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import orjson
import pytest

from adapters.sources import Source
from cluster.settings import Settings
from core import signatures
from tests.integration.conftest import catalog_call, raw_offsets, read_matching

# The README's example mapping: the event id is derived from the signed body.
GITHUB_MAPPING = {"event_id": "sha256:$", "type": "header:x-github-event", "ts": "now"}
STRIPE_MAPPING = {"event_id": "$.id", "type": "$.type", "ts": "$.created"}


@pytest.fixture(scope="module")
def edge(stack: Settings) -> Any:
    with httpx.Client(base_url=f"http://{stack.serve.host}:{stack.serve.port}", timeout=30) as c:
        yield c


def add_source(settings: Settings, tenant: str, scheme: str, mapping: dict[str, str]) -> Source:
    source = Source(
        name=f"hook-{uuid.uuid4().hex[:10]}",
        kind="webhook",
        tenant=tenant,
        auth="hmac",
        scheme=scheme,
        secrets=(signatures.new_secret(scheme),),
        mapping=mapping,
    )
    catalog_call(settings, lambda c: c.add_source(source))
    return source


def counted(settings: Settings, start: dict[int, int], tenant: str) -> list[dict[str, Any]]:
    """Every envelope of ``tenant`` on the raw topic since ``start`` (waits for more)."""

    def mine(record: Any) -> bool:
        return tenant.encode() in (record.value() or b"")

    found = read_matching(settings, settings.kafka.raw_topic, start, mine, 10, timeout=8)
    return [orjson.loads(record.value()) for record in found]


def post(edge: httpx.Client, source: Source, body: bytes, headers: dict[str, str]) -> Any:
    headers = {**headers, "content-type": "application/json"}
    return edge.post(f"/v1/sources/{source.name}/webhook", content=body, headers=headers)


def test_a_github_delivery_replayed_with_fresh_delivery_ids_counts_once(
    stack: Settings, edge: httpx.Client, tenant: str
) -> None:
    source = add_source(stack, tenant, "github", GITHUB_MAPPING)
    start = raw_offsets(stack)
    body = orjson.dumps({"ref": "refs/heads/main", "after": uuid.uuid4().hex, "t": tenant})
    signed = signatures.sign(
        "github", source.secrets[0], body, now_s=time.time(), delivery_id=str(uuid.uuid4())
    )
    signed["x-github-event"] = "push"
    first = post(edge, source, body, signed)
    assert first.status_code == 202, first.text
    for _ in range(3):  # the attacker's replays: same body and signature, new delivery ids
        replay = post(edge, source, body, {**signed, "x-github-delivery": str(uuid.uuid4())})
        assert replay.status_code == 200, replay.text
        assert replay.json()["duplicate"] is True
        assert replay.json()["accepted"] == 0
    other = orjson.dumps({"ref": "refs/heads/main", "after": uuid.uuid4().hex, "t": tenant})
    next_push = signatures.sign(
        "github", source.secrets[0], other, now_s=time.time(), delivery_id="x"
    )
    assert post(edge, source, other, {**next_push, "x-github-event": "push"}).status_code == 202
    events = counted(stack, start, tenant)
    assert len(events) == 2, events  # the first delivery once, and the other push
    assert len({event["event_id"] for event in events}) == 2


def _stripe_event(tenant: str) -> bytes:
    return orjson.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex[:16]}",
            "type": "charge.succeeded",
            "created": int(time.time()),
            "data": {"object": {"customer": tenant}},
        }
    )


def _stripe_header(source: Source, body: bytes, now: float, *extra_first: str) -> str:
    real = signatures.sign("stripe", source.secrets[0], body, now_s=now, delivery_id="")
    stamp, v1 = real["stripe-signature"].split(",")
    return ",".join([stamp, *extra_first, v1])


def test_a_stripe_delivery_with_a_bogus_first_v1_is_accepted_once_and_replays_count_never(
    stack: Settings, edge: httpx.Client, tenant: str
) -> None:
    source = add_source(stack, tenant, "stripe", STRIPE_MAPPING)
    start = raw_offsets(stack)
    body = _stripe_event(tenant)
    now = time.time()
    header = _stripe_header(source, body, now, "v1=" + "0" * 64)
    first = post(edge, source, body, {"stripe-signature": header})
    assert first.status_code == 202, first.text
    replays = [
        header,  # the same request again
        _stripe_header(source, body, now, "v1=" + "f" * 64),  # another bogus first entry
        _stripe_header(source, body, now, "v1=" + "a" * 64, "v1=zz"),
        _stripe_header(source, body, now),  # the bogus entry dropped
        _stripe_header(source, body, now + 30),  # Stripe's own retry: new t, same event
    ]
    for replay in replays:
        answer = post(edge, source, body, {"stripe-signature": replay})
        assert answer.status_code == 200, (replay, answer.text)
        assert answer.json()["duplicate"] is True
    (event,) = counted(stack, start, tenant)
    assert event["event_id"] == orjson.loads(body)["id"]


def test_a_stripe_header_with_only_bogus_v1_entries_is_refused(
    stack: Settings, edge: httpx.Client, tenant: str
) -> None:
    source = add_source(stack, tenant, "stripe", STRIPE_MAPPING)
    body = _stripe_event(tenant)
    header = f"t={int(time.time())},v1={'0' * 64},v1={'1' * 64}"
    answer = post(edge, source, body, {"stripe-signature": header})
    assert answer.status_code == 401
    assert answer.json()["reason"] == "mismatch"


def test_a_standard_webhook_replay_under_a_new_id_is_a_mismatch(
    stack: Settings, edge: httpx.Client, tenant: str
) -> None:
    source = add_source(stack, tenant, "standard", STRIPE_MAPPING)
    start = raw_offsets(stack)
    body = _stripe_event(tenant)
    signed = signatures.sign(
        "standard", source.secrets[0], body, now_s=time.time(), delivery_id="msg_1"
    )
    assert post(edge, source, body, signed).status_code == 202
    again = post(edge, source, body, signed)
    assert (again.status_code, again.json()["duplicate"]) == (200, True)
    renamed = post(edge, source, body, {**signed, "webhook-id": "msg_2"})  # the id is signed
    assert (renamed.status_code, renamed.json()["reason"]) == (401, "mismatch")
    assert len(counted(stack, start, tenant)) == 1
