"""The alerting engine: sealed windows and CEP matches in, incidents and pages out.

:class:`AlertEngine` is plain Python (no Ray call), testable with in-memory fakes. Each
:meth:`AlertEngine.step`:

1. reloads the enabled rules and the silences from PostgreSQL (a deleted or disabled
   rule's open incidents resolve, with the summary saying why);
2. takes the acknowledge requests the API queued and acknowledges those incidents;
3. reads the next sealed one-minute windows (``start > cursor``, oldest first) from a
   :class:`SealedWindowFeed` and judges each with ``core.alert_rules.RuleEvaluator``;
4. reads new CEP matches (the ``alerts`` topic) for ``cep`` rules, and resolves CEP
   incidents whose key stayed quiet (``core.cep_alerts``);
5. folds every signal into ``core.incidents.IncidentBook``, and commits in one
   transaction the incidents it changed, the notifications it queued (one outbox row
   per configured channel), and the snapshot of evaluator, book and cursors;
6. delivers the queued notifications (``adapters.notifiers``), each try logged.

Because the snapshot and the queued notifications are written together, a restart
resumes from the last committed step: it never evaluates a window twice (no second
page) and still knows every firing incident. A notification queued but not yet sent
when the process died is sent after the restart (at least once per channel).

A rule judges only the windows that come: when a group's windows stop (no events, so
no sealed window), its incident is neither resolved nor re-paged by itself; it stays
open until a window that is not breached arrives, the rule is deleted or disabled, or
(for a ``cep`` rule) its quiet time passes.

:class:`AlertingActor` is the thin Ray actor (``rayline-alerting``) that runs the engine
on a background thread, with ``pause``/``resume``/``status``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import orjson
import ray
from confluent_kafka import OFFSET_END, KafkaException, TopicPartition
from ray.exceptions import RayError

from actors.clickhouse_owner import OWNER_NAME
from adapters.alert_store import AckRequest, AlertStore, EngineState, OutboxItem, StepWrite
from adapters.exceptions import StoreUnavailable
from adapters.kafka import make_consumer, partition_ids
from adapters.notifiers import ChannelConfig, build_senders
from core.alert_rules import AlertRule, RuleEvaluator
from core.cep_alerts import CepAlertRule, CepAlertTracker, parse_rule_spec
from core.exceptions import ConfigurationError, InvalidInputError
from core.incidents import Incident, IncidentBook, Notification, Signal, Silence
from core.sealed import SealedWindow

ACTOR_NAME = "rayline-alerting"
log = logging.getLogger(__name__)


class SealedWindowFeed(Protocol):
    """Sealed one-minute windows, as ``SealedWindow.to_row()`` dicts."""

    def sealed_windows(self, after_ms: int, limit: int) -> list[dict[str, Any]]:
        """Rows of the minutes whose start is after ``after_ms``, oldest first."""
        ...


class CepMatchFeed(Protocol):
    """CEP matches (``core.cep.Match.as_json``) from a position the engine keeps."""

    def poll(
        self, offsets: Mapping[str, int], max_records: int
    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """(matches, offsets after them); ``offsets`` is where the last commit stands."""
        ...

    def reset(self) -> None:
        """Forget the read position: the next poll starts again from its ``offsets``."""
        ...


class Channel(Protocol):
    """A notification channel (``adapters.notifiers.Sender``)."""

    channel: str

    def deliver(self, notification: Notification) -> bool: ...


class AlertEngineStore(Protocol):
    """What the engine reads and writes (``adapters.alert_store.AlertStore``)."""

    def rules(self) -> list[dict[str, Any]]: ...
    def silences(self, now_ms: int) -> list[Silence]: ...
    def load_state(self, name: str) -> EngineState | None: ...
    def commit(self, name: str, write: StepWrite) -> None: ...
    def pending_outbox(self, limit: int = 100) -> list[OutboxItem]: ...
    def finish_outbox(self, item_id: int, delivered: bool) -> None: ...
    def pending_acks(self, limit: int = 100) -> list[AckRequest]: ...


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How the engine reads.

    Attributes:
        batch_limit: Most sealed windows read in one step.
        first_cursor_ms: Where a first start (no saved state) begins reading: windows
            starting after it. None: the wall clock, so history is not paged.
        state_name: The ``alerting_state`` row of this engine.
        max_matches: Most CEP matches read in one step.
    """

    batch_limit: int = 5000
    first_cursor_ms: int | None = None
    state_name: str = "default"
    max_matches: int = 1000


@dataclass(slots=True)
class StepReport:
    windows: int = 0
    matches: int = 0
    signals: int = 0
    notifications: int = 0
    delivered: int = 0
    failed: int = 0
    more: bool = False


