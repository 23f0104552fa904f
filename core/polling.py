"""REST API polling, the pure part: configuration, requests, cursors, retry delays.

A poll source asks an HTTP API for records on an interval. This module decides what
to ask next and what the answer means; it does no I/O and reads no clock (the caller
passes ``now`` and a random number in).

**The cursor state** is a small JSON-able dict, saved after every page whose records
Kafka acknowledged. Its keys (each optional):

============ ====================================================================
key          what it holds
============ ====================================================================
``since``    the incremental value sent with every request of the current run
``max_seen`` the largest incremental value seen so far in the current run
``page``     page number of the next request (``page`` pagination)
``offset``   offset of the next request (``offset`` pagination)
``cursor``   body cursor of the next request (``cursor`` pagination)
``url``      URL of the next request (``link`` pagination, from ``rel="next"``)
``skip``     records at the head of the next page that were delivered already
``etag``     ETag of the last answer, with ``etag_key`` (the request it answered)
============ ====================================================================

**A run** walks the pages from the start position until a stop condition: an empty
page, a short page (fewer than ``page_size`` records), no next cursor or link, a 304
Not Modified, or ``max_pages_per_poll`` pages (the run then continues at the next
poll, from where it stopped). Where the run ends depends on ``incremental``:

* with ``incremental``, a finished run moves ``since`` to the largest value seen and
  the next run starts again at the first page (the API filters what is new);
* without it, the position stays at the end of the list (the tail): the last page is
  asked again, and the ``skip`` records already delivered from it are dropped, so an
  append-only list is read once. ``none`` pagination asks the same URL each time and
  relies on ``etag`` (and on the pipeline's deduplication by ``event_id``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode, urljoin

from core.egress import require_same_origin
from core.exceptions import ConfigurationError, InvalidInputError

PAGINATION_TYPES = ("none", "page", "offset", "cursor", "link")
_TOP_KEYS = frozenset(
    {
        "url",
        "interval_seconds",
        "headers",
        "params",
        "records_path",
        "pagination",
        "incremental",
        "etag",
        "timeout_seconds",
        "max_retries",
        "backoff_base_seconds",
        "backoff_max_seconds",
        "retry_after_max_seconds",
    }
)
_PAGINATION_KEYS = frozenset(
    {
        "type",
        "page_param",
        "offset_param",
        "size_param",
        "page_size",
        "cursor_param",
        "cursor_path",
        "first_page",
        "max_pages_per_poll",
    }
)
_INCREMENTAL_KEYS = frozenset({"param", "path", "initial"})
_PATH_RE = re.compile(r"^\$((\.[A-Za-z_][A-Za-z0-9_\-]*)|(\[\d+\]))*$")
# One link-value: <target> then parameters, whose quoted values may hold ';' and ','.
_LINK_RE = re.compile(r'<([^>]*)>\s*((?:;\s*[^;,="\s]+\s*(?:=\s*(?:"[^"]*"|[^;,\s]*))?\s*)*)')
_STEP_RE = re.compile(r"\.([A-Za-z_][A-Za-z0-9_\-]*)|\[(\d+)\]")
# 2**62 seconds is far beyond any backoff cap, and keeps the float product finite.
_MAX_EXPONENT = 62


@dataclass(frozen=True, slots=True)
class Pagination:
    """How the pages of one poll are asked for (see the module docstring)."""

    type: str = "none"
    page_param: str = "page"
    offset_param: str = "offset"
    size_param: str | None = "limit"
    page_size: int | None = None
    cursor_param: str = "cursor"
    cursor_path: str | None = None
    first_page: int = 1
    max_pages_per_poll: int = 100


@dataclass(frozen=True, slots=True)
class Incremental:
    """Ask only for records newer than the largest ``path`` value seen, as ``param``."""

    param: str
    path: str
    initial: str | int | float | None = None


@dataclass(frozen=True, slots=True)
class PollConfig:
    """A poll source's settings, from the ``config`` column of its ``sources`` row.

    ``headers`` may hold secrets (an ``Authorization`` value): they are kept out of
    ``repr`` and must never be logged.
    """

    url: str
    interval_seconds: float = 60.0
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    params: tuple[tuple[str, str], ...] = ()
    records_path: str = "$"
    pagination: Pagination = Pagination()
    incremental: Incremental | None = None
    etag: bool = True
    timeout_seconds: float = 10.0
    max_retries: int = 5
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    retry_after_max_seconds: float = 300.0


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP GET: the URL, its query parameters and headers."""

    url: str
    params: tuple[tuple[str, str], ...]
    headers: tuple[tuple[str, str], ...] = field(repr=False)

    def key(self) -> str:
        """Identifies the request (not its headers), to match an ETag with it."""
        return self.url + "?" + urlencode(sorted(self.params))

    def full_url(self) -> str:
        """The URL with its query parameters, as a ``link`` position is kept."""
        if not self.params:
            return self.url
        return self.url + ("&" if "?" in self.url else "?") + urlencode(self.params)


