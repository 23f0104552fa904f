"""Source mappings: third-party payloads become envelopes that validate_events accepts."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.envelope import validate_events
from core.exceptions import ConfigurationError
from core.source_mapping import MAX_DEPTH, EnvelopeMapping, apply_mapping, parse_mapping

RECEIVED_MS = 1_795_931_400_123

GITHUB_PUSH: dict[str, Any] = {
    "ref": "refs/heads/main",
    "before": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
    "after": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c",
    "repository": {"id": 1296269, "full_name": "octocat/Hello-World", "private": False},
    "pusher": {"name": "octocat", "email": "octocat@github.com"},
    "commits": [
        {"id": "6113728f", "message": "first", "timestamp": "2026-11-29T10:00:00+01:00"},
        {"id": "0d1a26e6", "message": "second", "timestamp": "2026-11-29T11:00:00+01:00"},
    ],
    "head_commit": {
        "id": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c",
        "message": "second",
        "timestamp": "2026-11-29T11:00:00+01:00",
    },
}
GITHUB_HEADERS = {
    "x-github-delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
    "x-github-event": "push",
    "content-type": "application/json",
}
GITHUB_MAPPING = {
    "event_id": "sha256:$",
    "tenant": "const:acme",
    "type": "const:push",
    "ts": "$.head_commit.timestamp",
    "entity": "$.repository.full_name",
}

STRIPE_EVENT: dict[str, Any] = {
    "id": "evt_1NG8Du2eZvKYlo2CUI79vXWy",
    "object": "event",
    "api_version": "2019-02-19",
    "created": 1795931000,
    "type": "invoice.paid",
    "data": {
        "object": {
            "id": "in_1",
            "customer": "cus_9s6XKzkNRiz8i3",
            "amount_paid": 1250,
            "lines": {"data": [{"id": "il_1", "amount": 1250, "price": {"id": "price_1"}}]},
        }
    },
    "livemode": False,
}
STRIPE_MAPPING = {
    "event_id": "$.id",
    "tenant": "const:acme",
    "type": "$.type",
    "ts": "$.created",
    "entity": "$.data.object.customer",
    "value": "$.data.object.amount_paid",
}


def mapped(spec, payload, headers=None):
    return apply_mapping(
        parse_mapping(spec), payload, headers=headers or {}, received_at_ms=RECEIVED_MS
    )


def valid(raw):
    envelopes, errors = validate_events([raw], default_source="hooks", received_at_ms=RECEIVED_MS)
    assert errors == []
    return envelopes[0]


def test_github_push_becomes_an_envelope():
    raw, problems = mapped(GITHUB_MAPPING, GITHUB_PUSH, GITHUB_HEADERS)
    assert problems == []
    envelope = valid(raw)
    canonical = orjson.dumps(GITHUB_PUSH, option=orjson.OPT_SORT_KEYS)
    assert envelope["event_id"] == hashlib.sha256(canonical).hexdigest()
    assert envelope["type"] == "push"
    assert envelope["ts"] == int(datetime(2026, 11, 29, 10, tzinfo=UTC).timestamp() * 1000)
    assert envelope["entity"] == "octocat/Hello-World"
    assert envelope["attributes"] == GITHUB_PUSH
    assert envelope["source"] == "hooks"


def test_a_digest_id_depends_on_the_payload_only_not_on_headers_or_key_order():
    spec = {"event_id": "sha256:$", "type": "const:push", "ts": "now"}
    first, _ = mapped(spec, GITHUB_PUSH, GITHUB_HEADERS)
    reordered = dict(reversed(list(GITHUB_PUSH.items())))
    replay, _ = mapped(spec, reordered, {**GITHUB_HEADERS, "x-github-delivery": "fresh"})
    assert replay["event_id"] == first["event_id"]
    changed, _ = mapped(spec, dict(GITHUB_PUSH, after="f" * 40), GITHUB_HEADERS)
    assert changed["event_id"] != first["event_id"]
    assert len(first["event_id"]) == 64


@pytest.mark.parametrize(
    ("expression", "payload", "expected"),
    [
        ("sha256:$.a", {"a": "x"}, hashlib.sha256(b'"x"').hexdigest()),
        ("sha256:$.a[0]", {"a": [1]}, hashlib.sha256(b"1").hexdigest()),
        ("sha256:$", [1, 2], hashlib.sha256(b"[1,2]").hexdigest()),
        ("sha256:$", {"b": 1, "a": 2}, hashlib.sha256(b'{"a":2,"b":1}').hexdigest()),
    ],
)
def test_digest_expressions(expression, payload, expected):
    raw, problems = mapped({"event_id": expression}, payload)
    assert (raw["event_id"], problems) == (expected, [])


def test_a_digest_of_nothing_is_a_problem():
    raw, problems = mapped({"event_id": "sha256:$.missing"}, {"a": 1})
    assert "event_id" not in raw
    assert problems == [
        "field 'event_id' (mapped from sha256:$.missing) found nothing in the payload"
    ]


def test_stripe_event_becomes_an_envelope():
    raw, problems = mapped(STRIPE_MAPPING, STRIPE_EVENT)
    assert problems == []
    envelope = valid(raw)
    assert envelope["event_id"] == "evt_1NG8Du2eZvKYlo2CUI79vXWy"
    assert envelope["type"] == "invoice.paid"
    assert envelope["ts"] == 1_795_931_000_000
    assert envelope["value"] == 1250
    assert envelope["entity"] == "cus_9s6XKzkNRiz8i3"


def test_github_branch_deletion_has_no_head_commit():
    deleted = dict(GITHUB_PUSH, head_commit=None, commits=[])
    raw, problems = mapped(GITHUB_MAPPING, deleted, GITHUB_HEADERS)
    assert "ts" not in raw
    assert problems == [
        "field 'ts' (mapped from $.head_commit.timestamp) found nothing in the payload"
    ]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("$", STRIPE_EVENT),
        ("$.data.object.lines.data[0].price.id", "price_1"),
        ("$.data.object.lines.data[-1].amount", 1250),
        ('$["data"]["object"]["customer"]', "cus_9s6XKzkNRiz8i3"),
        ("$.data.object['customer']", None),
        ("$.data.object.lines.data[1]", None),
        ("$.data.object.lines.data[-2]", None),
        ("$.data[0]", None),
        ("$.livemode.x", None),
        ("$.missing", None),
    ],
)
def test_paths(expression, expected):
    try:
        raw, problems = mapped({"attributes": expression}, STRIPE_EVENT)
    except ConfigurationError:
        assert expected is None
        return
    if expected is None:
        assert "attributes" not in raw
        assert problems == [
            f"field 'attributes' (mapped from {expression}) found nothing in the payload"
        ]
    else:
        assert raw == {"attributes": expected}
        assert problems == []


def test_quoted_keys_with_dots_and_escapes():
    payload = {"key with.dots": {'say "hi"': [10, 20]}}
    raw, problems = mapped({"value": '$["key with.dots"]["say \\"hi\\""][1]'}, payload)
    assert problems == []
    assert raw["value"] == 20


def test_headers_are_case_insensitive_and_missing_ones_reported():
    raw, problems = mapped(
        {"event_id": "header:X-Request-Id", "source": "header:x-source"},
        {"a": 1},
        {"X-Request-ID": "req-1"},
    )
    assert raw["event_id"] == "req-1"
    assert problems == [
        "field 'source' (mapped from header:x-source) found nothing in the request headers"
    ]


def test_now_gives_epoch_seconds_that_validate():
    raw, _ = mapped(
        {"event_id": "$.id", "tenant": "const:acme", "type": "const:ping", "ts": "now"},
        {"id": "p-1"},
    )
    assert raw["ts"] == RECEIVED_MS / 1000
    assert valid(raw)["ts"] == RECEIVED_MS


def test_numeric_ids_become_strings_and_other_types_are_left_alone():
    raw, problems = mapped(
        {"event_id": "$.id", "entity": "$.repo", "type": "$.kind", "value": "$.flag"},
        {"id": 12345, "repo": 1296269, "kind": 7, "flag": True},
    )
    assert problems == []
    assert raw["event_id"] == "12345"
    assert raw["entity"] == "1296269"
    assert raw["type"] == 7
    assert raw["value"] is True


def test_payload_fields_not_mapped_are_not_copied():
    payload = {"tenant": "intruder", "type": "admin", "event_id": "x", "ts": 1795931000}
    raw, _ = mapped({"event_id": "$.event_id", "type": "const:ping"}, payload)
    assert set(raw) == {"event_id", "type", "attributes"}
    assert raw["attributes"] == payload


@pytest.mark.parametrize("payload", [[1, 2, 3], "text", 42, None])
def test_non_object_payloads_go_under_payload(payload):
    raw, _ = mapped({"type": "const:ping"}, payload)
    assert raw["attributes"] == {"payload": payload}


def test_mapped_attributes_replace_the_default():
    raw, problems = mapped({"attributes": "$.data.object"}, STRIPE_EVENT)
    assert problems == []
    assert raw == {"attributes": STRIPE_EVENT["data"]["object"]}


def test_empty_mapping_returns_the_envelope_unchanged():
    envelope = {"event_id": "e-1", "tenant": "acme", "type": "t", "ts": 1795931000}
    raw, problems = apply_mapping(
        parse_mapping({}), envelope, headers={}, received_at_ms=RECEIVED_MS
    )
    assert raw is envelope
    assert problems == []


def test_empty_mapping_with_an_array_payload_says_what_to_do():
    raw, problems = apply_mapping(
        EnvelopeMapping({}), [{"a": 1}], headers={}, received_at_ms=RECEIVED_MS
    )
    assert raw == {}
    assert "mapping" in problems[0]


def test_a_mapping_built_directly_is_parsed_when_applied():
    raw, _ = apply_mapping(
        EnvelopeMapping({"type": "$.type"}), STRIPE_EVENT, headers={}, received_at_ms=0
    )
    assert raw["type"] == "invoice.paid"
    with pytest.raises(ConfigurationError, match="type"):
        apply_mapping(EnvelopeMapping({"type": "$..x"}), {}, headers={}, received_at_ms=0)


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ({"colour": "$.c"}, "colour"),
        ({"type": 3}, "type"),
        ({"type": "$."}, "type"),
        ({"type": "$..a"}, "type"),
        ({"type": "$.a["}, "type"),
        ({"type": "$.a[0"}, "type"),
        ({"type": '$["a]'}, "type"),
        ({"type": "$.a]"}, "type"),
        ({"type": "$[a]"}, "type"),
        ({"type": "$[1.5]"}, "type"),
        ({"type": "$.a b"}, "type"),
        ({"type": "a.b"}, "type"),
        ({"type": "header:"}, "type"),
        ({"type": "header:bad header"}, "type"),
        ({"type": "eval:__import__('os')"}, "type"),
        ({"event_id": "sha256:"}, "event_id"),
        ({"event_id": "sha256:a.b"}, "event_id"),
        ({"event_id": "sha256:$..a"}, "event_id"),
        ({"ts": "$" + ".a" * (MAX_DEPTH + 1)}, "ts"),
        ({"ts": "$" + "[0]" * 10_000}, "ts"),
        ({"ts": "$" + "[" * 10_000}, "ts"),
        ({"ts": '$["' + "x" * 100_000 + '"]'}, "ts"),
    ],
)
def test_bad_mappings_name_the_field(spec, named):
    with pytest.raises(ConfigurationError) as info:
        parse_mapping(spec)
    assert named in str(info.value)
    assert len(str(info.value)) < 400


def test_deepest_allowed_path_works():
    payload: object = "bottom"
    for _ in range(MAX_DEPTH):
        payload = {"a": payload}
    raw, problems = mapped({"type": "$" + ".a" * MAX_DEPTH}, payload)
    assert problems == []
    assert raw["type"] == "bottom"


def test_mapping_is_not_a_mapping():
    with pytest.raises(ConfigurationError, match="object"):
        parse_mapping(["event_id"])  # type: ignore[arg-type]


@given(st.text(max_size=80))
def test_any_expression_parses_or_raises_configuration_error(expression):
    try:
        mapping = parse_mapping({"type": expression})
    except ConfigurationError:
        return
    raw, problems = apply_mapping(mapping, STRIPE_EVENT, headers={}, received_at_ms=0)
    assert ("type" in raw) != bool(problems)
