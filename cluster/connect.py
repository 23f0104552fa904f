"""Kafka Connect in the local stack: the worker's settings and its own topics."""

from __future__ import annotations

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
    ]
    for kind, topic in TOPICS.items():
        lines += [f"{kind}.storage.topic={topic}", f"{kind}.storage.replication.factor=1"]
    lines += ["offset.storage.partitions=1", "status.storage.partitions=1", ""]
    return "\n".join(lines)


def topic_specs() -> list[TopicSpec]:
    """Connect's topics, compacted (it keeps the latest config, offset and state per key)."""
    return [TopicSpec(t, 1, {"cleanup.policy": "compact"}) for t in TOPICS.values()]


def write_config(settings: Settings, home: Path) -> None:
    """The worker's properties and its logging setup under ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "worker.properties").write_text(worker_properties(settings))
    (home / "log4j2.properties").write_text(log4j2_console({"org.reflections": "ERROR"}))
