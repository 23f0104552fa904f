"""IoT devices over MQTT: real Mosquitto, real Kafka, the bridge on a thread in this process.

Devices are added through the real command line; a real paho client publishes as a
device at QoS 1. Each test names its own events, so the shared topics do not matter.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from actors.mqtt_bridge import BRIDGE_NAME, MqttBridge
from adapters.kafka import end_offsets
from adapters.mqtt import connect_result
from cluster.mosquitto import bridge_config
from cluster.settings import Settings
from cluster.stack import LocalStack
from tests.integration.conftest import deployed_paused, raw_offsets, rayline, read_from


@dataclasses.dataclass
class Device:
    id: str
    tenant: str
    password: str


def add_device(tenant: str) -> Device:
    device = f"dev-{uuid.uuid4().hex[:10]}"
    result = rayline("devices", "add", device, "--tenant", tenant, timeout=60)
    assert result.returncode == 0, f"devices add failed:\n{result.stdout}\n{result.stderr}"
    password = result.stdout.strip().splitlines()[-1]
    assert len(password) >= 32, result.stdout
    return Device(device, tenant, password)


@pytest.fixture(scope="module")
def fleet(services: Settings) -> tuple[Device, Device]:
    tenant = f"t-{uuid.uuid4().hex[:12]}"
    return add_device(tenant), add_device(tenant)


class BridgeThread:
    """An MqttBridge on a thread, stopped and started like a crashed/restarted actor."""

    def __init__(self, settings: Settings) -> None:
        # The deployed bridge's own session (that bridge is paused meanwhile, see the
        # `bridge` fixture): messages queued for it are this bridge's to forward.
        self.config = bridge_config(settings)
        self.bridge: MqttBridge | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop = threading.Event()
        self.bridge = MqttBridge(self.config)
        self._thread = threading.Thread(target=self.bridge.run, args=(self._stop,), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.bridge.status()["connected"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.bridge.status()["connected"], f"bridge did not connect: {self.bridge.status()}"

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "bridge did not stop"


@pytest.fixture(scope="module")
def bridge(services: Settings) -> Iterator[BridgeThread]:
    with deployed_paused(services, BRIDGE_NAME, pause="stop", resume="start"):
        running = BridgeThread(services)
        running.start()
        yield running
        running.stop()


def publish(
    settings: Settings, device: Device, bodies: list[Any], topic: str | None = None
) -> None:
    """Publish at QoS 1 as ``device`` and wait until the broker acknowledged each one."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{device.id}-{uuid.uuid4().hex[:4]}"
    )
    client.username_pw_set(device.id, device.password)
    client.connect(settings.mqtt.host, settings.mqtt.port, keepalive=10)
    client.loop_start()
    try:
        infos = []
        for body in bodies:
            payload = body if isinstance(body, bytes) else orjson.dumps(body)
            infos.append(client.publish(topic or f"devices/{device.id}/telemetry", payload, qos=1))
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def dlq_offsets(settings: Settings) -> dict[int, int]:
    return end_offsets(settings.kafka.bootstrap, settings.kafka.dlq_topic)


def read_ids(
    settings: Settings, start: dict[int, int], want: set[str], timeout: float = 60
) -> set[str]:
    """Event ids of raw records after ``start`` until every id of ``want`` was seen."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while not want <= seen and time.monotonic() < deadline:
        records = read_from(settings, settings.kafka.raw_topic, start, 10_000, timeout=2)
        seen = {orjson.loads(r.value())["event_id"] for r in records}
    return seen


def ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{uuid.uuid4().hex[:8]}-{i}" for i in range(count)]


def test_device_telemetry_reaches_the_raw_topic(services, fleet, bridge) -> None:
    a, _b = fleet
    start = raw_offsets(services)
    publish(
        services,
        a,
        [
            {"event_id": "m1-" + a.id, "type": "temperature", "value": 21.5, "unit": "C"},
            {"id": "m2-" + a.id, "ts": time.time(), "value": 3},
        ],
    )
    records = read_from(services, services.kafka.raw_topic, start, 2)
    by_id = {orjson.loads(r.value())["event_id"]: orjson.loads(r.value()) for r in records}
    assert set(by_id) == {"m1-" + a.id, "m2-" + a.id}
    first = by_id["m1-" + a.id]
    assert (first["tenant"], first["entity"], first["source"]) == (a.tenant, a.id, "mqtt")
    assert (first["type"], first["value"], first["attributes"]) == (
        "temperature",
        21.5,
        {"unit": "C"},
    )
    assert all(r.key() == f"{a.tenant}:{a.id}".encode() for r in records)


def test_a_device_cannot_publish_on_another_devices_topic(services, fleet, bridge) -> None:
    a, b = fleet
    start = raw_offsets(services)
    forged, honest = f"forged-{uuid.uuid4().hex[:8]}", f"honest-{uuid.uuid4().hex[:8]}"
    publish(services, a, [{"event_id": forged}], topic=f"devices/{b.id}/telemetry")
    publish(services, a, [{"event_id": honest}])
    seen = read_ids(services, start, {honest})
    assert honest in seen
    assert forged not in seen, "the ACL let a device publish as another device"


def answer(settings: Settings, user: str, password: str) -> str:
    """The broker's answer to a CONNECT: ``accepted``, ``refused: <reason>`` or ``none``."""
    code = connect_result(settings.mqtt.host, settings.mqtt.port, user, password)
    if code is None:
        return "none"
    return f"refused: {code}" if code.is_failure else "accepted"


