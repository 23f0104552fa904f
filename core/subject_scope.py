"""Which tenant may read or write a schema registry subject.

A subject describes the events of one source and type, ``"<source>.<type>"``
(:func:`core.avro.subject_for`), and the ingest edge and the workers enforce its latest
schema on every event of that source and type, whatever the event's tenant. So the
right to write a subject follows from the sources it describes, not from who wrote it
first.

Source and type names may contain dots, so one subject can name several (source, type)
pairs: ``a.b.c`` is source ``a`` with type ``b.c``, and source ``a.b`` with type ``c``.
Every such pair whose names are valid and whose source exists, or is a *shared* name
(the default source ``api`` that ``POST /v1/events`` gives to events naming none), is a
*candidate*: the subject's schema applies to that source's events. Then:

======================================================= =========================
candidates                                              a tenant key may
======================================================= =========================
at least one, every one a source of the key's tenant    read and write
at least one, each the tenant's own or shared           read only
none (``orders-value``, an unknown source), or any      nothing: platform only
that belongs to another tenant
======================================================= =========================

A shared source (the default one, or a source without a tenant) carries the events of
every tenant, so a schema on it is a decision for the platform: a tenant that could
register ``api.checkout`` would make every other tenant's ``checkout`` events fail.
A subject of no known source is the platform's too: the source might later be given to
another tenant, whose events the schema would then judge.

Pure logic: the caller looks up the candidates' tenants (:func:`candidate_sources`
says which names to look up) and passes them in.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Collection, Mapping
from enum import IntEnum

from core.envelope import name_problem

__all__ = ["MAX_SUBJECT_CHARS", "Access", "access", "candidate_sources", "subject_problem"]

MAX_SUBJECT_CHARS = 512
"""The longest subject the registry takes (``<source>.<type>`` is at most 193)."""

_MAX_SOURCE_CHARS = 64


class Access(IntEnum):
    """What a tenant key may do with a subject; a larger value allows more."""

    NONE = 0
    READ = 1
    WRITE = 2


def subject_problem(subject: str) -> str | None:
    """What makes ``subject`` unusable as a subject name, or None when it is fine."""
    if not subject:
        return "a subject name must not be empty"
    if len(subject) > MAX_SUBJECT_CHARS:
        return f"a subject name is at most {MAX_SUBJECT_CHARS} characters, got {len(subject)}"
    for char in subject:
        if unicodedata.category(char) in ("Cc", "Cs"):
            return (
                f"a subject name must not contain control characters or lone surrogates, "
                f"got {char!r}"
            )
    return None


def candidate_sources(subject: str) -> list[str]:
    """Every source name that ``subject`` may be ``"<source>.<type>"`` of, shortest
    first: each prefix before a dot that is a valid source name, followed by a valid
    type name. Whether such a source exists is for the caller to look up."""
    found = []
    for end in range(1, min(len(subject), _MAX_SOURCE_CHARS + 1)):
        if subject[end] != ".":
            continue
        source, type_ = subject[:end], subject[end + 1 :]
        if name_problem("source", source) is None and name_problem("type", type_) is None:
            found.append(source)
    return found


def access(
    subject: str,
    tenant: str,
    owners: Mapping[str, str | None],
    shared: Collection[str] = (),
) -> Access:
    """What a key of ``tenant`` (a tenant, not the platform) may do with ``subject``.

    Args:
        subject: the subject name.
        tenant: the key's tenant.
        owners: the tenant of each existing source (None: a shared source without a
            tenant); at least the names :func:`candidate_sources` gives.
        shared: names that are shared whether or not they exist and whatever tenant a
            row of that name names: the default source.
    """
    kinds = set()
    for source in candidate_sources(subject):
        if source in shared:
            kinds.add("shared")
        elif source in owners:
            owner = owners[source]
            kinds.add("shared" if owner is None else "own" if owner == tenant else "other")
    if not kinds or "other" in kinds:
        return Access.NONE
    return Access.WRITE if kinds == {"own"} else Access.READ
