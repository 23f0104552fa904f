"""Kafka Connect in the local stack: the worker's settings and its own topics."""

from __future__ import annotations

import os
from pathlib import Path

from adapters.kafka import TopicSpec
from cluster.processes import log4j2_console
from cluster.settings import Settings

# Kafka Connect's own compacted topics: connector configs, source offsets, states.
TOPICS = {
    "config": "rayline-connect-configs",
    "offset": "rayline-connect-offsets",
    "status": "rayline-connect-status",
}


def worker_properties(s: Settings) -> str:
    """Kafka Connect in distributed mode, one worker, JSON with schemas (for the types)."""
    c = s.cdc
    lines = [
        f"bootstrap.servers={s.kafka.bootstrap}",
        "group.id=rayline-connect",
        "key.converter=org.apache.kafka.connect.json.JsonConverter",
        "value.converter=org.apache.kafka.connect.json.JsonConverter",
        "key.converter.schemas.enable=true",
        "value.converter.schemas.enable=true",
        f"listeners=http://{c.host}:{c.port}",
        f"rest.advertised.host.name={c.host}",
        f"rest.advertised.port={c.port}",
        "offset.flush.interval.ms=1000",
        "topic.creation.enable=true",
        # Connectors are on the class path; no plugin.path to scan.
        "plugin.discovery=only_scan",
        # Connector configs name secrets as ${file:<path>:<key>}: the stored config (its
        # topic, the REST API's answers, the logs) holds the reference, not the secret.
        "config.providers=file",
        "config.providers.file.class=org.apache.kafka.common.config.provider.FileConfigProvider",
    ]
    for kind, topic in TOPICS.items():
        lines += [f"{kind}.storage.topic={topic}", f"{kind}.storage.replication.factor=1"]
    lines += ["offset.storage.partitions=1", "status.storage.partitions=1", ""]
    return "\n".join(lines)


def topic_specs() -> list[TopicSpec]:
    """Connect's topics, compacted (it keeps the latest config, offset and state per key)."""
    return [TopicSpec(t, 1, {"cleanup.policy": "compact"}) for t in TOPICS.values()]


def secrets_path(settings: Settings) -> Path:
    """The local worker's secrets file (mode 0600), read through its ``file`` provider."""
    return settings.paths.state_dir / "connect" / "secrets.properties"


def password_reference(settings: Settings) -> str:
    """What a connector config says instead of PostgreSQL's password."""
    return "${file:" + str(secrets_path(settings)) + ":postgres.password}"


def write_config(settings: Settings, home: Path) -> None:
    """The worker's properties, its logging setup and its secrets under ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "worker.properties").write_text(worker_properties(settings))
    (home / "log4j2.properties").write_text(log4j2_console({"org.reflections": "ERROR"}))
    password = settings.postgres.password
    text = "" if password is None else f"postgres.password={password.get_secret_value()}\n"
    tmp = secrets_path(settings).with_name("secrets.properties.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(secrets_path(settings))