@dataclass(frozen=True, slots=True)
class Step:
    """What one answered page means: the records to deliver and the state after them.

    Attributes:
        records: the page's new records (those already delivered are dropped).
        state: the cursor state to save once ``records`` are acknowledged.
        done: this poll stops after the page.
        more: the run was cut by ``max_pages_per_poll``; poll again soon.
        reason: why the poll stops (empty when it does not).
        first_index: position of ``records[0]`` in the page (records skipped before it).
    """

    records: list[Any]
    state: dict[str, Any]
    done: bool
    more: bool = False
    reason: str = ""
    first_index: int = 0


def _fail(name: str, key: str, expected: str, got: Any) -> ConfigurationError:
    return ConfigurationError(
        f"poll source {name!r}: config key {key!r} expected {expected}, got {got!r}; "
        f"fix it with `rayline sources add {name} --kind poll --config '{{...}}'`"
    )


def _number(name: str, spec: Mapping[str, Any], key: str, default: float, low: float) -> float:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
        raise _fail(name, key, f"a number >= {low}", value)
    return float(value)


def _integer(name: str, spec: Mapping[str, Any], key: str, default: Any, low: int) -> Any:
    value = spec.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(name, key, f"an integer >= {low}", value)
    return value


def _text(name: str, spec: Mapping[str, Any], key: str, default: Any) -> Any:
    value = spec.get(key, default)
    if value is None and default is None:
        return None
    if not isinstance(value, str) or not value:
        raise _fail(name, key, "a non-empty string", value)
    return value


def _path(name: str, spec: Mapping[str, Any], key: str, default: Any) -> Any:
    value = _text(name, spec, key, default)
    if value is not None and not _PATH_RE.match(value):
        raise _fail(name, key, "a path such as $, $.data or $.result.items[0]", value)
    return value


def _check_keys(name: str, spec: Any, allowed: frozenset[str], where: str) -> None:
    if not isinstance(spec, Mapping):
        raise _fail(name, where, "a JSON object", spec)
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigurationError(
            f"poll source {name!r}: unknown key(s) {unknown} in {where}; "
            f"expected some of {sorted(allowed)}"
        )


def _string_pairs(name: str, spec: Mapping[str, Any], key: str) -> tuple[tuple[str, str], ...]:
    value = spec.get(key, {})
    if not isinstance(value, Mapping) or not all(
        isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value.values()
    ):
        # Never echo header values: they are often credentials.
        shown = sorted(value) if isinstance(value, Mapping) else type(value).__name__
        raise _fail(name, key, "an object of string values", shown)
    return tuple((str(k), str(v)) for k, v in value.items())


def _parse_pagination(name: str, spec: Any) -> Pagination:
    _check_keys(name, spec, _PAGINATION_KEYS, "pagination")
    kind = spec.get("type", "none")
    if kind not in PAGINATION_TYPES:
        raise _fail(name, "pagination.type", f"one of {list(PAGINATION_TYPES)}", kind)
    size = _integer(name, spec, "page_size", None, 1)
    if kind in ("page", "offset") and size is None:
        raise _fail(name, "pagination.page_size", f"an integer >= 1 for {kind} pagination", None)
    cursor_path = _path(name, spec, "cursor_path", None)
    if kind == "cursor" and cursor_path is None:
        raise _fail(name, "pagination.cursor_path", "a path such as $.next_cursor", None)
    size_param = spec.get("size_param", "limit")
    if size_param is not None and (not isinstance(size_param, str) or not size_param):
        raise _fail(name, "pagination.size_param", "a non-empty string or null", size_param)
    return Pagination(
        type=kind,
        page_param=_text(name, spec, "page_param", "page"),
        offset_param=_text(name, spec, "offset_param", "offset"),
        size_param=size_param,
        page_size=size,
        cursor_param=_text(name, spec, "cursor_param", "cursor"),
        cursor_path=cursor_path,
        first_page=_integer(name, spec, "first_page", 1, 0),
        max_pages_per_poll=_integer(name, spec, "max_pages_per_poll", 100, 1),
    )


def _parse_incremental(name: str, spec: Any) -> Incremental | None:
    if spec is None:
        return None
    _check_keys(name, spec, _INCREMENTAL_KEYS, "incremental")
    initial = spec.get("initial")
    if initial is not None and (
        isinstance(initial, bool) or not isinstance(initial, (str, int, float))
    ):
        raise _fail(name, "incremental.initial", "a string or a number", initial)
    return Incremental(
        param=_text(name, spec, "param", ""),
        path=_path(name, spec, "path", ""),
        initial=initial,
    )


