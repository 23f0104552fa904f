"""The shared publishing path's records: keys, values, headers and dead letters.

Every ingest source hands its batch to ``adapters.publisher``; what it writes is what
the workers and the dead-letter tools read, whichever source the events came from.
"""

from __future__ import annotations

from typing import Any

import orjson

from adapters.publisher import Outgoing, envelope_keys, new_traceparent, raw_headers
from core.envelope import ENVELOPE_SCHEMA, MAX_EVENT_BYTES, partition_key, validate_events

NOW_MS = 1_790_000_000_000


def envelopes(n: int, **change: Any) -> list[dict[str, Any]]:
    items = [
        {"event_id": f"e{i}", "tenant": "acme", "type": "click", "ts": NOW_MS / 1000, **change}
        for i in range(n)
    ]
    found, errors = validate_events(items, default_source="api", received_at_ms=NOW_MS)
    assert errors == []
    return found


def test_keys_are_the_partition_keys_of_each_envelope() -> None:
    batch = envelopes(3) + envelopes(1, entity="pump-7")
    assert envelope_keys(batch) == [partition_key(e) for e in batch]


def test_records_carry_the_envelope_as_json_and_the_batch_headers() -> None:
    out = Outgoing()
    headers = raw_headers(None, ("origin.upload", b"u1"))
    assert out.add_envelopes(envelopes(2), headers) == []
    assert [orjson.loads(value)["event_id"] for _, value, _ in out.raw] == ["e0", "e1"]
    assert [key for key, _, _ in out.raw] == [b"acme:e0", b"acme:e1"]
    names = [name for name, _ in out.raw[0][2]]
    assert names == ["schema", "traceparent", "origin.upload"]
    assert out.raw[0][2][0] == ("schema", ENVELOPE_SCHEMA.encode())


def test_a_caller_trace_is_kept_and_a_new_one_is_well_formed() -> None:
    given = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert dict(raw_headers(given))["traceparent"] == given
    fresh = new_traceparent().decode()
    version, trace, span, flags = fresh.split("-")
    assert (version, len(trace), len(span), flags) == ("00", 32, 16, "01")


def test_an_envelope_that_cannot_be_written_is_refused_by_position() -> None:
    good = envelopes(3)
    good[1]["attributes"] = {"blob": "x" * MAX_EVENT_BYTES}
    good[2]["attributes"] = {"n": 2**70}  # beyond what JSON writers take
    out = Outgoing()
    refused = out.add_envelopes(good, raw_headers())
    assert [position for position, _ in refused] == [1, 2]
    assert "at most 524,288 bytes" in refused[0][1]
    assert "cannot be written as JSON" in refused[1][1]
    assert [orjson.loads(v)["event_id"] for _, v, _ in out.raw] == ["e0"]


def test_a_dead_letter_says_why_where_and_when() -> None:
    out = Outgoing()
    out.dead_letter("poll", "field 'ts' is required", b"{}", NOW_MS, source="crm", index=7)
    key, value, headers = out.dead[0]
    assert (key, value) == (None, b"{}")
    assert dict(headers) == {
        "reason": b"field 'ts' is required",
        "stage": b"poll",
        "origin.index": b"7",
        "origin.source": b"crm",
        "received_at": str(NOW_MS).encode(),
    }
