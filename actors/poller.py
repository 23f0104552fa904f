"""One poll cycle of one REST API source: fetch pages, deliver records, move the cursor.

The decisions (which request, what a page means, how long to wait) live in
:mod:`core.polling`; this module does the I/O, and holds no Ray call.

**Delivery.** For each page, the poller maps every new record to an envelope, produces
the valid ones to the raw topic and the rejected ones to the dead-letter topic, waits
until the broker acknowledged all of them (``acks=all``, idempotent producer), and only
then saves the cursor that lies past the page in ``source_cursors``. So:

* a crash or an error before the acknowledgement leaves the cursor where it was: the
  page is asked for again, nothing is skipped;
* a page whose cursor was saved is never asked for again;
* one window repeats a page: a crash after Kafka acknowledged the page's records but
  before the cursor was written. The page is then produced twice, with the same
  ``event_id`` values, and the pipeline's deduplication by ``event_id`` drops the
  second copy, so the effect is still once.

**Failures.** Connection errors, timeouts and 5xx answers are retried up to
``max_retries`` times with full-jitter exponential backoff; a 429 waits for its
``Retry-After`` (capped) before the next request. Other 4xx answers (a wrong URL, a
revoked token) end the cycle at once. Statistics are recorded once per page.

**Egress.** Every request goes through :mod:`adapters.http_egress` under the settings'
egress policy (:mod:`core.egress`): the host's addresses are checked (loopback,
link-local, private and reserved ones are refused unless allowlisted) and the connection
pinned to a checked one; a page's ``Link: rel=next`` or a stored cursor URL is followed
only within the configured URL's origin, so the source's headers reach no other host;
redirects are not followed; a body over ``polling.max_response_bytes`` or a request over
``polling.max_request_seconds`` ends the cycle with an error, and nothing of that answer
is delivered. A refused address or link is not retried: it needs the operator.

Header values of a source may be credentials: they are sent, never logged.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from adapters import http_egress
from adapters.exceptions import Backpressure, StoreUnavailable
from adapters.kafka import AsyncBatchProducer
from adapters.poll_cursors import CursorStore
from adapters.publisher import EventPublisher, Outgoing, raw_headers
from adapters.source_stats import SourceStats
from adapters.sources import Source
from core.egress import EgressPolicy, require_same_origin
from core.envelope import validate_events
from core.exceptions import ConfigurationError, InvalidInputError, RaylineError
from core.polling import (
    PollConfig,
    Request,
    advance,
    backoff_delay,
    next_request,
    parse_poll_config,
    parse_retry_after,
)
from core.source_mapping import EnvelopeMapping, apply_mapping, parse_mapping

log = logging.getLogger(__name__)
_RETRIED_STATUS = frozenset({408, 500, 502, 503, 504})
_SEND_ATTEMPTS = 5


class PollFailed(RaylineError):
    """The API did not answer a poll usefully (after retries, where retrying helps)."""


@dataclass(frozen=True, slots=True)
class PollSource:
    """A poll source's parsed settings: its name, tenant, poll config and mapping."""

    name: str
    tenant: str
    config: PollConfig
    mapping: EnvelopeMapping


def poll_source(source: Source) -> PollSource:
    """Parse a ``sources`` row of kind ``poll``.

    Raises:
        ConfigurationError: when the row has no tenant or a bad config or mapping.
    """
    if source.tenant is None:
        raise ConfigurationError(
            f"poll source {source.name!r} has no tenant; a poller writes into exactly one "
            f"tenant: add it again with --tenant"
        )
    return PollSource(
        source.name,
        source.tenant,
        parse_poll_config(source.name, source.config),
        parse_mapping(source.mapping),
    )


@dataclass(frozen=True, slots=True)
class Topics:
    raw: str
    dlq: str