def parse_poll_config(name: str, config: Mapping[str, Any]) -> PollConfig:
    """Validate a poll source's ``config`` JSON.

    Raises:
        ConfigurationError: naming the source, the key, what was expected and what came.
    """
    _check_keys(name, config, _TOP_KEYS, "config")
    url = config.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise _fail(name, "url", "an http:// or https:// URL", url)
    etag = config.get("etag", True)
    if not isinstance(etag, bool):
        raise _fail(name, "etag", "true or false", etag)
    base = _number(name, config, "backoff_base_seconds", 0.5, 0.0)
    cap = _number(name, config, "backoff_max_seconds", 30.0, 0.0)
    if cap < base:
        raise _fail(name, "backoff_max_seconds", f"a number >= backoff_base_seconds ({base})", cap)
    return PollConfig(
        url=url,
        interval_seconds=_number(name, config, "interval_seconds", 60.0, 0.1),
        headers=_string_pairs(name, config, "headers"),
        params=_string_pairs(name, config, "params"),
        records_path=_path(name, config, "records_path", "$"),
        pagination=_parse_pagination(name, config.get("pagination", {})),
        incremental=_parse_incremental(name, config.get("incremental")),
        etag=etag,
        timeout_seconds=_number(name, config, "timeout_seconds", 10.0, 0.1),
        max_retries=_integer(name, config, "max_retries", 5, 0),
        backoff_base_seconds=base,
        backoff_max_seconds=cap,
        retry_after_max_seconds=_number(name, config, "retry_after_max_seconds", 300.0, 0.0),
    )


_MISSING = object()


def lookup(value: Any, path: str) -> Any:
    """The value at ``path`` (``$``, ``$.a.b``, ``$.a[0].b``), or None when absent."""
    for name, index in _STEP_RE.findall(path[1:]):
        if name:
            value = value.get(name, _MISSING) if isinstance(value, dict) else _MISSING
        else:
            position = int(index)
            ok = isinstance(value, list) and position < len(value)
            value = value[position] if ok else _MISSING
        if value is _MISSING:
            return None
    return value


def records_of(config: PollConfig, body: Any) -> list[Any]:
    """The record list of a decoded response body.

    Raises:
        InvalidInputError: when ``records_path`` does not lead to a list.
    """
    found = lookup(body, config.records_path)
    if not isinstance(found, list):
        kind = "nothing" if found is None else type(found).__name__
        raise InvalidInputError(
            f"expected a JSON array of records at {config.records_path!r} of the response "
            f"from {config.url}, found {kind}; check the source's records_path"
        )
    return found


def next_request(config: PollConfig, state: Mapping[str, Any]) -> Request:
    """The request for the position ``state`` is at."""
    pg = config.pagination
    url = config.url
    params = dict(config.params)
    if config.incremental is not None:
        since = state.get("since", config.incremental.initial)
        if since is not None:
            params[config.incremental.param] = str(since)
    if pg.type == "link" and state.get("url"):
        # The link carries every parameter the server wants, the page size included.
        url, params = str(state["url"]), {}
    elif pg.type != "none" and pg.size_param and pg.page_size is not None:
        params[pg.size_param] = str(pg.page_size)
    if pg.type == "page":
        params[pg.page_param] = str(state.get("page", pg.first_page))
    elif pg.type == "offset":
        params[pg.offset_param] = str(state.get("offset", 0))
    elif pg.type == "cursor" and state.get("cursor"):
        params[pg.cursor_param] = str(state["cursor"])
    request = Request(url, tuple(params.items()), config.headers)
    etag = state.get("etag")
    if config.etag and etag and state.get("etag_key") == request.key():
        request = Request(url, request.params, (*config.headers, ("If-None-Match", str(etag))))
    return request


def parse_link_header(value: str | None, base_url: str) -> dict[str, str]:
    """RFC 8288 ``Link`` header: {relation: absolute URL}; the first link of a rel wins."""
    links: dict[str, str] = {}
    for match in _LINK_RE.finditer(value or ""):
        target, params = match.group(1).strip(), match.group(2)
        rel = re.search(r';\s*rel\s*=\s*(?:"([^"]*)"|([^\s;,"]+))', params, re.IGNORECASE)
        if rel is None:
            continue
        for relation in (rel.group(1) or rel.group(2) or "").lower().split():
            links.setdefault(relation, urljoin(base_url, target))
    return links


def _newer(a: Any, b: Any) -> bool:
    """True when incremental value ``a`` is past ``b`` (numbers as numbers, else text)."""
    if b is None:
        return True
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers):
        return bool(a > b)
    return str(a) > str(b)


def _max_seen(config: PollConfig, state: Mapping[str, Any], records: list[Any]) -> Any:
    best = state.get("max_seen")
    assert config.incremental is not None
    for record in records:
        value = lookup(record, config.incremental.path)
        if value is not None and not isinstance(value, (bool, dict, list)) and _newer(value, best):
            best = value
    return best


