"""HTTP GET for pollers under the egress policy: resolve, check, pin, cap.

:mod:`core.egress` decides; this module does the I/O around one request:

1. the URL's host is resolved (an IP literal in any C-library spelling is read as
   such), and EVERY address it resolves to is checked against the policy;
2. the request goes to the checked address: the URL carries the address, the ``Host``
   header and TLS SNI (and so certificate checks) carry the name. No second lookup
   happens, so DNS rebinding between check and connect cannot change where it goes; the
   peer address of the connection is compared with the checked one all the same;
3. redirects are not followed (the client is made with ``follow_redirects=False``), and
   no proxy from the environment is used (it would connect elsewhere);
4. the body is streamed and counted (after decompression, so a compressed bomb counts
   at its real size); past ``max_response_bytes`` the request is abandoned with
   :class:`ResponseTooLarge`, past ``max_request_seconds`` with :class:`RequestTooSlow`.
   Nothing of such an answer is returned.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from core.egress import EgressPolicy, EgressRefused, IPAddress, checked_address, ip_literal, origin
from core.exceptions import InvalidInputError

__all__ = [
    "Answer",
    "RequestTooSlow",
    "ResponseTooLarge",
    "allowed_address",
    "get",
    "make_client",
    "resolve",
]


class ResponseTooLarge(InvalidInputError):
    """The answer's body is over ``polling.max_response_bytes``; nothing of it is used."""


class RequestTooSlow(httpx.TimeoutException):
    """The request took longer than ``polling.max_request_seconds`` (retried as a timeout)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole answer: status, headers (lower-case names) and the body as read."""

    status: int
    headers: dict[str, str]
    content: bytes


def make_client(policy: EgressPolicy, timeout_seconds: float) -> httpx.Client:
    """A client for pinned requests: no redirects, no proxies from the environment, each
    wait bounded by the smaller of the source's timeout and the policy's limit."""
    return httpx.Client(
        timeout=min(timeout_seconds, policy.max_request_seconds),
        follow_redirects=False,
        trust_env=False,
    )


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (an IP literal: itself).

    Raises:
        httpx.ConnectError: when the name does not resolve (retried like a refused
            connection).
    """
    literal = ip_literal(host)
    if literal is not None:
        return [literal]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise httpx.ConnectError(f"host {host!r} does not resolve: {exc}") from exc
    found: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    return found


def allowed_address(url: str, policy: EgressPolicy) -> IPAddress:
    """The checked address to send a request for ``url`` to.

    Raises:
        EgressRefused: when the URL is not http(s) or an address is denied.
        httpx.ConnectError: when the host does not resolve.
    """
    _, host, port = origin(url)
    return checked_address(host, resolve(host, port), policy)


def _pinned(url: str, address: IPAddress) -> tuple[httpx.URL, str, str]:
    target = httpx.URL(url)
    host_header = target.netloc.decode("ascii")
    return target.copy_with(host=str(address)), host_header, target.host


def _check_peer(response: httpx.Response, address: IPAddress, host: str) -> None:
    stream = response.extensions.get("network_stream")
    peer = stream.get_extra_info("server_addr") if stream is not None else None
    if peer and ipaddress.ip_address(str(peer[0]).split("%", 1)[0]) != address:
        raise EgressRefused(
            f"the connection for host {host!r} reached {peer[0]}, not the checked address "
            f"{address}; refusing its answer"
        )


def get(
    client: httpx.Client,
    url: str,
    headers: Sequence[tuple[str, str]],
    policy: EgressPolicy,
) -> Answer:
    """GET ``url`` under ``policy`` (see the module docstring).

    Raises:
        EgressRefused: the address is denied (nothing was sent).
        ResponseTooLarge: the body is over the limit (the connection is dropped).
        RequestTooSlow: the request took longer than the limit.
        httpx.TransportError: connection failures and timeouts, as httpx raises them.
    """
    started = time.monotonic()
    address = allowed_address(url, policy)
    pinned, host_header, name = _pinned(url, address)
    extensions = {"sni_hostname": name} if pinned.scheme == "https" else {}
    request = client.build_request(
        "GET", pinned, headers=[*headers, ("Host", host_header)], extensions=extensions
    )
    response = client.send(request, stream=True)
    try:
        _check_peer(response, address, name)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > policy.max_response_bytes:
            raise _too_large(url, policy, f"declares {declared}")
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > policy.max_response_bytes:
                raise _too_large(url, policy, f"sent more than {policy.max_response_bytes}")
            if time.monotonic() - started > policy.max_request_seconds:
                raise RequestTooSlow(
                    f"GET {url} took more than polling.max_request_seconds "
                    f"({policy.max_request_seconds:g} s); abandoned"
                )
    finally:
        response.close()
    headers_out = {k.lower(): v for k, v in response.headers.items()}
    return Answer(response.status_code, headers_out, bytes(body))


def _too_large(url: str, policy: EgressPolicy, what: str) -> ResponseTooLarge:
    return ResponseTooLarge(
        f"the answer of GET {url} {what} bytes, over polling.max_response_bytes "
        f"({policy.max_response_bytes}); nothing of it was ingested: ask the API for "
        "smaller pages (page_size) or raise the limit"
    )