@dataclass(slots=True)
class _Step:
    """What one step gathers before it commits."""

    now_ms: int
    before: dict[str, Incident]
    notifications: list[Notification] = field(default_factory=list)
    last_signal: dict[tuple[str, str, str], int] = field(default_factory=dict)
    acks_done: list[tuple[int, str]] = field(default_factory=list)


class AlertEngine:
    """Rules, incidents and channels; see the module docstring for one step."""

    def __init__(
        self,
        store: AlertEngineStore,
        feed: SealedWindowFeed,
        channels: Sequence[Channel],
        *,
        matches: CepMatchFeed | None = None,
        clock: Callable[[], float] = time.time,
        config: EngineConfig | None = None,
    ) -> None:
        self._store = store
        self._feed = feed
        self._channels = {c.channel: c for c in channels}
        self._matches = matches
        self._clock = clock
        self._config = config or EngineConfig()
        self._evaluator = RuleEvaluator()
        self._cep = CepAlertTracker()
        self._book = IncidentBook()
        self._silences: list[Silence] = []
        self._rule_keys: set[tuple[str, str]] = set()
        self._bad_specs: set[str] = set()
        self._cursor_ms = 0
        self._offsets: dict[str, int] = {}
        self._loaded = False

    @property
    def cursor_ms(self) -> int:
        """Start of the last sealed minute evaluated."""
        return self._cursor_ms

    def open_incidents(self) -> list[Incident]:
        return self._book.open_incidents()

    def step(self) -> StepReport:
        """One round (see the module docstring); on an error, the next step starts again
        from the last committed state.

        Raises:
            StoreUnavailable: PostgreSQL, the window feed or Kafka failed.
        """
        try:
            if not self._loaded:
                self._restore()
            return self._step()
        except Exception:
            self._loaded = False
            if self._matches is not None:
                self._matches.reset()
            raise

    def _restore(self) -> None:
        self._reload_rules()
        state = self._store.load_state(self._config.state_name)
        if state is None:
            self._evaluator.restore(RuleEvaluator().snapshot())
            self._book = IncidentBook()
            self._cep.restore({})
            first = self._config.first_cursor_ms
            self._cursor_ms = self._now_ms() if first is None else first
            self._offsets = {}
        else:
            self._evaluator.restore(state.evaluator)
            self._book = IncidentBook.restore(state.book)
            self._cep.restore(state.cep)
            self._cursor_ms = state.cursor_ms
            self._offsets = dict(state.kafka_offsets)
        self._loaded = True

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _step(self) -> StepReport:
        now = self._now_ms()
        step = _Step(now, {i.id: i for i in self._book.open_incidents()})
        report = StepReport()
        self._reload(step)
        self._acknowledge(step)
        windows, report.more = self._next_windows()
        for window in windows:
            for signal in self._evaluator.on_window(window):
                self._apply(step, signal)
        report.windows = len(windows)
        report.matches = self._read_matches(step)
        for signal in self._cep.due(now):
            self._apply(step, signal)
        report.signals = len(step.last_signal)
        report.notifications = len(step.notifications)
        self._commit(step, moved=bool(windows) or report.matches > 0)
        report.delivered, report.failed = self.deliver()
        return report

    # Rules, silences, acknowledges ------------------------------------------------

    def _reload_rules(self) -> None:
        window_rules: list[AlertRule] = []
        cep_rules: list[CepAlertRule] = []
        for spec in self._store.rules():
            try:
                rule = parse_rule_spec(spec)
            except ConfigurationError as exc:
                said = orjson.dumps(spec, option=orjson.OPT_SORT_KEYS).decode()
                if said not in self._bad_specs:
                    self._bad_specs.add(said)
                    log.warning("alert rule %s is skipped: %s", spec.get("id"), exc)
                continue
            if isinstance(rule, CepAlertRule):
                cep_rules.append(rule)
            else:
                window_rules.append(rule)
        self._evaluator.set_rules(window_rules)
        self._cep.set_rules(cep_rules)
        self._rule_keys = {(r.tenant, r.id) for r in window_rules}
        self._rule_keys.update((r.tenant, r.id) for r in cep_rules)

    def _reload(self, step: _Step) -> None:
        self._reload_rules()
        self._silences = self._store.silences(step.now_ms)
        for incident in self._book.open_incidents():
            if (incident.tenant, incident.rule_id) not in self._rule_keys:
                # Stamped with its last signal's time: a rule made again under the same
                # id must not see its next windows as older than this resolution.
                gone = Signal(
                    incident.tenant,
                    incident.rule_id,
                    incident.group_key,
                    firing=False,
                    at_ms=incident.updated_ms,
                    summary=f"rule {incident.rule_id} was deleted or disabled",
                )
                self._apply(step, gone)

    def _acknowledge(self, step: _Step) -> None:
        for request in self._store.pending_acks():
            try:
                notes = self._book.acknowledge(
                    request.incident_id, request.requested_by, request.requested_ms
                )
            except InvalidInputError:
                step.acks_done.append((request.id, "not open"))
                continue
            step.notifications.extend(notes)
            step.acks_done.append((request.id, "acknowledged"))

    # Inputs ------------------------------------------------------------------------

    def _next_windows(self) -> tuple[list[SealedWindow], bool]:
        limit = self._config.batch_limit
        rows: list[dict[str, Any]] = self._feed.sealed_windows(self._cursor_ms, limit)
        more = len(rows) >= limit
        if more and len({r.get("start") for r in rows}) > 1:
            # A minute cut by the limit would be skipped by the next read (start > cursor):
            # leave the last, maybe partial, minute for the next step.
            last = rows[-1]["start"]
            rows = [r for r in rows if r["start"] != last]
        elif more:
            log.warning("one sealed minute has over %d windows; raise batch_limit", limit)
        windows = []
        for row in rows:
            try:
                windows.append(SealedWindow.from_row(row))
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("sealed window row %r is skipped: %s", row, exc)
        windows.sort(key=lambda w: w.start)
        if windows:
            self._cursor_ms = max(self._cursor_ms, windows[-1].start)
        return windows, more

    def _read_matches(self, step: _Step) -> int:
        if self._matches is None:
            return 0
        found, self._offsets = self._matches.poll(self._offsets, self._config.max_matches)
        for match in found:
            try:
                signals = self._cep.on_match(match)
            except InvalidInputError as exc:
                log.warning("CEP match is skipped: %s", exc)
                continue
            for signal in signals:
                self._apply(step, signal)
        return len(found)

    def _apply(self, step: _Step, signal: Signal) -> None:
        step.notifications.extend(self._book.apply(signal, self._silences))
        step.last_signal[signal.key] = signal.at_ms

    # Commit and delivery ------------------------------------------------------------

    def _commit(self, step: _Step, moved: bool) -> None:
        state = EngineState(
            evaluator=self._evaluator.snapshot(),
            book=self._book.snapshot(),
            cep=self._cep.snapshot(),
            cursor_ms=self._cursor_ms,
            kafka_offsets=dict(self._offsets),
        )
        outbox = [(name, n) for n in step.notifications for name in sorted(self._channels)]
        write = StepWrite(state, self._changed(step), outbox, step.acks_done)
        if moved or write.incidents or write.outbox or write.acks_done or step.last_signal:
            self._store.commit(self._config.state_name, write)

    def _changed(self, step: _Step) -> list[Incident]:
        """Incidents to write: new or changed open ones, and the ones resolved now."""
        after = {i.id: i for i in self._book.open_incidents()}
        changed = {i.id: i for i in after.values() if step.before.get(i.id) != i}
        for note in step.notifications:
            if note.incident.id not in after:
                changed[note.incident.id] = note.incident
        for gone_id, was in step.before.items():
            if gone_id not in after and gone_id not in changed:
                # Silenced incidents resolve without a notification to copy from.
                at = step.last_signal.get((was.tenant, was.rule_id, was.group_key), step.now_ms)
                changed[gone_id] = replace(was, state="resolved", resolved_ms=at, updated_ms=at)
        return list(changed.values())

    def deliver(self) -> tuple[int, int]:
        """Send every queued notification; (delivered, given up)."""
        delivered = failed = 0
        for item in self._store.pending_outbox():
            channel = self._channels.get(item.channel)
            if channel is None:
                log.warning("queued %s notification %d has no channel now", item.channel, item.id)
                ok = False
            else:
                ok = channel.deliver(item.notification)
            self._store.finish_outbox(item.id, ok)
            delivered, failed = delivered + ok, failed + (not ok)
        return delivered, failed

    def status(self) -> dict[str, Any]:
        return {
            "cursor_ms": self._cursor_ms,
            "rules": len(self._rule_keys),
            "silences": len(self._silences),
            "open_incidents": len(self._book.open_incidents()),
            "channels": sorted(self._channels),
            "kafka_offsets": dict(self._offsets),
        }


