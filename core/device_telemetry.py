"""Device telemetry over MQTT: topic to device, payload to envelope.

A device publishes one JSON object per message on ``devices/<device>/telemetry``.
The envelope takes its identity from the broker, never from the payload: ``source`` is
``mqtt``, ``entity`` the device id (its MQTT user name, which the broker's ACL ties to
the topic), ``tenant`` the device's tenant. From the payload come:

=========== =================================================================
payload     envelope
=========== =================================================================
event_id    ``event_id``, else ``id``, else ``<device>-<sha256 of payload>``
type        ``type``, else ``telemetry``
ts          ``ts`` (RFC 3339 or epoch seconds), else the receive time
value       ``value`` when it is a number
attributes  ``attributes`` (an object) merged with every other field
=========== =================================================================

A redelivered message (same device, same bytes) gets the same ``event_id``, so the
pipeline's deduplication drops the copy.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import orjson

from core.envelope import validate_events

SOURCE = "mqtt"
DEFAULT_TYPE = "telemetry"
MAX_DEVICE_LEN = 128
_DEVICE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_TOPIC_RE = re.compile(r"^devices/([^/]+)/telemetry$")
_TAKEN = frozenset({"event_id", "id", "type", "ts", "value", "attributes"})


def device_problem(device: str) -> str | None:
    """What is wrong with a device id (it is an MQTT user name and a topic level)."""
    if _DEVICE_RE.match(device):
        return None
    return (
        f"device id expected 1 to {MAX_DEVICE_LEN} letters, digits or _.- "
        f"(no '/', '+', '#', ':' or spaces), got {device!r}"
    )


def device_from_topic(topic: str) -> str | None:
    """The device of ``devices/<device>/telemetry``, or None for any other topic."""
    found = _TOPIC_RE.match(topic)
    if found is None or device_problem(found.group(1)) is not None:
        return None
    return found.group(1)


def payload_event_id(device: str, payload: bytes) -> str:
    """A deterministic id for a payload that names none: same device and bytes, same id."""
    digest = hashlib.sha256(device.encode() + b"\x00" + payload).hexdigest()[:32]
    return f"{device}-{digest}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def raw_event(
    device: str, tenant: str, body: dict[str, Any], payload: bytes, received_at_ms: int
) -> dict[str, Any]:
    """The raw event (for :func:`core.envelope.validate_events`) of one decoded payload."""
    event_id = body.get("event_id", body.get("id"))
    if isinstance(event_id, int) and not isinstance(event_id, bool):
        event_id = str(event_id)
    nested = body.get("attributes")
    attributes: dict[str, Any] = dict(nested) if isinstance(nested, dict) else {}
    if nested is not None and not isinstance(nested, dict):
        attributes["attributes"] = nested
    attributes.update({k: v for k, v in body.items() if k not in _TAKEN})
    value = body.get("value")
    if value is not None and not _is_number(value):
        attributes["value"] = value
    event: dict[str, Any] = {
        "event_id": event_id if event_id is not None else payload_event_id(device, payload),
        "source": SOURCE,
        "tenant": tenant,
        "entity": device,
        "type": body.get("type", DEFAULT_TYPE),
        "ts": body.get("ts", received_at_ms / 1000),
        "attributes": attributes,
    }
    if _is_number(value):
        event["value"] = value
    return event


def telemetry_envelope(
    device: str, tenant: str, payload: bytes, received_at_ms: int, max_bytes: int
) -> tuple[dict[str, Any] | None, str | None]:
    """(envelope, None) for a good payload, (None, reason) for one to dead-letter."""
    if len(payload) > max_bytes:
        return None, f"payload of {len(payload)} bytes is over the limit of {max_bytes} bytes"
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        return None, f"payload is not JSON ({exc}); send one JSON object per message"
    if not isinstance(body, dict):
        return None, f"payload expected a JSON object, got {type(body).__name__}"
    event = raw_event(device, tenant, body, payload, received_at_ms)
    envelopes, errors = validate_events(
        [event], default_source=SOURCE, received_at_ms=received_at_ms
    )
    if errors:
        return None, "; ".join(f"field '{e.field}' {e.message}" for e in errors)
    return envelopes[0], None
