"""The poller's egress policy: which addresses it may reach, and which links it follows."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from core.egress import (
    EgressPolicy,
    EgressRefused,
    address_problem,
    checked_address,
    ip_literal,
    make_policy,
    origin,
    require_same_origin,
)
from core.exceptions import ConfigurationError

ip = ipaddress.ip_address

DENIED = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("169.254.169.254", "link-local"),  # cloud metadata
    ("169.254.0.1", "link-local"),
    ("fe80::1", "link-local"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fec0::1", "private"),
    ("100.64.0.1", "shared (carrier-grade NAT)"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("240.0.0.1", "private"),
    ("255.255.255.255", "private"),
    ("192.0.2.1", "private"),  # documentation
    ("198.18.0.1", "private"),  # benchmarking
    ("::ffff:127.0.0.1", "loopback (embedded in IPv6)"),
    ("::ffff:169.254.169.254", "link-local (embedded in IPv6)"),
    ("::ffff:10.1.2.3", "private (embedded in IPv6)"),
    ("2002:7f00:1::", "loopback (embedded in IPv6)"),  # 6to4 of 127.0.0.1
    ("2002:a00:1::", "private (embedded in IPv6)"),  # 6to4 of 10.0.0.1
    ("64:ff9b::7f00:1", "loopback (embedded in IPv6)"),  # NAT64 of 127.0.0.1
    ("64:ff9b::a9fe:a9fe", "link-local (embedded in IPv6)"),
    ("::7f00:1", "reserved"),  # IPv4-compatible, deprecated
    ("2001:db8::1", "private"),  # documentation
]
ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "140.82.112.3",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "2002:808:808::",
    "64:ff9b::808:808",
]


@pytest.mark.parametrize(("address", "kind"), DENIED)
def test_non_public_addresses_are_named(address, kind):
    assert address_problem(ip(address)) == kind


@pytest.mark.parametrize("address", ALLOWED)
def test_global_addresses_are_allowed(address):
    assert address_problem(ip(address)) is None
    assert checked_address("api.example.com", [ip(address)], EgressPolicy()) == ip(address)


@pytest.mark.parametrize(("address", "kind"), DENIED)
def test_the_default_policy_refuses_and_says_how_to_allow(address, kind):
    with pytest.raises(EgressRefused) as info:
        checked_address("internal.example", [ip(address)], EgressPolicy())
    message = str(info.value)
    assert f"resolves to {ip(address)}, a {kind} address" in message
    assert "polling.allowed_hosts" in message
    assert "RAYLINE_POLLING__ALLOWED_HOSTS='[\"internal.example\"]'" in message


@pytest.mark.parametrize(
    ("spelling", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0251.0376.0251.0376", "169.254.169.254"),
        ("2852039166", "169.254.169.254"),
        ("0", "0.0.0.0"),
        ("[::1]", "::1"),
        ("::ffff:7f00:1", "::ffff:127.0.0.1"),
        ("fe80::1%eth0", "fe80::1"),
    ],
)
def test_ip_literals_in_every_spelling_the_c_library_accepts(spelling, address):
    assert ip_literal(spelling) == ip(address)
    if ":" not in spelling:
        assert socket.inet_ntoa(socket.inet_aton(spelling)) == address
    assert address_problem(ip(address)) is not None


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "localhost",
        "127.0.0.1.nip.io",
        "1.2.3.4.5",
        "256.1.1.1",
        "0x",
        "09.1.1.1",
        "1..1",
        "4294967296",
        "",
        "[not-v6]",
        "1.2.65536",
    ],
)
def test_names_and_impossible_numbers_are_not_literals(host):
    assert ip_literal(host) is None
    if host and ":" not in host:  # and the C library agrees
        with pytest.raises(OSError, match="illegal IP address"):
            socket.inet_aton(host)


def test_every_resolved_address_is_checked_not_only_the_first():
    with pytest.raises(EgressRefused, match=r"10\.0\.0\.5, a private address"):
        checked_address("rebind.example", [ip("8.8.8.8"), ip("10.0.0.5")], EgressPolicy())
    with pytest.raises(EgressRefused, match="resolved to no address"):
        checked_address("empty.example", [], EgressPolicy())


def test_allowlisted_hosts_and_networks_pass():
    policy = make_policy(["127.0.0.1", "Metrics.Internal", "[::1]"], ["10.0.0.0/8", "fd00::/8"])
    assert checked_address("127.0.0.1", [ip("127.0.0.1")], policy) == ip("127.0.0.1")
    assert checked_address("metrics.internal", [ip("192.168.0.7")], policy)
    assert checked_address("::1", [ip("::1")], policy)
    assert checked_address("a.internal", [ip("10.9.8.7")], policy)
    assert checked_address("a.internal", [ip("::ffff:10.9.8.7")], policy)
    assert checked_address("a.internal", [ip("fd00::7")], policy)
    with pytest.raises(EgressRefused, match=r"127\.0\.0\.2, a loopback"):
        checked_address("127.0.0.2", [ip("127.0.0.2")], policy)
    with pytest.raises(EgressRefused, match=r"192\.168\.0\.7"):
        checked_address("a.internal", [ip("10.0.0.1"), ip("192.168.0.7")], policy)


@pytest.mark.parametrize(
    ("hosts", "networks", "limits", "match"),
    [
        ([], ["10.0.0.0/33"], {}, "polling.allowed_networks holds '10.0.0.0/33'"),
        ([], ["intranet"], {}, "expected a network"),
        ([], [], {"max_response_bytes": 0}, "must be positive"),
        ([], [], {"max_request_seconds": 0.0}, "must be positive"),
    ],
)
def test_bad_policy_settings_are_named(hosts, networks, limits, match):
    with pytest.raises(ConfigurationError, match=match):
        make_policy(hosts, networks, **limits)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://API.example.com/x", ("https", "api.example.com", 443)),
        ("http://api.example.com/x", ("http", "api.example.com", 80)),
        ("http://api.example.com:8080/x?y#z", ("http", "api.example.com", 8080)),
        ("http://user:pw@[::1]:81/", ("http", "::1", 81)),
    ],
)
def test_origins(url, expected):
    assert origin(url) == expected


@pytest.mark.parametrize("url", ["ftp://h/x", "file:///etc/passwd", "http:///x", "http://h:99999/"])
def test_urls_without_an_http_origin_are_refused(url):
    with pytest.raises(EgressRefused):
        origin(url)


CONFIGURED = "https://api.example.com/v1/items"


@pytest.mark.parametrize(
    "link",
    [
        "https://api.example.com/v1/items?page=2",
        "https://API.EXAMPLE.COM:443/other/path",
    ],
)
def test_links_within_the_origin_are_followed(link):
    require_same_origin(link, CONFIGURED)


@pytest.mark.parametrize(
    "link",
    [
        "https://evil.example/collect",
        "http://api.example.com/v1/items?page=2",  # downgrade to cleartext
        "https://api.example.com:8443/v1/items",
        "https://api.example.com.evil.example/v1",
        "https://api.example.com@evil.example/v1",
        "https://169.254.169.254/latest/meta-data/",
    ],
)
def test_links_to_another_origin_are_refused_with_the_reason(link):
    with pytest.raises(
        EgressRefused, match=r"leaves the source's origin https://api\.example\.com:443"
    ):
        require_same_origin(link, CONFIGURED)
