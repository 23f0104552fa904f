"""The pure parts of the MQTT bridge: topics, payloads, dead letters, password hashes."""

from __future__ import annotations

import re

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.mqtt_bridge import BridgeConfig, DeviceTenants, route
from adapters.mqtt import Inbound, password_file_text, password_hash, password_matches
from core.device_telemetry import (
    device_from_topic,
    device_problem,
    payload_event_id,
    telemetry_envelope,
)

NOW_MS = 1_790_000_000_000
LIMIT = 256 * 1024


@pytest.mark.parametrize(
    ("topic", "device"),
    [
        ("devices/pump-7/telemetry", "pump-7"),
        ("devices/a.b_c/telemetry", "a.b_c"),
        ("devices/pump-7/status", None),
        ("devices//telemetry", None),
        ("devices/a/b/telemetry", None),
        ("sensors/pump-7/telemetry", None),
        ("devices/pump 7/telemetry", None),
        ("devices/pump:7/telemetry", None),
        ("/devices/pump-7/telemetry", None),
    ],
)
def test_device_from_topic(topic: str, device: str | None) -> None:
    assert device_from_topic(topic) == device


@pytest.mark.parametrize("device", ["", "a/b", "a+b", "a#", "a:b", "x" * 129, "é"])
def test_bad_device_ids_are_explained(device: str) -> None:
    problem = device_problem(device)
    assert problem is not None
    assert "device id expected" in problem


def envelope(payload: dict[str, object] | bytes) -> tuple[dict[str, object] | None, str | None]:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return telemetry_envelope("pump-7", "acme", raw, NOW_MS, LIMIT)


def test_full_payload_becomes_an_envelope() -> None:
    env, reason = envelope(
        {
            "event_id": "e1",
            "type": "temperature",
            "ts": "2026-11-29T10:00:00Z",
            "value": 21.5,
            "unit": "C",
            "attributes": {"site": "north"},
        }
    )
    assert reason is None
    assert env == {
        "event_id": "e1",
        "source": "mqtt",
        "tenant": "acme",
        "type": "temperature",
        "ts": 1_795_946_400_000,
        "entity": "pump-7",
        "value": 21.5,
        "attributes": {"site": "north", "unit": "C"},
        "received_at": NOW_MS,
    }


def test_minimal_payload_gets_defaults_and_a_deterministic_id() -> None:
    raw = b'{"rpm": 1200}'
    env, reason = envelope(raw)
    assert reason is None
    assert env is not None
    assert env["type"] == "telemetry"
    assert env["ts"] == NOW_MS
    assert env["value"] == 0
    assert env["attributes"] == {"rpm": 1200}
    assert env["event_id"] == payload_event_id("pump-7", raw)


@pytest.mark.parametrize(
    ("payload", "field", "expected"),
    [
        ({"id": 42}, "event_id", "42"),
        ({"id": "abc"}, "event_id", "abc"),
        ({"event_id": "x", "id": "y"}, "event_id", "x"),
        ({"ts": 1_790_000_100}, "ts", 1_790_000_100_000),
        ({"value": 3}, "value", 3),
    ],
)
def test_payload_fields_map_to_the_envelope(
    payload: dict[str, object], field: str, expected: object
) -> None:
    env, reason = envelope(payload)
    assert reason is None
    assert env is not None
    assert env[field] == expected


@pytest.mark.parametrize(
    ("payload", "attributes"),
    [
        ({"value": "high"}, {"value": "high"}),
        ({"value": True}, {"value": True}),
        (
            {"tenant": "evil", "entity": "other", "source": "x"},
            {"tenant": "evil", "entity": "other", "source": "x"},
        ),
        ({"attributes": [1, 2]}, {"attributes": [1, 2]}),
    ],
)
def test_identity_comes_from_the_broker_and_extra_fields_are_kept(
    payload: dict[str, object], attributes: dict[str, object]
) -> None:
    env, reason = envelope(payload)
    assert reason is None
    assert env is not None
    assert (env["tenant"], env["entity"], env["source"]) == ("acme", "pump-7", "mqtt")
    assert env["attributes"] == attributes