# ----------------------------------------------------------------- production inputs


class ClickHouseSealedFeed:
    """The sealed windows of the ClickHouse owner actor (``rayline-clickhouse``)."""

    def __init__(self, namespace: str, actor: str = OWNER_NAME, timeout: float = 60.0) -> None:
        self._namespace = namespace
        self._actor = actor
        self._timeout = timeout

    def sealed_windows(self, after_ms: int, limit: int) -> list[dict[str, Any]]:
        try:
            owner = ray.get_actor(self._actor, namespace=self._namespace)
            ref: Any = owner.sealed_windows.remote(after_ms, limit)
            rows: list[dict[str, Any]] = ray.get(ref, timeout=self._timeout)
        except (RayError, ValueError) as exc:
            raise StoreUnavailable(
                f"sealed windows unavailable from actor {self._actor!r}: {exc}; "
                "is the pipeline deployed (`rayline up`)?"
            ) from exc
        return list(rows)


class KafkaMatchFeed:
    """CEP matches from the ``alerts`` topic, read by explicit assignment.

    A partition the engine has no offset for starts at its end: a first start does not
    page on old matches.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._consumer: Any = None

    def poll(
        self, offsets: Mapping[str, int], max_records: int
    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        positions = dict(offsets)
        try:
            if self._consumer is None:
                self._consumer = make_consumer(self._bootstrap, "rayline-alerting")
                parts = partition_ids(self._bootstrap, self._topic)
                self._consumer.assign(
                    [TopicPartition(self._topic, p, offsets.get(str(p), OFFSET_END)) for p in parts]
                )
            records = self._consumer.consume(max_records, 0.2)
        except KafkaException as exc:
            self.reset()
            raise StoreUnavailable(f"Kafka topic {self._topic!r} unreadable: {exc}") from exc
        matches = []
        for record in records:
            if record.error() is not None:
                continue
            positions[str(record.partition())] = record.offset() + 1
            try:
                matches.append(orjson.loads(record.value()))
            except orjson.JSONDecodeError as exc:
                log.warning("alerts record at offset %d is not JSON: %s", record.offset(), exc)
        return matches, positions

    def reset(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


# ------------------------------------------------------------------------- the actor


@dataclass(frozen=True, slots=True)
class AlertingConfig:
    """What the alerting actor needs; ``cluster/deploy_alerting.py`` builds it."""

    dsn: str
    namespace: str
    channels: ChannelConfig
    bootstrap: str | None = None
    alerts_topic: str = "alerts"
    poll_seconds: float = 5.0
    engine: EngineConfig = EngineConfig()


class AlertingActor:
    """Ray actor body: runs :class:`AlertEngine` every ``poll_seconds`` on a thread."""

    def __init__(self, config: AlertingConfig, start: bool = True) -> None:
        self._config = config
        self._store = AlertStore(config.dsn)
        senders = build_senders(config.channels, self._store)
        matches = self._matches = None
        if config.bootstrap is not None:
            matches = self._matches = KafkaMatchFeed(config.bootstrap, config.alerts_topic)
        feed = ClickHouseSealedFeed(config.namespace)
        self._engine = AlertEngine(
            self._store, feed, senders, matches=matches, config=config.engine
        )
        self._lock = threading.Lock()
        self._paused = threading.Event()
        self._closing = threading.Event()
        self._last_error: str | None = None
        self._last_step_ms: int | None = None
        self._steps = 0
        self._thread = threading.Thread(target=self._run, name="alerting", daemon=True)
        if start:
            self._thread.start()

    def _run(self) -> None:
        while not self._closing.is_set():
            more = False
            if not self._paused.is_set():
                more = self._step_once()
            self._closing.wait(0.0 if more else self._config.poll_seconds)

    def _step_once(self) -> bool:
        with self._lock:
            try:
                report = self._engine.step()
            except Exception as exc:  # the loop must outlive any one failure
                self._last_error = str(exc)
                log.warning("alerting step failed (retried next poll): %s", exc)
                return False
            self._last_error = None
            self._last_step_ms = int(time.time() * 1000)
            self._steps += 1
            return report.more

    def pause(self) -> bool:
        """Stop stepping; True once the step in progress (if any) has finished."""
        self._paused.set()
        with self._lock:
            return True

    def resume(self) -> None:
        """Step again from the next poll on, from the last committed state."""
        self._paused.clear()

    def status(self) -> dict[str, Any]:
        """Paused or running, steps done, last step time and error, and the engine's view."""
        with self._lock:
            return {
                "state": "paused" if self._paused.is_set() else "running",
                "steps": self._steps,
                "last_step_ms": self._last_step_ms,
                "last_error": self._last_error,
                **self._engine.status(),
            }

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop and release the connection."""
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            if self._matches is not None:
                self._matches.reset()
            self._store.close()
