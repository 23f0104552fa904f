"""The archiver: every record of the raw and dead-letter topics into the S3 archive.

:class:`Archiver` consumes both topics in its own consumer group (``rayline-archiver``),
buffers records until ``max_rows`` are buffered or the oldest waited ``flush_seconds``,
writes them through :class:`~adapters.archive.ArchiveWriter`, and only then commits
their offsets, synchronously. A crash between the write and the commit replays the
records from the committed offsets; the writer then overwrites or replaces what the
first attempt stored, so every record is archived exactly once (docs/archive.md).

When S3 (or the commit) fails, the archiver keeps its buffer, stops fetching (the
partitions are paused, the consumer keeps its group membership), and tries the same
write again with exponential backoff; the failure shows in :meth:`Archiver.status`.
Nothing is committed meanwhile, so nothing is lost. When the group takes partitions
away, their buffered records are dropped: the new owner reads them again from the
committed offsets.

``Archiver`` makes no Ray call, so tests run it in-process; :class:`ArchiverActor` is
the body of the named detached actor ``rayline-archiver`` that runs one on a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from adapters.archive import ArchiveWriter, KafkaRecord, WriteReport
from adapters.exceptions import StoreUnavailable
from adapters.kafka import consumer_lag, make_consumer
from adapters.s3 import S3Config, S3Store
from core.exceptions import InvalidInputError

ARCHIVER_NAME = "rayline-archiver"
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ArchiverConfig:
    """Everything the archiver needs; built from the settings by the deployment."""

    bootstrap: str
    raw_topic: str
    dlq_topic: str
    s3: S3Config
    prefix: str = "archive"
    group_id: str = "rayline-archiver"
    flush_seconds: float = 60.0
    max_rows: int = 200_000
    row_group_rows: int = 100_000
    poll_seconds: float = 0.5
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 60.0


@dataclass(slots=True)
class _Progress:
    state: str = "running"
    files_written: int = 0
    rows_written: int = 0
    flushes: int = 0
    replaced_files: int = 0
    failures: int = 0
    last_flush_ms: int | None = None
    last_error: str | None = None
    buffered_rows: int = 0


def record_of(message: Message) -> KafkaRecord:
    """The archive's view of one consumed Kafka message."""
    kind, timestamp = message.timestamp()
    return KafkaRecord(
        topic=str(message.topic()),
        partition=int(message.partition() or 0),
        offset=int(message.offset() or 0),
        key=message.key(),
        value=message.value(),
        headers=list(message.headers() or []),  # type: ignore[arg-type]
        timestamp_ms=max(0, timestamp) if kind else 0,
    )


def _offsets_after(records: list[KafkaRecord]) -> list[TopicPartition]:
    """The offsets to commit once ``records`` are stored: one past each partition's last."""
    last: dict[tuple[str, int], int] = {}
    for r in records:
        last[(r.topic, r.partition)] = max(r.offset, last.get((r.topic, r.partition), -1))
    return [TopicPartition(t, p, o + 1) for (t, p), o in sorted(last.items())]


