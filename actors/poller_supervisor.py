"""The poller supervisor: runs every enabled poll source on its interval.

``PollerSupervisor`` is the body of one named, detached Ray actor (``cluster/deploy.py``
creates it with ``ray.remote``); it makes no Ray call itself, so it also runs in a
plain process (the integration tests do that). Every ``refresh_seconds`` it reads the
poll sources from PostgreSQL and reconciles: a new or re-enabled source gets a thread,
a changed one (config, mapping or tenant) is stopped and started again with its new
settings once its current page is done, a disabled or removed one is stopped. Each
source has its own thread, HTTP client and cursor connection, so a slow or failing
source never delays the others; the Kafka producer is shared (it is thread-safe).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from actors.poller import Poller, PollSource, Topics, poll_source
from adapters.exceptions import StoreUnavailable
from adapters.kafka import AsyncBatchProducer
from adapters.poll_cursors import CursorStore
from adapters.source_stats import SourceStats
from adapters.sources import Source, SourceCatalog
from core.egress import EgressPolicy
from core.exceptions import ConfigurationError

SUPERVISOR_NAME = "rayline-poller-supervisor"
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    """Where the supervisor reads sources and cursors and writes events."""

    dsn: str
    bootstrap: str
    raw_topic: str
    dlq_topic: str
    redis_url: str
    refresh_seconds: float = 5.0
    linger_ms: int = 5
    queue_max_messages: int = 100_000
    egress: EgressPolicy = field(default_factory=EgressPolicy)


@dataclass(slots=True)
class SourceStatus:
    state: str = "starting"
    last_run_ms: int | None = None
    last_success_ms: int | None = None
    pages: int = 0
    events: int = 0
    rejected: int = 0
    errors: int = 0
    last_error: str | None = None
    cursor: dict[str, Any] = field(default_factory=dict)


class _SourceRunner:
    """One source's thread: a cycle whenever its interval is due, until stopped."""

    def __init__(
        self,
        source: Source,
        parsed: PollSource,
        config: SupervisorConfig,
        producer: AsyncBatchProducer,
        stats: SourceStats,
        status: SourceStatus,
    ) -> None:
        self.source = source
        self._parsed = parsed
        self._config = config
        self._producer = producer
        self._stats = stats
        self.status = status
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"poll-{source.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        cursors = CursorStore(self._config.dsn)
        poller = Poller(
            self._parsed,
            producer=self._producer,
            cursors=cursors,
            stats=self._stats,
            topics=Topics(self._config.raw_topic, self._config.dlq_topic),
            sleep=self.stopping.wait,
            should_stop=self.stopping.is_set,
            egress=self._config.egress,
        )
        try:
            self._loop(poller)
        finally:
            poller.close()
            cursors.close()

    def _loop(self, poller: Poller) -> None:
        interval = self._parsed.config.interval_seconds
        while not self.stopping.is_set():
            self.status.state = "polling"  # may race with a stop; the next refresh corrects it
            started = time.time()
            report = poller.run_cycle()
            st = self.status
            st.last_run_ms = int(started * 1000)
            st.pages += report.pages
            st.events += report.accepted
            st.rejected += report.rejected
            st.errors += report.errors
            st.cursor = report.cursor
            if report.error is None:
                st.last_success_ms = int(time.time() * 1000)
            else:
                st.last_error = report.error
            if not self.stopping.is_set():  # the supervisor names a stopped runner's state
                st.state = "waiting"
            # A run cut by max_pages_per_poll goes on at once; otherwise wait an interval.
            self.stopping.wait(0.0 if report.more else max(0.0, started + interval - time.time()))


