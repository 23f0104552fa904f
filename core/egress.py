"""Where a poller may send a request: the address policy against SSRF, and origins.

A poll source's URL is configured by a tenant's operator, and its pages name further
URLs (``Link: rel=next``). Without a policy, either could point a poller at the
platform's own inside: Redis or PostgreSQL on loopback, the cloud metadata service at
``169.254.169.254``, a private admin endpoint. So:

* every address a host name resolves to is checked, and the request goes to a checked
  address (the shell pins it; no second lookup can answer differently);
* loopback, link-local, private (RFC 1918, ``fc00::/7``), shared (``100.64.0.0/10``),
  unspecified, multicast, reserved and other non-global addresses are refused, and so are
  the IPv6 forms that embed such an IPv4 address (``::ffff:127.0.0.1``, 6to4, NAT64),
  unless the host is in ``polling.allowed_hosts`` or the address in
  ``polling.allowed_networks``;
* a poller follows a link only to the configured URL's origin (scheme, host, port), so
  the source's headers (often an ``Authorization``) never reach another host.

IPv4 literals are read as the C library reads them (``inet_aton``): ``2130706433``,
``0177.0.0.1``, ``0x7f.1`` all are ``127.0.0.1``, and are checked as that.

Pure: no resolution, no I/O. The shell (``adapters.http_egress``) resolves and connects.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from core.exceptions import ConfigurationError, InvalidInputError

__all__ = [
    "EgressPolicy",
    "EgressRefused",
    "IPAddress",
    "address_problem",
    "checked_address",
    "ip_literal",
    "make_policy",
    "origin",
    "require_same_origin",
    "url_host",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOW_TO_ALLOW = (
    "if this host is meant to be polled, add it to the settings' polling.allowed_hosts "
    "(e.g. RAYLINE_POLLING__ALLOWED_HOSTS='[\"{host}\"]') or its network to "
    "polling.allowed_networks"
)


class EgressRefused(InvalidInputError):
    """A request a poller must not send: a denied address, or a link to another origin."""


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """What a poller may reach, and how much it reads.

    Attributes:
        allowed_hosts: host names or IP literals (lower case) allowed whatever they
            resolve to.
        allowed_networks: networks whose addresses are allowed even when not global.
        max_response_bytes: the largest response body read; a longer one is an error.
        max_request_seconds: the longest one request may take, body included.
    """

    allowed_hosts: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = ()
    max_response_bytes: int = 16 * 1024 * 1024
    max_request_seconds: float = 60.0


def make_policy(
    allowed_hosts: Iterable[str] = (),
    allowed_networks: Iterable[str] = (),
    *,
    max_response_bytes: int = 16 * 1024 * 1024,
    max_request_seconds: float = 60.0,
) -> EgressPolicy:
    """Build a policy from settings values.

    Raises:
        ConfigurationError: naming a network that is not a CIDR, or a bad limit.
    """
    networks: list[IPNetwork] = []
    for text in allowed_networks:
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigurationError(
                f"polling.allowed_networks holds {text!r}: expected a network such as "
                "10.0.0.0/8 or fd00::/8"
            ) from None
    if max_response_bytes < 1 or max_request_seconds <= 0:
        raise ConfigurationError(
            "polling.max_response_bytes and polling.max_request_seconds must be positive, got "
            f"{max_response_bytes} and {max_request_seconds}"
        )
    hosts = frozenset(_bare(host).lower() for host in allowed_hosts if host)
    return EgressPolicy(hosts, tuple(networks), max_response_bytes, max_request_seconds)


def _bare(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


# --------------------------------------------------------------------------- addresses


def _inet_aton_part(text: str) -> int | None:
    if not text:
        return None
    try:
        if text[:2].lower() == "0x":
            return int(text[2:], 16) if text[2:] else None
        if len(text) > 1 and text[0] == "0":
            return int(text, 8)
        return int(text, 10) if text.isdigit() else None
    except ValueError:
        return None


def ip_literal(host: str) -> IPAddress | None:
    """The address a host that is an IP literal names (in any spelling the C library
    accepts for IPv4), or None for a host name."""
    host = _bare(host)
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return None
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers = [_inet_aton_part(part) for part in parts]
    if any(number is None for number in numbers):
        return None
    values = [number for number in numbers if number is not None]
    # The last part fills every byte the earlier parts leave (a.b.c.d, a.b.cd, a.bcd, abcd).
    limit = 1 << (8 * (5 - len(values)))
    if any(value > 255 for value in values[:-1]) or values[-1] >= limit:
        return None
    total = 0
    for value in values[:-1]:
        total = (total << 8) | value
    total = (total << (8 * (5 - len(values)))) | values[-1]
    return ipaddress.IPv4Address(total)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_problem(address: IPAddress) -> str | None:
    """What kind of non-public address ``address`` is (``loopback``, ``private``...),
    or None when it is a global unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            problem = address_problem(embedded)
            return None if problem is None else f"{problem} (embedded in IPv6)"
        if address.is_site_local or address in _UNIQUE_LOCAL:
            return "private"
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("shared (carrier-grade NAT)", address in _SHARED),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("non-global", not address.is_global),
    )
    return next((name for name, hit in checks if hit), None)


def _allowed(host: str, address: IPAddress, policy: EgressPolicy) -> bool:
    if host.lower() in policy.allowed_hosts or str(address) in policy.allowed_hosts:
        return True
    forms: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        forms.append(address.ipv4_mapped)
    return any(
        form.version == network.version and form in network
        for form in forms
        for network in policy.allowed_networks
    )


def checked_address(host: str, addresses: Sequence[IPAddress], policy: EgressPolicy) -> IPAddress:
    """The address to connect to, when EVERY address ``host`` resolved to is allowed.

    Checking all of them (not just the first) means a name that resolves to both a
    public and a private address cannot be used to reach the private one.

    Raises:
        EgressRefused: naming the host, the address, its kind and how to allow it.
    """
    host = _bare(host)
    if not addresses:
        raise EgressRefused(f"host {host!r} resolved to no address")
    for address in addresses:
        problem = address_problem(address)
        if problem is not None and not _allowed(host, address, policy):
            raise EgressRefused(
                f"host {host!r} resolves to {address}, a {problem} address: pollers may "
                "not reach loopback, link-local, private or reserved addresses; "
                + _HOW_TO_ALLOW.format(host=host)
            )
    return addresses[0]


# ----------------------------------------------------------------------------- origins


def url_host(url: str) -> str:
    """The host of an http(s) URL, without brackets, lower case.

    Raises:
        EgressRefused: when the URL is not http(s) or has no host.
    """
    return origin(url)[1]


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, the default port filled in.

    Raises:
        EgressRefused: when the URL is not http(s), has no host or a bad port.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise EgressRefused(f"URL {url[:200]!r} cannot be read: {exc}") from None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host:
        raise EgressRefused(f"URL {url[:200]!r}: expected an http:// or https:// URL with a host")
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]


def require_same_origin(url: str, configured: str) -> None:
    """Refuse ``url`` unless it has the configured URL's scheme, host and port.

    Raises:
        EgressRefused: saying which origin was asked for and which one is allowed.
    """
    wanted, allowed = origin(url), origin(configured)
    if wanted != allowed:
        shown = "{}://{}:{}"
        raise EgressRefused(
            f"not following {url[:200]!r}: it leaves the source's origin "
            f"{shown.format(*allowed)} for {shown.format(*wanted)}, and the source's "
            "headers (credentials) go only to the configured origin; point the source's "
            "url at the other host if it is meant to be polled"
        )