class Archiver:
    """The archiving loop: :meth:`step` once per turn, or :meth:`run` until stopped.

    Not thread-safe except :meth:`pause`, :meth:`resume` and :meth:`status`, which
    another thread may call while one thread steps.
    """

    def __init__(
        self,
        config: ArchiverConfig,
        *,
        writer: ArchiveWriter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._clock = clock
        self._writer = writer or ArchiveWriter(
            S3Store(config.s3), config.prefix, [config.dlq_topic], config.row_group_rows
        )
        self._buffer: list[KafkaRecord] = []
        self._first_at: float | None = None
        self._retry_at: float | None = None
        self._streak = 0  # failed writes in a row
        self._held = False
        self._pause = threading.Event()
        self._lock = threading.Lock()
        self._progress = _Progress()
        self._consumer: Consumer = make_consumer(config.bootstrap, config.group_id)
        self._consumer.subscribe(
            [config.raw_topic, config.dlq_topic], on_revoke=self._on_revoke, on_lost=self._on_revoke
        )

    def run(self, stop: threading.Event) -> None:
        """Step until ``stop`` is set; then write what is buffered (once) and close."""
        try:
            while not stop.is_set():
                self.step()
            if self._buffer:
                self._flush()
        finally:
            self.close()

    def step(self) -> None:
        """One turn: write when due, then read (unless paused, backing off or full)."""
        if self._buffer and not self._backing_off() and (self._due() or self._pause.is_set()):
            self._flush()
        full = len(self._buffer) >= self._config.max_rows
        self._hold(self._pause.is_set() or self._backing_off() or full)
        self._read()
        with self._lock:
            self._progress.buffered_rows = len(self._buffer)
            if self._retry_at is None:
                paused = self._pause.is_set() and not self._buffer
                self._progress.state = "paused" if paused else "running"

    def pause(self) -> None:
        """Write what is buffered, then stop reading until :meth:`resume`."""
        self._pause.set()

    def resume(self) -> None:
        self._pause.clear()

    @property
    def state(self) -> str:
        """running, paused (nothing buffered, nothing read) or retrying (a failed write)."""
        with self._lock:
            return self._progress.state

    def status(self, lag: bool = True) -> dict[str, Any]:
        """State (running, paused, retrying), files and rows written, flushes, replaced
        stale files, failures, last flush (epoch ms), last error, buffered rows, and (with
        ``lag``) the group's lag per topic (None when Kafka does not answer)."""
        with self._lock:
            report: dict[str, Any] = {
                name: getattr(self._progress, name) for name in _Progress.__slots__
            }
        if lag:
            report["lag"] = self._lag()
        return report

    def close(self) -> None:
        """Leave the group without committing anything more."""
        self._consumer.close()

    def _lag(self) -> dict[str, int] | None:
        c = self._config
        try:
            return {t: consumer_lag(c.bootstrap, t, c.group_id) for t in (c.raw_topic, c.dlq_topic)}
        except StoreUnavailable:
            return None

    def _hold(self, hold: bool) -> None:
        # Paused partitions keep the group membership alive while nothing is fetched;
        # a rebalance hands out unpaused partitions, so a hold is applied every turn.
        if hold:
            self._consumer.pause(self._consumer.assignment())
        elif self._held:
            self._consumer.resume(self._consumer.assignment())
        self._held = hold

    def _read(self) -> None:
        room = max(1, min(self._config.max_rows - len(self._buffer), 10_000))
        try:
            messages = self._consumer.consume(room, timeout=self._config.poll_seconds)
        except KafkaException as exc:
            self._note_error(f"Kafka consume failed: {exc}")
            return
        for message in messages:
            error = message.error()
            if error is not None:
                self._note_error(f"Kafka reported {error} on {message.topic()}")
                continue
            if not self._buffer:
                self._first_at = self._clock()
            self._buffer.append(record_of(message))

    def _backing_off(self) -> bool:
        return self._retry_at is not None and self._clock() < self._retry_at

    def _due(self) -> bool:
        if len(self._buffer) >= self._config.max_rows:
            return True
        return self._first_at is not None and (
            self._clock() - self._first_at >= self._config.flush_seconds
        )

    def _flush(self) -> None:
        try:
            report = self._writer.write(self._buffer)
            self._commit(self._buffer)
        except (StoreUnavailable, InvalidInputError) as exc:
            self._back_off(exc)
            return
        self._buffer, self._first_at, self._retry_at, self._streak = [], None, None, 0
        self._count(report)

    def _commit(self, records: list[KafkaRecord]) -> None:
        try:
            self._consumer.commit(offsets=_offsets_after(records), asynchronous=False)
        except KafkaException as exc:
            raise StoreUnavailable(
                f"Kafka did not commit the archiver's offsets (group {self._config.group_id!r}): "
                f"{exc}; the files are stored and are rewritten under the same keys"
            ) from exc

    def _back_off(self, exc: Exception) -> None:
        self._streak += 1
        base, most = self._config.retry_base_seconds, self._config.retry_max_seconds
        delay = min(most, base * 2 ** min(self._streak - 1, 30))
        with self._lock:
            p = self._progress
            p.failures += 1
            p.state = "retrying"
            p.last_error = f"{exc} (retrying {len(self._buffer)} records in {delay:.1f} s)"
        self._retry_at = self._clock() + delay
        log.warning("archiver: %s", p.last_error)

    def _count(self, report: WriteReport) -> None:
        with self._lock:
            p = self._progress
            p.files_written += len(report.files)
            p.rows_written += report.rows
            p.replaced_files += len(report.replaced)
            p.flushes += 1
            p.last_flush_ms = int(time.time() * 1000)
            p.state = "running"

    def _note_error(self, text: str) -> None:
        log.warning("archiver: %s", text)
        with self._lock:
            self._progress.last_error = text

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._buffer = [r for r in self._buffer if (r.topic, r.partition) not in gone]
        if not self._buffer:
            self._first_at = None
        self._held = False


class ArchiverActor:
    """Ray actor body: one :class:`Archiver` on a thread of its own."""

    def __init__(self, config: ArchiverConfig) -> None:
        self._config = config
        self._archiver: Archiver | None = None
        self._paused = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start()

    def _run(self) -> None:
        # A bug must not end the archiver for good: start it again after a pause (the
        # records it had not committed come again from Kafka).
        while not self._stop.is_set():
            try:
                self._archiver = Archiver(self._config)
                if self._paused:
                    self._archiver.pause()
                self._archiver.run(self._stop)
            except Exception:
                log.exception("archiver failed; starting it again in 5 s")
                self._stop.wait(5.0)

    def status(self) -> dict[str, Any]:
        running = self._thread is not None and self._thread.is_alive()
        if self._archiver is None:
            return {"state": "starting" if running else "stopped", "running": running}
        return {**self._archiver.status(), "running": running}

    def pause(self, timeout: float = 120.0) -> bool:
        """Write what is buffered and stop reading; True once paused within ``timeout``."""
        self._paused = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._archiver is not None:
                self._archiver.pause()
                if self._archiver.state == "paused":
                    return True
            time.sleep(0.2)
        return False

    def resume(self) -> None:
        self._paused = False
        if self._archiver is not None:
            self._archiver.resume()

    def stop(self) -> None:
        """Write what is buffered, commit it, and stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)

    def start(self) -> None:
        """Run again after :meth:`stop`."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="archiver", daemon=True)
        self._thread.start()