class PollerSupervisor:
    """Actor body: keeps one runner per enabled poll source; reports their progress."""

    def __init__(self, config: SupervisorConfig, start: bool = True) -> None:
        self._config = config
        self._producer = AsyncBatchProducer(
            config.bootstrap,
            linger_ms=config.linger_ms,
            queue_max_messages=config.queue_max_messages,
        )
        self._stats = SourceStats(config.redis_url)
        self._catalog = SourceCatalog(config.dsn, max_size=1)
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._runners: dict[str, _SourceRunner] = {}
        self._retired: list[_SourceRunner] = []
        self._status: dict[str, SourceStatus] = {}
        self._invalid: dict[str, tuple[Source, str]] = {}
        self._closing = threading.Event()
        self._paused = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._refresh_loop, name="poll-supervisor")
            self._thread.daemon = True
            self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._closing.is_set():
            try:
                self.refresh()
            except StoreUnavailable as exc:
                log.warning("poller supervisor could not read the sources: %s", exc)
            self._closing.wait(self._config.refresh_seconds)

    def refresh(self) -> None:
        """Read the poll sources once and start, restart or stop runners to match."""
        sources = self._loop.run_until_complete(self._catalog.sources("poll"))
        wanted = {} if self._paused.is_set() else {s.name: s for s in sources if s.enabled}
        with self._lock:
            self._retired = [r for r in self._retired if r.thread.is_alive()]
            for name, runner in list(self._runners.items()):
                if wanted.get(name) != runner.source:
                    self._retire(name)
            for name in set(self._status) - {s.name for s in sources}:
                self._status.pop(name)
                self._invalid.pop(name, None)
            for source in sources:
                if not source.enabled:
                    self._status.setdefault(source.name, SourceStatus()).state = "disabled"
                elif source.name in wanted and source.name not in self._runners:
                    self._start(source)

    def _retire(self, name: str) -> None:
        runner = self._runners.pop(name)
        runner.stopping.set()
        runner.status.state = "stopping"
        self._retired.append(runner)

    def _start(self, source: Source) -> None:
        status = self._status.setdefault(source.name, SourceStatus())
        if any(r.source.name == source.name for r in self._retired):
            status.state = "restarting"  # the old runner finishes its page first
            return
        try:
            parsed = poll_source(source)
        except ConfigurationError as exc:
            status.state, status.last_error = "invalid", str(exc)
            if self._invalid.get(source.name, (None, ""))[0] != source:
                self._invalid[source.name] = (source, str(exc))
                self._stats.record(
                    source.name, now_ms=int(time.time() * 1000), errors=1, error=str(exc)
                )
            return
        self._invalid.pop(source.name, None)
        status.state, status.last_error = "starting", None
        self._runners[source.name] = _SourceRunner(
            source, parsed, self._config, self._producer, self._stats, status
        )

    def status(self) -> dict[str, dict[str, Any]]:
        """Per source: state, last run and success (epoch ms), pages, events, errors,
        last error and cursor."""
        with self._lock:
            return {
                name: {
                    "state": s.state,
                    "last_run_ms": s.last_run_ms,
                    "last_success_ms": s.last_success_ms,
                    "pages": s.pages,
                    "events": s.events,
                    "rejected": s.rejected,
                    "errors": s.errors,
                    "last_error": s.last_error,
                    "cursor": dict(s.cursor),
                }
                for name, s in sorted(self._status.items())
            }

    def pause(self, timeout: float = 60.0) -> bool:
        """Stop polling until :meth:`resume`: the next refresh retires every runner (each
        finishes its page). True once none is left within ``timeout`` seconds."""
        self._paused.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = bool(self._runners) or any(r.thread.is_alive() for r in self._retired)
            if not busy:
                return True
            time.sleep(0.2)
        return False

    def resume(self) -> None:
        """Poll again from the next refresh on, each source from its saved cursor."""
        self._paused.clear()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every runner (each finishes its current page) and release connections."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            for name in list(self._runners):
                self._retire(name)
            retired = list(self._retired)
        for runner in retired:
            runner.thread.join(timeout)
        self._producer.close()
        self._stats.close()
        self._loop.run_until_complete(self._catalog.close())
        self._loop.close()
