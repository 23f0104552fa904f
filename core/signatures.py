"""Webhook signatures: checked over the raw body, in constant time, for three schemes.

======== =============================== =============================================
scheme   headers                         signed content
======== =============================== =============================================
github   ``x-hub-signature-256:          the body; no timestamp. The delivery id is
         sha256=<hex>``                  ``sha256:<hex SHA-256 of the body>``
stripe   ``stripe-signature:             ``f"{t}." + body``; the delivery id is
         t=<unix s>,v1=<hex>[,v1=...]``  ``stripe:<the event's "id">`` from the
                                         (signed) JSON body, else
                                         ``sha256:<hex SHA-256 of f"{t}." + body>``
standard ``webhook-id``,                 ``f"{id}.{timestamp}." + body``
         ``webhook-timestamp``,          (Standard Webhooks, standardwebhooks.com);
         ``webhook-signature:            the delivery id is ``webhook-id``
         v1,<base64> [v1,<base64>...]``
======== =============================== =============================================

Every scheme signs with HMAC-SHA256. A delivery id (what the receiver remembers to refuse
a replay) is always made of signed content, never of a header the sender does not sign:
GitHub signs neither ``x-github-delivery`` nor a time, so a GitHub replay can only be
recognised by its body (an identical body within the receiver's replay window counts
once, GitHub's own redeliveries included). Stripe's header is read as Stripe's
libraries read it: the delivery passes when ANY ``v1`` entry matches (entries that are
not 64 hex digits are skipped, as other schemes' entries are). A source holds its
current secret and, during a rotation, the previous one: a signature made with any of
them passes.

Secrets. ``github`` and ``stripe`` use the secret's UTF-8 bytes as the HMAC key (Stripe's
``whsec_...`` secrets included: Stripe signs with the whole string). ``standard`` secrets
are ``whsec_`` followed by the base64 of the key bytes, as the spec says; a secret
without that prefix is used as its UTF-8 bytes.

Order of checks, and what a failure says (:attr:`SignatureRejected.reason`):

1. ``missing``: a header the scheme needs is absent or empty;
2. ``malformed``: a header is longer than :data:`MAX_HEADER_CHARS`, carries more than
   :data:`MAX_SIGNATURES` signatures, or is not in the scheme's format;
3. ``mismatch``: no signature matches the body under any secret;
4. ``stale``: the signature is right but the signed timestamp is more than
   ``tolerance_s`` seconds away from ``now_s`` (in the past or the future).

The signature is checked before the timestamp, so that a request that is both old and
wrongly signed reads ``mismatch``: whoever does not hold the secret learns nothing about
the timestamps the receiver would accept. Bounds are checked before any parsing loop,
so a hostile header costs microseconds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets as _random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import orjson

from core.exceptions import ConfigurationError, InvalidInputError

__all__ = [
    "MAX_HEADER_CHARS",
    "MAX_SIGNATURES",
    "SCHEMES",
    "SignatureRejected",
    "Verified",
    "body_digest",
    "new_secret",
    "sign",
    "verify",
]

SCHEMES: tuple[str, ...] = ("github", "stripe", "standard")

MAX_HEADER_CHARS = 4096
"""The longest signature, id or timestamp header read; longer ones are ``malformed``."""

MAX_SIGNATURES = 8
"""The most signatures one header may carry (senders add one per secret they rotate)."""

REASONS = ("missing", "malformed", "mismatch", "stale")

_STANDARD_PREFIX = "whsec_"
_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_DIGEST_BYTES = 32
_MAX_EVENT_ID = 255


class SignatureRejected(InvalidInputError):
    """A webhook delivery's signature does not hold; answer it with 401.

    Attributes:
        reason: ``missing``, ``malformed``, ``mismatch`` or ``stale``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Verified:
    """A delivery whose signature holds.

    Attributes:
        delivery_id: identifies this delivery, so that a replay of it can be refused.
        timestamp_s: the signed timestamp (epoch seconds), when the scheme has one.
    """

    delivery_id: str
    timestamp_s: int | None


# ------------------------------------------------------------------------------- helpers