@dataclass(slots=True)
class CycleReport:
    """What one cycle did; ``error`` is set when it stopped on a failure."""

    pages: int = 0
    accepted: int = 0
    rejected: int = 0
    errors: int = 0
    more: bool = False
    stopped: str = ""
    error: str | None = None
    cursor: dict[str, Any] = field(default_factory=dict)


class Poller:
    """Runs poll cycles of one source, from one thread at a time.

    Args:
        source: the parsed source.
        producer: shared by the sources of a process (it is thread-safe).
        cursors: this poller's own cursor store (one connection, one thread).
        stats: where per-page statistics go.
        topics: the raw and dead-letter topics.
        client: the HTTP client (one is made with the source's timeout when None).
        egress: what the poller may reach and how much it reads (default: public
            addresses only).
        clock: epoch seconds.
        sleep: waits a number of seconds; may return early when the poller should stop.
        uniform: a random number in [0, 1), for backoff jitter.
        should_stop: checked between pages and requests.
    """

    def __init__(
        self,
        source: PollSource,
        *,
        producer: AsyncBatchProducer,
        cursors: CursorStore,
        stats: SourceStats,
        topics: Topics,
        client: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], object] = time.sleep,
        uniform: Callable[[], float] = random.random,
        should_stop: Callable[[], bool] = lambda: False,
        egress: EgressPolicy | None = None,
    ) -> None:
        self.source = source
        self._egress = egress or EgressPolicy()
        self._publisher = EventPublisher(producer, topics.raw, topics.dlq)
        self._cursors = cursors
        self._stats = stats
        self._topics = topics
        self._client = client or http_egress.make_client(
            self._egress, source.config.timeout_seconds
        )
        self._own_client = client is None
        self._clock = clock
        self._sleep = sleep
        self._uniform = uniform
        self._should_stop = should_stop

    def close(self) -> None:
        if self._own_client:
            self._client.close()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def run_cycle(self) -> CycleReport:
        """Fetch and deliver pages until a stop condition, a failure or a stop request."""
        report = CycleReport()
        try:
            state = self._cursors.load(self.source.name) or {}
            report.cursor = state
            while not self._should_stop():
                request = next_request(self.source.config, state)
                response = self._fetch(request, report)
                if response is None:  # asked to stop while waiting
                    break
                status, headers, body = response
                step = advance(
                    self.source.config, state, request, status, headers, body, report.pages
                )
                report.pages += 1
                accepted, rejected = self._deliver(step.records, step.first_index, headers)
                if step.state != state:
                    self._cursors.save(self.source.name, step.state)
                self._record(accepted=accepted, rejected=rejected)
                report.accepted += accepted
                report.rejected += rejected
                state = report.cursor = step.state
                if step.done:
                    report.more, report.stopped = step.more, step.reason
                    break
        except (PollFailed, InvalidInputError, StoreUnavailable, Backpressure) as exc:
            report.errors += 1
            report.error = f"poll source {self.source.name!r}: {exc}"
            self._record(errors=1, error=report.error)
            log.warning("%s", report.error)
        return report

    def _record(self, **counts: Any) -> None:
        self._stats.record(self.source.name, now_ms=self._now_ms(), **counts)

    # HTTP ----------------------------------------------------------------------------

    def _fetch(
        self, request: Request, report: CycleReport
    ) -> tuple[int, dict[str, str], Any] | None:
        """(status, lower-case headers, decoded body) of a 200 or 304; None when stopping.

        Raises:
            PollFailed: after the retries, or at once on a 4xx other than 408 and 429.
            InvalidInputError: when a 200 answer is not JSON.
        """
        cfg = self.source.config
        problem = ""
        for attempt in range(cfg.max_retries + 1):
            if self._should_stop():
                return None
            wait, problem, answer = self._attempt(request, attempt)
            if answer is not None:
                return answer
            if wait is None:
                raise PollFailed(problem)
            if not problem.startswith("429"):
                report.errors += 1
                self._record(errors=1, error=problem)
            self._sleep(wait)
        raise PollFailed(f"{problem}; gave up after {cfg.max_retries + 1} attempts")

    def _attempt(
        self, request: Request, attempt: int
    ) -> tuple[float | None, str, tuple[int, dict[str, str], Any] | None]:
        """One request: (seconds to wait before retrying or None for no retry, problem,
        answer)."""
        cfg = self.source.config
        backoff = backoff_delay(
            attempt, cfg.backoff_base_seconds, cfg.backoff_max_seconds, self._uniform()
        )
        # A stored cursor URL or a link is followed only within the configured origin.
        require_same_origin(request.url, cfg.url)
        try:
            # The full URL, not params=: httpx would drop a query the URL carries already.
            response = http_egress.get(
                self._client, request.full_url(), list(request.headers), self._egress
            )
        except httpx.TransportError as exc:
            return backoff, f"GET {request.url} failed: {type(exc).__name__}: {exc}", None
        status = response.status
        headers = response.headers
        if status == 429:
            after = parse_retry_after(
                headers.get("retry-after"), self._clock(), cfg.retry_after_max_seconds
            )
            return (backoff if after is None else after), f"429 rate limited by {request.url}", None
        if status in _RETRIED_STATUS:
            return backoff, f"GET {request.url} answered {status}", None
        if status == 304 or status == 200:
            return None, "", (status, headers, self._decode(request, response))
        moved = " (redirects are not followed)" if 300 <= status < 400 else ""
        return (
            None,
            (
                f"GET {request.url} answered {status}{moved}: {response.content[:200]!r}; "
                "check the source's url, params and headers"
            ),
            None,
        )

    @staticmethod
    def _decode(request: Request, response: http_egress.Answer) -> Any:
        if response.status == 304:
            return None
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise InvalidInputError(
                f"expected a JSON body from {request.url}, got {response.content[:80]!r} ({exc})"
            ) from exc

    # Records -------------------------------------------------------------------------

    def _deliver(
        self, records: list[Any], first_index: int, headers: Mapping[str, str]
    ) -> tuple[int, int]:
        """Produce a page's records and wait for Kafka's acknowledgement of all of them."""
        if not records:
            return 0, 0
        batch = self._split(records, first_index, headers)
        self._send(batch)
        return len(batch.raw), len(batch.dead)

    def _split(self, records: list[Any], first_index: int, headers: Mapping[str, str]) -> Outgoing:
        src = self.source
        received_at_ms = self._now_ms()
        mapped: list[Any] = []
        problems: list[list[str]] = []
        for record in records:
            event, found = apply_mapping(
                src.mapping, record, headers=headers, received_at_ms=received_at_ms
            )
            if isinstance(event, dict):
                # The source's tenant wins: a poller must not write into another tenant.
                event = {**event, "tenant": src.tenant, "source": src.name}
            mapped.append(event)
            problems.append(found)
        envelopes, errors = validate_events(
            mapped, default_source=src.name, received_at_ms=received_at_ms
        )
        reasons: dict[int, list[str]] = {}
        for error in errors:
            if error.index is not None:
                reasons.setdefault(error.index, []).append(str(error))
        batch = Outgoing()
        accepted = [i for i in range(len(records)) if i not in reasons]
        for position, problem in batch.add_envelopes(envelopes, raw_headers()):
            reasons[accepted[position]] = [problem]
        for index in sorted(reasons):
            batch.dead_letter(
                "poll",
                "; ".join(reasons[index] + problems[index]),
                orjson.dumps(records[index]),
                received_at_ms,
                source=src.name,
                tenant=src.tenant,
                index=first_index + index,
            )
        return batch

    def _send(self, batch: Outgoing) -> None:
        for attempt in range(_SEND_ATTEMPTS):
            try:
                self._publisher.publish_blocking(batch)
                return
            except Backpressure as exc:
                if attempt == _SEND_ATTEMPTS - 1:
                    raise
                self._sleep(exc.retry_after)
