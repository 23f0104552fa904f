"""MQTT through paho-mqtt 2.x: device password hashes, a broker probe, a QoS 1 subscriber.

Nothing above this module sees a paho error code: a probe answers with a reason code or
``False``, and the subscriber reports connection trouble as text through ``on_state``
while it reconnects on its own.

Password hashes use Mosquitto 2's PBKDF2-SHA512 form, ``$7$<iterations>$<salt>$<hash>``
(salt and hash in standard base64), the form ``mosquitto_passwd`` writes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

HASH_ITERATIONS = 101  # mosquitto_passwd's default; passwords are 192-bit random
_SALT_BYTES = 12


def new_device_password() -> str:
    """A strong random password (192 bits), safe in a shell and a password file."""
    return secrets.token_urlsafe(24)


def password_hash(
    password: str, *, salt: bytes | None = None, iterations: int = HASH_ITERATIONS
) -> str:
    """The Mosquitto 2 password-file hash (``$7$...``) of ``password``."""
    salt = os.urandom(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def password_matches(password: str, hashed: str) -> bool:
    """True when ``hashed`` (a ``$7$`` hash) is the hash of ``password``."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        raise ValueError(f"expected a Mosquitto $7$ hash, got {hashed[:12]!r}...")
    salt = base64.b64decode(parts[3])
    expected = password_hash(password, salt=salt, iterations=int(parts[2]))
    return hmac.compare_digest(expected, hashed)


def password_file_text(users: list[tuple[str, str]]) -> str:
    """The text of a Mosquitto password file: one ``user:hash`` line per (user, hash)."""
    for user, hashed in users:
        if ":" in user or "\n" in user or not hashed.startswith("$7$"):
            raise ValueError(f"user {user!r}: expected a name without ':' and a $7$ hash")
    return "".join(f"{user}:{hashed}\n" for user, hashed in users)


def _client(client_id: str = "", *, manual_ack: bool = False) -> mqtt.Client:
    return mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )


def connect_result(
    host: str, port: int, username: str, password: str, timeout: float = 3.0
) -> ReasonCode | None:
    """The broker's answer to a CONNECT with these credentials (None: no answer)."""
    client = _client()
    client.username_pw_set(username, password)
    answer: list[ReasonCode] = []
    client.on_connect = lambda _c, _u, _f, code, _p: answer.append(code)
    try:
        client.connect(host, port, keepalive=10)
    except OSError:
        return None
    deadline = time.monotonic() + timeout
    try:
        while not answer and time.monotonic() < deadline:
            if client.loop(timeout=0.1) not in (MQTTErrorCode.MQTT_ERR_SUCCESS,):
                break
    finally:
        client.disconnect()
    return answer[0] if answer else None


def broker_answers(host: str, port: int, username: str, password: str) -> bool:
    """True when the broker accepts a CONNECT with these credentials."""
    code = connect_result(host, port, username, password)
    return code is not None and not code.is_failure


@dataclass(frozen=True, slots=True)
class Inbound:
    """One received QoS 1 message; ``generation`` is the connection it came on."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int
    received_at_ms: int


@dataclass
class SubscriberConfig:
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    client_id: str
    topic_filter: str
    session_expiry_seconds: int
    receive_maximum: int
    keepalive_seconds: int = 30


class Subscriber:
    """A persistent-session QoS 1 subscriber with manual acknowledgement.

    Messages go to ``deliver`` (called on paho's network thread). :meth:`ack` sends the
    PUBACK of a message only when it came on the current connection: after a reconnect
    the broker sends every unacknowledged message again, and acknowledging an old
    packet id could acknowledge a different, new message that reused it.
    Reconnects with backoff (1 s doubling to 30 s) whenever the broker goes away.
    """

    def __init__(
        self,
        config: SubscriberConfig,
        deliver: Callable[[Inbound], None],
        on_state: Callable[[bool, str | None], None] = lambda _up, _why: None,
    ) -> None:
        self._config = config
        self._deliver = deliver
        self._on_state = on_state
        self._generation = 0
        self._connected = threading.Event()
        self._lock = threading.Lock()
        client = _client(config.client_id, manual_ack=True)
        client.username_pw_set(config.username, config.password)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client

    @property
    def generation(self) -> int:
        return self._generation

    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._config.session_expiry_seconds
        props.ReceiveMaximum = self._config.receive_maximum
        self._client.connect_async(
            self._config.host,
            self._config.port,
            keepalive=self._config.keepalive_seconds,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    def ack(self, message: Inbound) -> bool:
        """PUBACK ``message``; False when its connection is gone (it will come again)."""
        with self._lock:
            if message.generation != self._generation or not self._connected.is_set():
                return False
            code = self._client.ack(message.mid, message.qos)
        return code == MQTTErrorCode.MQTT_ERR_SUCCESS

    # paho callbacks (network thread) --------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, _u: Any, _flags: Any, code: ReasonCode, _p: Any
    ) -> None:
        if code.is_failure:
            self._on_state(False, f"MQTT broker refused the bridge's CONNECT: {code}")
            return
        with self._lock:
            self._generation += 1
            self._connected.set()
        result, _mid = client.subscribe(self._config.topic_filter, qos=1)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._on_state(False, f"subscribing to {self._config.topic_filter!r} failed: {result}")
            return
        self._on_state(True, None)

    def _on_disconnect(
        self, _client: mqtt.Client, _u: Any, _flags: Any, code: ReasonCode, _p: Any
    ) -> None:
        with self._lock:
            self._connected.clear()
        if code.is_failure:
            self._on_state(False, f"MQTT connection lost: {code}")

    def _on_message(self, _client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self._deliver(
            Inbound(
                topic=msg.topic,
                payload=bytes(msg.payload),
                mid=msg.mid,
                qos=msg.qos,
                generation=self._generation,
                received_at_ms=int(time.time() * 1000),
            )
        )
