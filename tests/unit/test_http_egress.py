"""The poller's HTTP GET: pinned to the checked address, capped in size and time.

httpx's own in-memory transport stands in for the network; real sockets are exercised by
tests/security/test_poller_ssrf.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from adapters.http_egress import RequestTooSlow, ResponseTooLarge, get, make_client
from core.egress import EgressPolicy, EgressRefused, make_policy

POLICY = make_policy(max_response_bytes=1024, max_request_seconds=5)


class Api:
    """Answers every request with ``body`` (bytes, or an iterator of chunks)."""

    def __init__(self, body: bytes | Iterator[bytes], headers: dict[str, str] | None = None):
        self.body = body
        self.headers = headers or {}
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        return httpx.Response(200, headers=self.headers, content=self.body)


def client(api: Api) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(api), follow_redirects=False)


def test_a_request_goes_to_the_checked_address_with_the_name_in_host():
    api = Api(b'{"data": []}')
    answer = get(client(api), "http://8.8.8.8:8080/items?x=1", [("Authorization", "t")], POLICY)
    assert (answer.status, answer.content) == (200, b'{"data": []}')
    (sent,) = api.seen
    assert (sent.url.host, sent.url.port, sent.url.query) == ("8.8.8.8", 8080, b"x=1")
    assert sent.headers["host"] == "8.8.8.8:8080"
    assert sent.headers["authorization"] == "t"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
    ],
)
def test_a_denied_address_is_never_contacted(url):
    api = Api(b"[]")
    with pytest.raises(EgressRefused, match=r"polling\.allowed_hosts"):
        get(client(api), url, [], EgressPolicy())
    assert api.seen == []


def test_an_allowlisted_loopback_is_reached():
    api = Api(b"[]")
    policy = make_policy(["127.0.0.1"])
    assert get(client(api), "http://127.0.0.1:9/x", [], policy).content == b"[]"


def test_a_declared_length_over_the_cap_is_refused_before_reading():
    api = Api(b"x" * 2048)
    with pytest.raises(ResponseTooLarge, match=r"declares 2048 bytes, over polling\.max_resp"):
        get(client(api), "http://8.8.8.8/", [], POLICY)


def test_a_streamed_body_over_the_cap_is_cut_off():
    def chunks() -> Iterator[bytes]:
        while True:  # never ends: only the cap stops it
            yield b"x" * 100

    with pytest.raises(ResponseTooLarge, match="sent more than 1024 bytes"):
        get(client(Api(chunks())), "http://8.8.8.8/", [], POLICY)


def test_a_body_at_the_cap_is_read_whole():
    answer = get(client(Api(b"y" * 1024)), "http://8.8.8.8/", [], POLICY)
    assert len(answer.content) == 1024


def test_a_slow_body_is_abandoned_at_the_time_limit():
    def slow() -> Iterator[bytes]:
        for _ in range(50):
            time.sleep(0.05)
            yield b"z"

    policy = make_policy(max_request_seconds=0.2)
    started = time.monotonic()
    with pytest.raises(RequestTooSlow, match=r"polling\.max_request_seconds \(0\.2 s\)"):
        get(client(Api(slow())), "http://8.8.8.8/", [], policy)
    assert time.monotonic() - started < 1.0


def test_the_default_client_follows_no_redirect_and_no_proxy():
    made = make_client(EgressPolicy(max_request_seconds=3), timeout_seconds=10)
    assert made.follow_redirects is False
    assert made.timeout.read == 3
    assert made.trust_env is False
    made.close()
