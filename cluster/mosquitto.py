"""MQTT wiring: the local Mosquitto broker's files, and the bridge's configuration.

Everything lives in ``<state>/mosquitto/``. The password file is written from
PostgreSQL (the bridge's user plus every enabled device) by ``rayline up`` and by
``rayline devices add/remove``; a running broker re-reads it on SIGHUP.
:func:`bridge_config` turns the settings into the MQTT bridge actor's configuration.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

from actors.mqtt_bridge import BridgeConfig
from adapters.devices import DeviceStore
from adapters.mqtt import password_file_text, password_hash
from cluster.settings import Settings

# Queued messages are written to disk this often (and on a clean stop); a broker crash
# loses what arrived since the last save.
AUTOSAVE_SECONDS = 5
MAX_PACKET_BYTES = 1024 * 1024


def home(settings: Settings) -> Path:
    return settings.paths.state_dir / "mosquitto"


def config_path(settings: Settings) -> Path:
    return home(settings) / "mosquitto.conf"


def password_path(settings: Settings) -> Path:
    return home(settings) / "passwd"


def _write(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace ``path`` atomically: the broker never reads half a file. The file gets
    its folder's owner, so a broker that dropped to its own user can re-read it."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    folder = path.parent.stat()
    if os.geteuid() == 0:
        os.chown(tmp, folder.st_uid, folder.st_gid)
    tmp.replace(path)


def config_text(settings: Settings, user: str | None = None) -> str:
    """The broker's configuration; ``user``: the one it drops to when started by root."""
    m = settings.mqtt
    base = home(settings)
    lines = [
        "per_listener_settings false",
        f"listener {m.port} {m.host}",
        "allow_anonymous false",
        f"password_file {base / 'passwd'}",
        f"acl_file {base / 'acl'}",
        "persistence true",
        f"persistence_location {base / 'data'}/",
        f"autosave_interval {AUTOSAVE_SECONDS}",
        # The bridge's persistent session queues everything while the bridge is away.
        "max_queued_messages 1000000",
        "max_queued_bytes 0",
        "max_inflight_messages 1000",
        f"max_packet_size {MAX_PACKET_BYTES}",
        f"log_dest file {settings.paths.state_dir / 'logs' / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    if os.geteuid() == 0:
        # Drop to the package's `mosquitto` user, or stay root when it cannot reach the
        # state folder (a clone under a private home directory).
        lines.append(f"user {user or 'root'}")
    return "\n".join(lines) + "\n"


def acl_text(settings: Settings) -> str:
    m = settings.mqtt
    return (
        f"user {m.bridge_username}\n"
        f"topic read {m.topic_filter}\n"
        "\n"
        "# every device may publish on its own topic only\n"
        "pattern write devices/%u/telemetry\n"
    )


def prepare(settings: Settings, user: str | None = None) -> None:
    """Write the configuration and ACL; a first password file holds the bridge only.

    Args:
        settings: The settings.
        user: The user the broker runs as (started by root); its folder, files and
            log file become that user's.
    """
    base = home(settings)
    (base / "data").mkdir(parents=True, exist_ok=True)
    log = settings.paths.state_dir / "logs" / "mosquitto.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.touch()
    if user is not None:
        for path in [base, *base.rglob("*"), log]:
            shutil.chown(path, user, user)
    _write(base / "mosquitto.conf", config_text(settings, user), 0o644)
    _write(base / "acl", acl_text(settings))
    if not password_path(settings).exists():
        write_passwords(settings, [])


def write_passwords(settings: Settings, devices: list[tuple[str, str]]) -> None:
    """Write the password file: the bridge's user, then ``devices`` (id, hash)."""
    m = settings.mqtt
    bridge = (m.bridge_username, password_hash(m.bridge_password.get_secret_value()))
    password_path(settings).parent.mkdir(parents=True, exist_ok=True)
    _write(password_path(settings), password_file_text([bridge, *devices]))


def sync_devices(settings: Settings, broker_pid: int | None) -> int:
    """Write the password file from PostgreSQL and make a running broker re-read it.

    Returns:
        The number of enabled devices written.
    """
    store = DeviceStore(settings.postgres.dsn())
    try:
        devices = store.credentials()
    finally:
        store.close()
    write_passwords(settings, devices)
    if broker_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(broker_pid, signal.SIGHUP)
    return len(devices)


def bridge_config(settings: Settings) -> BridgeConfig:
    """The :class:`~actors.mqtt_bridge.MqttBridgeActor`'s configuration."""
    m, k = settings.mqtt, settings.kafka
    return BridgeConfig(
        mqtt_host=m.host,
        mqtt_port=m.port,
        username=m.bridge_username,
        password=m.bridge_password.get_secret_value(),
        client_id=m.client_id,
        topic_filter=m.topic_filter,
        session_expiry_seconds=m.session_expiry_seconds,
        receive_maximum=m.receive_maximum,
        bootstrap=k.bootstrap,
        raw_topic=k.raw_topic,
        dlq_topic=k.dlq_topic,
        postgres_dsn=settings.postgres.dsn(),
        redis_url=settings.redis.url(),
        linger_ms=k.producer_linger_ms,
        queue_max_messages=k.producer_queue_max_messages,
        batch_max_messages=m.batch_max_messages,
        batch_max_ms=m.batch_max_ms,
        max_payload_bytes=m.max_payload_bytes,
    )