@pytest.mark.parametrize(
    ("raw", "reason_part"),
    [
        (b"not json", "payload is not JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'"text"', "expected a JSON object, got str"),
        (b'{"ts": "yesterday"}', "field 'ts' expected RFC 3339"),
        (b'{"ts": 1790000000000}', "field 'ts' expected a time between 2000 and 2100"),
        (b'{"type": "bad type!"}', "field 'type' expected"),
        (b'{"event_id": ""}', "field 'event_id' expected string of 1 to 128"),
        (b'{"pad": "' + b"x" * LIMIT + b'"}', "over the limit of 262144 bytes"),
    ],
)
def test_bad_payloads_get_a_reason(raw: bytes, reason_part: str) -> None:
    env, reason = envelope(raw)
    assert env is None
    assert reason is not None
    assert reason_part in reason


@given(st.binary(max_size=200), st.binary(max_size=200))
def test_generated_ids_repeat_only_for_the_same_payload(a: bytes, b: bytes) -> None:
    same = payload_event_id("d", a) == payload_event_id("d", b)
    assert same == (a == b)
    assert payload_event_id("d", a) != payload_event_id("e", a)
    assert re.fullmatch(r"d-[0-9a-f]{32}", payload_event_id("d", a))


def inbound(topic: str, payload: bytes) -> Inbound:
    return Inbound(topic, payload, mid=1, qos=1, generation=1, received_at_ms=NOW_MS)


def test_route_sends_a_good_message_to_the_raw_topic_keyed_by_entity() -> None:
    good, bad = route(
        inbound("devices/pump-7/telemetry", b'{"id": "e1"}'), {"pump-7": "acme"}, LIMIT
    )
    assert bad is None
    assert good is not None
    key, value, headers = good
    assert key == b"acme:pump-7"
    assert orjson.loads(value)["event_id"] == "e1"
    assert dict(headers)["schema"] == b"rayline.envelope/v1"


@pytest.mark.parametrize(
    ("topic", "payload", "reason_part"),
    [
        ("devices/ghost/telemetry", b"{}", "device 'ghost' is not registered"),
        ("devices/pump-7/telemetry", b"{oops", "device 'pump-7': payload is not JSON"),
        ("other/topic", b"{}", "is not devices/<device>/telemetry"),
    ],
)
def test_route_dead_letters_with_reason_and_origin(
    topic: str, payload: bytes, reason_part: str
) -> None:
    good, bad = route(inbound(topic, payload), {"pump-7": "acme"}, LIMIT)
    assert good is None
    assert bad is not None
    _key, value, headers = bad
    found = dict(headers)
    assert value == payload
    assert reason_part in str(found["reason"])
    assert found["stage"] == b"mqtt"
    assert found["origin.source"] == b"mqtt"
    assert found["received_at"] == str(NOW_MS).encode()
    assert "origin.device" in found


class Loader:
    def __init__(self) -> None:
        self.calls = 0
        self.rows = {"a": "t1"}

    def __call__(self) -> dict[str, str]:
        self.calls += 1
        return dict(self.rows)


def test_device_tenants_reload_on_a_miss_at_most_once_per_interval() -> None:
    now = [100.0]
    load = Loader()
    tenants = DeviceTenants(load, min_reload_s=1.0, clock=lambda: now[0])
    assert tenants.lookup({"a"}) == {"a": "t1"}
    assert tenants.lookup({"a"}) == {"a": "t1"}
    assert load.calls == 1, "a known device must not reload"
    load.rows["b"] = "t2"
    assert tenants.lookup({"b"}) == {}, "a reload within the interval is not due yet"
    now[0] += 1.0
    assert tenants.lookup({"a", "b"}) == {"a": "t1", "b": "t2"}
    assert load.calls == 2


# Written by `mosquitto_passwd -b passwd dev-a s3cret-pass` (Mosquitto 2.0.11).
MOSQUITTO_LINE = (
    "dev-a:$7$101$jfwYn50WTVbp0ldF$kc4Q0QV2eLUZYCbOD/SUcFPT6MupBaz7TWZUJbpNPL0Fx"
    "X+ygZL8/64IrZE6rstplY4M0ER9+J0oaR3mbRalAg=="
)


def test_hashes_match_what_mosquitto_passwd_writes() -> None:
    user, hashed = MOSQUITTO_LINE.split(":", 1)
    assert password_matches("s3cret-pass", hashed)
    assert not password_matches("wrong", hashed)
    salt = __import__("base64").b64decode(hashed.split("$")[3])
    assert password_hash("s3cret-pass", salt=salt) == hashed
    assert password_file_text([(user, hashed)]) == MOSQUITTO_LINE + "\n"


def test_new_hashes_have_the_mosquitto_form_and_a_fresh_salt() -> None:
    first, second = password_hash("pw"), password_hash("pw")
    pattern = r"\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}=="
    assert re.fullmatch(pattern, first)
    assert re.fullmatch(pattern, second)
    assert first != second
    assert password_matches("pw", first)


def test_password_file_refuses_a_user_that_would_break_it() -> None:
    with pytest.raises(ValueError, match="without ':'"):
        password_file_text([("a:b", password_hash("pw"))])


def test_bridge_config_never_shows_its_secrets() -> None:
    config = BridgeConfig(
        mqtt_host="h", mqtt_port=1, username="u", password="hunter2", client_id="c",
        topic_filter="devices/+/telemetry", session_expiry_seconds=60, receive_maximum=10,
        bootstrap="b", raw_topic="r", dlq_topic="d",
        postgres_dsn="postgresql://u:pgsecret@h/db", redis_url="redis://:rsecret@h",
    )  # fmt: skip
    text = repr(config)
    assert "hunter2" not in text
    assert "pgsecret" not in text
    assert "rsecret" not in text


def test_broker_config_refuses_anonymous_and_pins_each_device_to_its_topic(tmp_path) -> None:
    from cluster import mosquitto
    from cluster.settings import load_settings

    settings = load_settings(paths={"state_dir": tmp_path}, mqtt={"port": 21999})
    conf = mosquitto.config_text(settings).splitlines()
    assert "listener 21999 127.0.0.1" in conf
    assert "allow_anonymous false" in conf
    assert "persistence true" in conf
    assert f"password_file {tmp_path / 'mosquitto' / 'passwd'}" in conf
    acl = mosquitto.acl_text(settings).splitlines()
    assert acl[:2] == ["user rayline-bridge", "topic read devices/+/telemetry"]
    assert "pattern write devices/%u/telemetry" in acl
    assert not any(line.startswith("topic write") for line in acl)


def test_password_file_holds_the_bridge_then_the_devices(tmp_path) -> None:
    from cluster import mosquitto
    from cluster.settings import load_settings

    settings = load_settings(paths={"state_dir": tmp_path})
    mosquitto.write_passwords(settings, [("pump-7", password_hash("pw"))])
    path = mosquitto.password_path(settings)
    lines = path.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["rayline-bridge", "pump-7"]
    assert password_matches("rayline-bridge-local", lines[0].split(":", 1)[1])
    assert path.stat().st_mode & 0o077 == 0, "the password file must not be world-readable"