def _resting(config: PollConfig, state: dict[str, Any]) -> dict[str, Any]:
    """The state at the end of a finished run (see the module docstring)."""
    if config.incremental is None:
        return state
    since = state.get("since", config.incremental.initial)
    best = state.pop("max_seen", None)
    if best is not None and _newer(best, since):
        since = best
    rest = {k: v for k, v in state.items() if k in ("etag", "etag_key")}
    if since is not None:
        rest["since"] = since
    return rest


def _body_cursor(config: PollConfig, body: Any) -> str | None:
    assert config.pagination.cursor_path is not None
    value = lookup(body, config.pagination.cursor_path)
    if value is None or value == "" or isinstance(value, (bool, dict, list)):
        return None
    return str(value)


def _move(
    config: PollConfig,
    state: dict[str, Any],
    request: Request,
    body: Any,
    link: str | None,
    total: int,
) -> str:
    """Move ``state`` past a page of ``total`` records; return why the run ends, or ""."""
    pg = config.pagination
    full = pg.page_size is None or total >= pg.page_size
    skip = int(state.get("skip", 0))
    if pg.type == "none":
        return "single request"
    if pg.type == "offset":
        state["offset"] = int(state.get("offset", 0)) + total
        return "" if total and full else ("empty page" if not total else "short page")
    if pg.type == "page":
        if total and full:
            state["page"], state["skip"] = int(state.get("page", pg.first_page)) + 1, 0
            return ""
        state["skip"] = max(skip, total)
        return "empty page" if not total else "short page"
    key, following = (
        ("cursor", _body_cursor(config, body)) if pg.type == "cursor" else ("url", link)
    )
    current = state.get(key) or (None if pg.type == "cursor" else request.full_url())
    if following is not None and following != current:
        state[key], state["skip"] = following, 0
        return "" if total else "empty page"
    state["skip"] = max(skip, total)
    return "empty page" if not total else f"no next {'cursor' if key == 'cursor' else 'link'}"


def advance(
    config: PollConfig,
    state: Mapping[str, Any],
    request: Request,
    status: int,
    headers: Mapping[str, str],
    body: Any,
    pages_done: int,
) -> Step:
    """Interpret one answered page (``headers`` with lower-case names).

    Args:
        config: the source's settings.
        state: the cursor state ``request`` was built from.
        request: the request that was answered.
        status: its HTTP status (200 or 304).
        headers: the response headers, names in lower case.
        body: the decoded JSON body (ignored for 304).
        pages_done: pages of this poll before this one.

    Raises:
        InvalidInputError: when the body has no record list at ``records_path``.
        core.egress.EgressRefused: when ``link`` pagination's next link leaves the
            configured URL's origin (scheme, host, port).
    """
    new = dict(state)
    if status == 304:
        return Step([], new, done=True, reason="not modified")
    records = records_of(config, body)
    skip = int(new.get("skip", 0)) if config.pagination.type != "none" else 0
    fresh = records[skip:]
    if config.incremental is not None:
        best = _max_seen(config, new, fresh)
        if best is not None:
            new["max_seen"] = best
    link = parse_link_header(headers.get("link"), request.full_url()).get("next")
    if link is not None and config.pagination.type == "link":
        # Before anything of the page is delivered: the source's headers (credentials)
        # must not follow a link to another host, and the run cannot go on without it.
        require_same_origin(link, config.url)
    reason = _move(config, new, request, body, link, len(records))
    new.pop("etag", None)
    new.pop("etag_key", None)
    if config.etag and headers.get("etag"):
        new["etag"], new["etag_key"] = headers["etag"], request.key()
    if reason:
        return Step(fresh, _resting(config, new), True, reason=reason, first_index=skip)
    if pages_done + 1 >= config.pagination.max_pages_per_poll:
        return Step(fresh, new, True, more=True, reason="max pages per poll", first_index=skip)
    return Step(fresh, new, done=False, first_index=skip)


def backoff_delay(attempt: int, base: float, cap: float, uniform: float) -> float:
    """Full-jitter backoff: ``min(cap, base * 2**attempt) * uniform``, ``uniform`` in [0, 1)."""
    return min(cap, base * 2.0 ** min(max(attempt, 0), _MAX_EXPONENT)) * uniform


def parse_retry_after(value: str | None, now_s: float, cap: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or an HTTP date).

    Returns None when the header is missing or unreadable (the caller backs off as for
    any other failure); a past date means 0; the wait never exceeds ``cap``.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = None
    if seconds is not None:
        return min(seconds, cap) if seconds >= 0 else None  # nan compares False
    try:
        when: datetime = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(0.0, when.timestamp() - now_s), cap)