def body_digest(content: bytes) -> str:
    """``sha256:<hex>`` of ``content``: the delivery id of signed content with no id."""
    return "sha256:" + hashlib.sha256(content).hexdigest()


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ConfigurationError(
            f"unknown signature scheme {scheme!r}: expected one of {', '.join(SCHEMES)}; "
            "fix the source's 'scheme'"
        )


def _key(scheme: str, secret: str) -> bytes:
    if not secret:
        raise ConfigurationError(
            f"a {scheme} signature secret is empty: set the source's secret "
            f"(make one with new_secret({scheme!r}))"
        )
    if scheme == "standard" and secret.startswith(_STANDARD_PREFIX):
        try:
            return base64.b64decode(secret[len(_STANDARD_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(
                "a standard webhook secret starts with 'whsec_' but the rest is not base64: "
                "copy the secret exactly as the sender shows it"
            ) from None
    return secret.encode()


def _keys(scheme: str, secrets: Sequence[str]) -> list[bytes]:
    if isinstance(secrets, str) or not secrets:
        raise ConfigurationError(
            f"a {scheme} source needs a sequence of one or two secrets (current, previous), "
            f"got {type(secrets).__name__ if secrets else 'none'}"
        )
    return [_key(scheme, secret) for secret in secrets]


def _mac(key: bytes, *parts: bytes) -> bytes:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.digest()


def _header(headers: Mapping[str, str], name: str, scheme: str) -> str:
    value = headers.get(name)
    if value is None or not value.strip():
        raise SignatureRejected(
            "missing",
            f"header '{name}' is missing: a {scheme} webhook delivery must carry it; "
            "check that the sender signs its deliveries and that no proxy drops the header",
        )
    if len(value) > MAX_HEADER_CHARS:
        raise SignatureRejected(
            "malformed",
            f"header '{name}' is {len(value)} characters, over the {MAX_HEADER_CHARS} limit: "
            "send one signature per secret in use",
        )
    return value.strip()


def _matches(keys: Sequence[bytes], candidates: Sequence[bytes], *parts: bytes) -> bool:
    # Every key against every candidate: the work done does not depend on which matched.
    found = False
    for key in keys:
        expected = _mac(key, *parts)
        for candidate in candidates:
            found |= hmac.compare_digest(expected, candidate)
    return found


def _mismatch(header: str, how: str) -> SignatureRejected:
    return SignatureRejected(
        "mismatch",
        f"header '{header}' holds no signature that matches the body: expected {how}; "
        "check that the source's secret equals the sender's and that nothing (a proxy, "
        "a JSON re-encoding) changed the body on the way",
    )


def _timestamp(value: str, header: str) -> int:
    if not _TIMESTAMP.fullmatch(value):
        raise SignatureRejected(
            "malformed",
            f"header '{header}' has timestamp {value[:40]!r}: expected integer Unix seconds; "
            "send the time the delivery was signed",
        )
    return int(value)


def _check_fresh(timestamp_s: int, header: str, now_s: float, tolerance_s: int) -> None:
    skew = now_s - timestamp_s
    if abs(skew) > tolerance_s:
        when = "in the past" if skew > 0 else "in the future"
        raise SignatureRejected(
            "stale",
            f"header '{header}' was signed at {timestamp_s}, {abs(skew):.0f} s {when}: "
            f"expected within {tolerance_s} s of now ({now_s:.0f}); resend the delivery "
            "with a fresh signature and check the sender's clock (NTP)",
        )


def _check_tolerance(tolerance_s: int) -> None:
    if tolerance_s < 0:
        raise ConfigurationError(
            f"signature tolerance must be 0 or more seconds, got {tolerance_s}"
        )


# ------------------------------------------------------------------------------- schemes


def _verify_github(
    keys: Sequence[bytes], headers: Mapping[str, str], body: bytes, now_s: float, tol: int
) -> Verified:
    name = "x-hub-signature-256"
    value = _header(headers, name, "github")
    # Not signed: required (GitHub always sends it) but never used as the delivery id.
    _header(headers, "x-github-delivery", "github")
    prefix, _, hexdigest = value.partition("=")
    if prefix != "sha256" or not _HEX_SHA256.fullmatch(hexdigest):
        raise SignatureRejected(
            "malformed",
            f"header '{name}' is {value[:40]!r}: expected 'sha256=' and 64 hex digits "
            "(HMAC-SHA256 of the body); configure the sender's webhook with a secret",
        )
    if not _matches(keys, [bytes.fromhex(hexdigest)], body):
        raise _mismatch(name, "sha256=<hex HMAC-SHA256 of the raw body>")
    return Verified(delivery_id=body_digest(body), timestamp_s=None)


def _stripe_parts(value: str) -> tuple[str, list[str]]:
    name = "stripe-signature"
    if value.count(",") >= 2 * MAX_SIGNATURES + 2:
        raise SignatureRejected(
            "malformed",
            f"header '{name}' has {value.count(',') + 1} entries: expected t=... and at "
            f"most {MAX_SIGNATURES} v1=... signatures",
        )
    stamps: list[str] = []
    signatures: list[str] = []
    for part in value.split(","):
        key, _, item = part.strip().partition("=")
        if key == "t":
            stamps.append(item)
        elif key == "v1":
            signatures.append(item)
    if len(stamps) != 1 or not signatures or len(signatures) > MAX_SIGNATURES:
        raise SignatureRejected(
            "malformed",
            f"header '{name}' has {len(stamps)} t= and {len(signatures)} v1= entries: "
            f"expected 't=<unix seconds>,v1=<hex>' with one t and 1 to {MAX_SIGNATURES} v1",
        )
    # As Stripe's libraries do: a v1 entry that cannot be a signature just never matches.
    usable = [signature for signature in signatures if _HEX_SHA256.fullmatch(signature)]
    if not usable:
        raise SignatureRejected(
            "malformed",
            f"header '{name}' has no v1 signature of 64 hex digits: "
            "expected the hex HMAC-SHA256 of f'{t}.' + body",
        )
    _timestamp(stamps[0], name)
    return stamps[0], usable


def _verify_stripe(
    keys: Sequence[bytes], headers: Mapping[str, str], body: bytes, now_s: float, tol: int
) -> Verified:
    name = "stripe-signature"
    stamp, signatures = _stripe_parts(_header(headers, name, "stripe"))
    timestamp_s = int(stamp)
    candidates = [bytes.fromhex(signature) for signature in signatures]
    # The timestamp as sent, not as re-formatted: that string is what the sender signed.
    if not _matches(keys, candidates, f"{stamp}.".encode(), body):
        raise _mismatch(name, "v1=<hex HMAC-SHA256 of f'{t}.' + raw body>")
    _check_fresh(timestamp_s, name, now_s, tol)
    return Verified(delivery_id=_stripe_delivery(stamp, body), timestamp_s=timestamp_s)


def _stripe_delivery(stamp: str, body: bytes) -> str:
    """The event's own id (Stripe retries an event with a new ``t``, the same id), read
    from the signed body; the digest of everything signed when the body has none."""
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        event = None
    event_id = event.get("id") if isinstance(event, dict) else None
    if isinstance(event_id, str) and 0 < len(event_id) <= _MAX_EVENT_ID:
        return f"stripe:{event_id}"
    return body_digest(f"{stamp}.".encode() + body)


def _standard_signatures(value: str) -> list[bytes]:
    name = "webhook-signature"
    if value.count(" ") >= 2 * MAX_SIGNATURES:
        raise SignatureRejected(
            "malformed",
            f"header '{name}' has too many entries: expected at most {MAX_SIGNATURES} "
            "space-separated 'v1,<base64>' signatures",
        )
    candidates: list[bytes] = []
    for entry in value.split():
        version, _, encoded = entry.partition(",")
        if version != "v1":
            continue  # other versions (v1a: asymmetric) are not ours to check
        try:
            digest = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            digest = b""
        if len(digest) != _DIGEST_BYTES:
            raise SignatureRejected(
                "malformed",
                f"header '{name}' has entry {entry[:60]!r}: expected 'v1,' and the base64 of "
                "a 32-byte HMAC-SHA256",
            )
        candidates.append(digest)
    if not candidates or len(candidates) > MAX_SIGNATURES:
        raise SignatureRejected(
            "malformed",
            f"header '{name}' has {len(candidates)} v1 signatures: expected 1 to "
            f"{MAX_SIGNATURES} space-separated 'v1,<base64>' entries",
        )
    return candidates


def _verify_standard(
    keys: Sequence[bytes], headers: Mapping[str, str], body: bytes, now_s: float, tol: int
) -> Verified:
    webhook_id = _header(headers, "webhook-id", "standard")
    stamp = _header(headers, "webhook-timestamp", "standard")
    value = _header(headers, "webhook-signature", "standard")
    timestamp_s = _timestamp(stamp, "webhook-timestamp")
    candidates = _standard_signatures(value)
    if not _matches(keys, candidates, f"{webhook_id}.{stamp}.".encode(), body):
        raise _mismatch(
            "webhook-signature", "v1,<base64 HMAC-SHA256 of f'{id}.{timestamp}.' + body>"
        )
    _check_fresh(timestamp_s, "webhook-timestamp", now_s, tol)
    return Verified(delivery_id=webhook_id, timestamp_s=timestamp_s)


_Verifier = Callable[[Sequence[bytes], Mapping[str, str], bytes, float, int], Verified]
_VERIFIERS: dict[str, _Verifier] = {
    "github": _verify_github,
    "stripe": _verify_stripe,
    "standard": _verify_standard,
}


# ---------------------------------------------------------------------------- public API


def verify(
    scheme: str,
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now_s: float,
    tolerance_s: int,
) -> Verified:
    """Check a webhook delivery's signature over its raw body.

    Args:
        scheme: one of :data:`SCHEMES`.
        secrets: the current secret and, during a rotation, the previous one.
        headers: the request headers, names in lower case (as Starlette gives them).
        body: the raw request body, exactly as received.
        now_s: the receiver's clock (epoch seconds).
        tolerance_s: how far a signed timestamp may be from ``now_s``.

    Returns:
        The delivery id (to refuse replays) and the signed timestamp.

    Raises:
        ConfigurationError: for an unknown scheme, no secret, or an unusable secret.
        SignatureRejected: when the delivery is not signed right; ``reason`` says how.
    """
    _check_scheme(scheme)
    _check_tolerance(tolerance_s)
    keys = _keys(scheme, secrets)
    return _VERIFIERS[scheme](keys, headers, body, now_s, tolerance_s)


def sign(
    scheme: str, secret: str, body: bytes, *, now_s: float, delivery_id: str
) -> dict[str, str]:
    """The signature headers a sender would send with ``body`` (for tests, benchmarks, docs).

    ``delivery_id`` becomes ``x-github-delivery`` or ``webhook-id``; a Stripe delivery's
    id comes from its body instead (see :func:`verify`).

    Raises:
        ConfigurationError: for an unknown scheme or an unusable secret.
    """
    _check_scheme(scheme)
    key = _key(scheme, secret)
    timestamp_s = int(now_s)
    if scheme == "github":
        return {
            "x-hub-signature-256": "sha256=" + _mac(key, body).hex(),
            "x-github-delivery": delivery_id,
        }
    if scheme == "stripe":
        hexdigest = _mac(key, f"{timestamp_s}.".encode(), body).hex()
        return {"stripe-signature": f"t={timestamp_s},v1={hexdigest}"}
    digest = _mac(key, f"{delivery_id}.{timestamp_s}.".encode(), body)
    return {
        "webhook-id": delivery_id,
        "webhook-timestamp": str(timestamp_s),
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
    }


def new_secret(scheme: str) -> str:
    """A fresh random secret (256 bits) in the form the scheme's senders expect.

    Raises:
        ConfigurationError: for an unknown scheme.
    """
    _check_scheme(scheme)
    key = _random.token_bytes(32)
    if scheme == "standard":
        return _STANDARD_PREFIX + base64.b64encode(key).decode()
    if scheme == "stripe":
        return _STANDARD_PREFIX + _random.token_urlsafe(32)
    return key.hex()