def test_a_wrong_password_is_refused_at_connect(services, fleet) -> None:
    a, _b = fleet
    assert answer(services, a.id, a.password + "x").startswith("refused")
    assert answer(services, a.id, a.password) == "accepted"
    assert answer(services, "nobody", a.password).startswith("refused")


def test_malformed_payloads_are_dead_lettered_with_a_reason(services, fleet, bridge) -> None:
    a, _b = fleet
    start = dlq_offsets(services)
    bad = [
        b"not json " + a.id.encode(),
        b'["' + a.id.encode() + b'"]',
        b'{"ts": "soon", "n": "' + a.id.encode() + b'"}',
    ]
    publish(services, a, bad)
    records = read_from(services, services.kafka.dlq_topic, start, 50, timeout=15)
    mine = [r for r in records if a.id.encode() in r.value()]
    assert sorted(r.value() for r in mine) == sorted(bad)
    reasons = {r.value(): dict(r.headers()) for r in mine}
    assert b"payload is not JSON" in reasons[bad[0]]["reason"]
    assert b"expected a JSON object" in reasons[bad[1]]["reason"]
    assert b"field 'ts'" in reasons[bad[2]]["reason"]
    for headers in reasons.values():
        assert headers["stage"] == b"mqtt"
        assert headers["origin.device"] == a.id.encode()


def test_messages_sent_while_the_bridge_is_down_arrive_when_it_is_back(
    services, fleet, bridge
) -> None:
    a, _b = fleet
    start = raw_offsets(services)
    bridge.stop()
    try:
        wanted = ids("offline", 50)
        publish(services, a, [{"event_id": i, "value": 1} for i in wanted])
    finally:
        bridge.start()
    seen = read_ids(services, start, set(wanted))
    assert set(wanted) <= seen, f"{len(set(wanted) - seen)} of 50 queued messages were lost"


def test_a_broker_restart_loses_nothing_acknowledged(services, fleet, bridge) -> None:
    a, _b = fleet
    start = raw_offsets(services)
    stack = LocalStack(services)
    # Queued for the bridge's session while it is away, then kept across the restart.
    bridge.stop()
    queued = ids("queued", 20)
    publish(services, a, [{"event_id": i} for i in queued])
    stack.restart("mosquitto")
    bridge.start()
    # With the bridge running: some of these are in flight when the broker goes away.
    before, after = ids("before", 30), ids("after", 10)
    publish(services, a, [{"event_id": i} for i in before])
    stack.restart("mosquitto")
    publish(services, a, [{"event_id": i} for i in after])
    wanted = set(queued + before + after)
    seen = read_ids(services, start, wanted, timeout=90)
    assert wanted <= seen, f"lost {sorted(wanted - seen)[:5]} ({len(wanted - seen)} in all)"


def test_a_removed_device_can_no_longer_connect(services) -> None:
    device = add_device(f"t-{uuid.uuid4().hex[:12]}")
    assert answer(services, device.id, device.password) == "accepted"
    result = rayline("devices", "remove", device.id, timeout=60)
    assert result.returncode == 0, f"devices remove failed:\n{result.stdout}\n{result.stderr}"
    assert answer(services, device.id, device.password).startswith("refused")
