"""Which tenant may read or write a registry subject (core.subject_scope)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.avro import subject_for
from core.subject_scope import (
    MAX_SUBJECT_CHARS,
    Access,
    access,
    candidate_sources,
    subject_problem,
)

# acme owns `web` and `web.eu`; globex owns `shop` and `web.us`; `hook` is shared
# (a source without a tenant); `api` is the default source, absent from the catalog.
OWNERS: dict[str, str | None] = {
    "web": "acme",
    "web.eu": "acme",
    "web.us": "globex",
    "shop": "globex",
    "hook": None,
}
SHARED = ("api",)


@pytest.mark.parametrize(
    ("subject", "tenant", "expected"),
    [
        ("web.checkout", "acme", Access.WRITE),
        ("web.checkout", "globex", Access.NONE),
        ("shop.checkout", "globex", Access.WRITE),
        ("shop.checkout", "acme", Access.NONE),
        # `web.eu.checkout` is web/eu.checkout or web.eu/checkout: both acme's
        ("web.eu.checkout", "acme", Access.WRITE),
        # `web.us.checkout` is acme's web/us.checkout and globex's web.us/checkout
        ("web.us.checkout", "acme", Access.NONE),
        ("web.us.checkout", "globex", Access.NONE),
        # the default source carries every tenant's events: read only
        ("api.checkout", "acme", Access.READ),
        ("api.checkout", "globex", Access.READ),
        ("hook.push", "acme", Access.READ),
        # subjects of no known source are the platform's
        ("orders-value", "acme", Access.NONE),
        ("nosuch.checkout", "acme", Access.NONE),
        ("web", "acme", Access.NONE),
        ("web.", "acme", Access.NONE),
        (".checkout", "acme", Access.NONE),
        # a type name must be valid for the split to count
        ("web.check out", "acme", Access.NONE),
        ("web.a/b", "acme", Access.NONE),
        # types may hold a colon, sources may not
        ("web.stripe:charge", "acme", Access.WRITE),
    ],
)
def test_access_follows_the_sources_a_subject_describes(
    subject: str, tenant: str, expected: Access
) -> None:
    assert access(subject, tenant, OWNERS, SHARED) == expected


def test_the_default_source_is_shared_even_when_a_tenant_owns_a_row_of_its_name() -> None:
    owners = {**OWNERS, "api": "acme"}
    assert access("api.checkout", "acme", owners, SHARED) == Access.READ
    assert access("api.checkout", "acme", owners, ()) == Access.WRITE


def test_a_shared_split_makes_a_tenants_subject_read_only() -> None:
    owners = {**OWNERS, "web.eu": None}
    assert access("web.eu.checkout", "acme", owners, SHARED) == Access.READ


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("web.checkout", ["web"]),
        ("a.b.c", ["a", "a.b"]),
        ("web.stripe:charge", ["web"]),
        ("orders-value", []),
        ("a:b.c", []),
        ("x" * 65 + ".c", []),
        ("x" * 64 + ".c", ["x" * 64]),
        ("", []),
    ],
)
def test_candidate_sources(subject: str, expected: list[str]) -> None:
    assert candidate_sources(subject) == expected


@pytest.mark.parametrize(
    ("subject", "says"),
    [
        ("", "empty"),
        ("x" * (MAX_SUBJECT_CHARS + 1), "at most"),
        ("a\x00b", "control"),
        ("a\nb", "control"),
        ("a\ud800b", "surrogate"),
    ],
)
def test_unusable_subject_names(subject: str, says: str) -> None:
    problem = subject_problem(subject)
    assert problem is not None
    assert says in problem


@pytest.mark.parametrize("subject", ["web.checkout", "orders-value", "ünïcode.ok", "x" * 512])
def test_usable_subject_names(subject: str) -> None:
    assert subject_problem(subject) is None


NAME = st.from_regex(r"[A-Za-z0-9_\-]{1,20}", fullmatch=True)


@given(source=NAME, type_=NAME, owner=NAME, other=NAME)
def test_only_the_owner_writes_the_subject_of_its_source(
    source: str, type_: str, owner: str, other: str
) -> None:
    subject = subject_for(source, type_)
    owners: dict[str, str | None] = {source: owner}
    assert access(subject, owner, owners, ()) == Access.WRITE
    if other != owner:
        assert access(subject, other, owners, ()) == Access.NONE
    assert access(subject, owner, owners, (source,)) == Access.READ


@given(subject=st.text(max_size=200), tenant=NAME)
def test_no_tenant_may_write_a_subject_of_no_known_source(subject: str, tenant: str) -> None:
    assert access(subject, tenant, {}, ("api",)) < Access.WRITE
