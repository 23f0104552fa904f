"""The MQTT bridge: device telemetry from the broker into ``events.raw``.

:class:`MqttBridge` subscribes to ``devices/+/telemetry`` at QoS 1 on a persistent
session (MQTT 5, clean start off, a long session expiry) with manual acknowledgement.
It collects messages into batches, turns each into an envelope (or a dead letter),
produces the batch to Kafka, and only when Kafka acknowledged every record of the batch
sends the PUBACKs. A bridge that crashes before that loses nothing: the broker sends
the unacknowledged messages again on the next connection, and their ``event_id`` is
the same, so the pipeline's deduplication drops any copy that did reach Kafka.

Lifecycle: :meth:`MqttBridge.run` blocks until its stop event is set. While Kafka or
PostgreSQL is down it retries the same batch with backoff and acknowledges nothing;
the broker's receive maximum bounds how many messages wait meanwhile. When the broker
goes away the subscriber reconnects with backoff; messages of the lost connection are
dropped unacknowledged (they come again). :class:`MqttBridgeActor` runs one bridge on
a thread inside a Ray actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson

from adapters.devices import DeviceStore
from adapters.exceptions import Backpressure, StoreUnavailable
from adapters.kafka import Headers, Record
from adapters.mqtt import Inbound, Subscriber, SubscriberConfig
from adapters.publisher import EventPublisher, Outgoing, raw_headers
from adapters.source_stats import SourceStats
from core.dead_letters import dead_letter_headers
from core.device_telemetry import SOURCE, device_from_topic, telemetry_envelope
from core.envelope import partition_key, size_problem

log = logging.getLogger(__name__)

BRIDGE_NAME = "rayline-mqtt-bridge"


@dataclass(frozen=True)
class BridgeConfig:
    """Everything the bridge needs; built from the settings by the deployment."""

    mqtt_host: str
    mqtt_port: int
    username: str
    password: str = field(repr=False)
    client_id: str
    topic_filter: str
    session_expiry_seconds: int
    receive_maximum: int
    bootstrap: str
    raw_topic: str
    dlq_topic: str
    postgres_dsn: str = field(repr=False)
    redis_url: str = field(repr=False)
    linger_ms: int = 5
    queue_max_messages: int = 100_000
    batch_max_messages: int = 500
    batch_max_ms: int = 50
    max_payload_bytes: int = 256 * 1024


class DeviceTenants:
    """Device id to tenant, cached; reloaded when a device is missing, at most once per
    ``min_reload_s`` (so a stream from an unknown device does not hammer PostgreSQL)."""

    def __init__(
        self,
        load: Callable[[], dict[str, str]],
        min_reload_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._min_reload_s = min_reload_s
        self._clock = clock
        self._tenants: dict[str, str] = {}
        self._loaded_at: float | None = None

    def lookup(self, devices: set[str]) -> dict[str, str]:
        """The tenants of ``devices`` that are known (unknown ones are left out).

        Raises:
            StoreUnavailable: a reload was due and PostgreSQL did not answer.
        """
        now = self._clock()
        stale = self._loaded_at is None or now - self._loaded_at >= self._min_reload_s
        if stale and not devices <= self._tenants.keys():
            self._tenants = self._load()
            self._loaded_at = now
        return {d: self._tenants[d] for d in devices if d in self._tenants}


def route(
    message: Inbound, tenants: dict[str, str], max_payload_bytes: int
) -> tuple[Record | None, Record | None]:
    """(raw record, None) for a good message, (None, dead letter) for a bad one."""
    device = device_from_topic(message.topic)
    received = message.received_at_ms
    if device is None:
        reason = f"topic {message.topic!r} is not devices/<device>/telemetry"
    elif device not in tenants:
        reason = (
            f"device {device!r} is not registered or is disabled; add it with `rayline devices add`"
        )
    else:
        good, problem = _encode(device, tenants[device], message, max_payload_bytes)
        if good is not None:
            return good, None
        reason = f"device {device!r}: {problem}"
    origin = dead_letter_headers(
        "mqtt", reason, received, source=SOURCE, device=device or message.topic
    )
    dead: Headers = [(k, v) for k, v in origin]
    return None, (device.encode() if device else None, message.payload, dead)


def _encode(
    device: str, tenant: str, message: Inbound, max_payload_bytes: int
) -> tuple[Record | None, str | None]:
    """The raw record of a device's message, or why it can never be one.

    Anything a payload makes fail here is the payload's fault: it must become a dead
    letter (and be acknowledged), never an error that restarts the bridge, which would
    get the same QoS 1 message again and loop.
    """
    try:
        envelope, problem = telemetry_envelope(
            device, tenant, message.payload, message.received_at_ms, max_payload_bytes
        )
        if envelope is None:
            return None, problem
        data = orjson.dumps(envelope)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        log.warning("MQTT message of device %r cannot be processed: %r", device, exc)
        return None, f"payload cannot be processed: {type(exc).__name__}: {exc}"
    problem = size_problem(len(data))
    if problem is not None:
        return None, problem
    headers = raw_headers()  # each message is a trace of its own
    return (partition_key(envelope), data, headers), None


class MqttBridge:
    """Forwards device telemetry from MQTT to Kafka; see the module docstring."""

    def __init__(self, config: BridgeConfig) -> None:
        self._config = config
        self._state: dict[str, Any] = {
            "connected": False,
            "forwarded": 0,
            "dead_lettered": 0,
            "batches": 0,
            "restarts": 0,
            "last_error": None,
        }
        # Connection errors, appended on paho's thread and counted by the bridge loop.
        self._errors: list[str] = []

    def note_restart(self, error: BaseException) -> None:
        """Count a restart of :meth:`run` after ``error`` (shown in the status)."""
        self._state["restarts"] += 1
        self._state["last_error"] = f"restarted after: {error!r:.500}"

    def status(self) -> dict[str, Any]:
        return dict(self._state)

    def run(self, stop: threading.Event) -> None:
        """Forward until ``stop`` is set (blocks; run it on a thread of its own)."""
        asyncio.run(self._run(stop))

    def _subscriber(self, deliver: Callable[[Inbound], None]) -> Subscriber:
        c = self._config
        config = SubscriberConfig(
            host=c.mqtt_host,
            port=c.mqtt_port,
            username=c.username,
            password=c.password,
            client_id=c.client_id,
            topic_filter=c.topic_filter,
            session_expiry_seconds=c.session_expiry_seconds,
            receive_maximum=c.receive_maximum,
        )
        return Subscriber(config, deliver, self._on_state)

    def _on_state(self, connected: bool, error: str | None) -> None:
        self._state["connected"] = connected
        if error is not None:
            self._state["last_error"] = error
            self._errors.append(error)
            log.warning("%s", error)

    async def _run(self, stop: threading.Event) -> None:
        c = self._config
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Inbound] = asyncio.Queue()

        def deliver(message: Inbound) -> None:
            # Once the bridge stopped, a late message stays unacknowledged and comes again.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(inbox.put_nowait, message)

        io = ThreadPoolExecutor(1, thread_name_prefix="mqtt-bridge-io")
        store = DeviceStore(c.postgres_dsn)
        stats = SourceStats(c.redis_url)
        publisher = EventPublisher.connect(
            c.bootstrap,
            c.raw_topic,
            c.dlq_topic,
            linger_ms=c.linger_ms,
            queue_max_messages=c.queue_max_messages,
        )
        subscriber = self._subscriber(deliver)
        run = _BatchRun(self, subscriber, publisher, DeviceTenants(store.tenants), stats, io)
        subscriber.start()
        try:
            while not stop.is_set():
                batch = await run.collect(inbox)
                if batch:
                    await run.forward(batch, stop)
                await run.report_errors()
        finally:
            subscriber.stop()
            publisher.close()
            await loop.run_in_executor(io, store.close)
            stats.close()
            io.shutdown(wait=True)


class _BatchRun:
    """The bridge's loop state while it runs: collect, forward, acknowledge, count."""

    def __init__(
        self,
        bridge: MqttBridge,
        subscriber: Subscriber,
        publisher: EventPublisher,
        tenants: DeviceTenants,
        stats: SourceStats,
        io: ThreadPoolExecutor,
    ) -> None:
        self.bridge = bridge
        self.config = bridge._config
        self.subscriber = subscriber
        self.publisher = publisher
        self.tenants = tenants
        self.stats = stats
        self.io = io

    async def collect(self, inbox: asyncio.Queue[Inbound]) -> list[Inbound]:
        """Up to ``batch_max_messages`` of the current connection, waiting at most
        ``batch_max_ms`` after the first."""
        try:
            batch = [await asyncio.wait_for(inbox.get(), timeout=0.2)]
        except TimeoutError:
            return []
        deadline = time.monotonic() + self.config.batch_max_ms / 1000
        while len(batch) < self.config.batch_max_messages:
            if not inbox.empty():
                batch.append(inbox.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(inbox.get(), timeout=remaining))
            except TimeoutError:
                break
        return self._current(batch)

    def _current(self, batch: list[Inbound]) -> list[Inbound]:
        generation = self.subscriber.generation
        return [m for m in batch if m.generation == generation]

    async def forward(self, batch: list[Inbound], stop: threading.Event) -> None:
        """Produce ``batch`` and acknowledge it; retry with backoff until it is done,
        its connection is gone, or the bridge stops."""
        delay = 0.5
        while batch and not stop.is_set():
            try:
                raw, dead = await self._records(batch)
                await self.publisher.publish(Outgoing(raw, dead))
            except Backpressure as exc:
                await asyncio.sleep(exc.retry_after)
            except StoreUnavailable as exc:
                await self._record(errors=1, error=f"MQTT bridge: {exc}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            else:
                for message in batch:
                    self.subscriber.ack(message)
                await self._record(accepted=len(raw), rejected=len(dead))
                self._count(len(raw), len(dead))
                return
            batch = self._current(batch)

    async def _records(self, batch: list[Inbound]) -> tuple[list[Record], list[Record]]:
        devices = {d for d in (device_from_topic(m.topic) for m in batch) if d is not None}
        loop = asyncio.get_running_loop()
        tenants = await loop.run_in_executor(self.io, self.tenants.lookup, devices)
        raw: list[Record] = []
        dead: list[Record] = []
        for message in batch:
            good, bad = route(message, tenants, self.config.max_payload_bytes)
            if good is not None:
                raw.append(good)
            if bad is not None:
                dead.append(bad)
        return raw, dead

    def _count(self, forwarded: int, dead_lettered: int) -> None:
        state = self.bridge._state
        state["forwarded"] += forwarded
        state["dead_lettered"] += dead_lettered
        state["batches"] += 1

    async def report_errors(self) -> None:
        """Count the subscriber's connection errors (they arrive on paho's thread)."""
        errors = self.bridge._errors
        if errors:
            last, count = errors[-1], len(errors)
            del errors[:count]
            await self._record(errors=count, error=last)

    async def _record(self, **counts: Any) -> None:
        now_ms = int(time.time() * 1000)

        def record() -> None:
            self.stats.record(SOURCE, now_ms=now_ms, **counts)

        await asyncio.get_running_loop().run_in_executor(self.io, record)
        if "error" in counts:
            self.bridge._state["last_error"] = counts["error"]


class MqttBridgeActor:
    """Ray actor body: one :class:`MqttBridge` on a thread of its own."""

    def __init__(self, config: BridgeConfig) -> None:
        self._stop = threading.Event()
        self._bridge = MqttBridge(config)
        self._thread = threading.Thread(target=self._run, name="mqtt-bridge", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # A bug must not end the bridge for good: start it again after a pause (its
        # unacknowledged messages come again from the broker).
        while not self._stop.is_set():
            try:
                self._bridge.run(self._stop)
            except Exception as exc:
                log.exception("MQTT bridge failed; starting it again in 5 s")
                self._bridge.note_restart(exc)
                self._stop.wait(5.0)

    def status(self) -> dict[str, Any]:
        return {**self._bridge.status(), "running": self._thread.is_alive()}

    def stop(self) -> None:
        """Finish the batch in flight and stop (its messages stay unacknowledged)."""
        self._stop.set()
        self._thread.join(timeout=30)

    def start(self) -> None:
        """Run again after :meth:`stop`, on the same broker session."""
        if self._thread.is_alive():
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mqtt-bridge", daemon=True)
        self._thread.start()
