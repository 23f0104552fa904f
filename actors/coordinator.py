"""The coordinator: assigns each raw-topic partition to exactly one PartitionWorker.

The assignment itself is pure (``core.assignment``); this module holds every Ray call
of the coordinator and its workers. Each assignment has an epoch drawn from a
PostgreSQL sequence, so epochs grow across coordinator restarts too, and a worker of
an older epoch is fenced off the partitions it no longer owns (its snapshot writes
are refused). Workers are owned by the coordinator and restart with the same
assignment after a crash, resuming from their snapshots.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import ray

from actors.clickhouse_owner import RemoteWindowSink
from actors.partition_worker import PartitionWorker, WorkerConfig
from adapters.kafka import partition_ids
from adapters.postgres import CheckpointStore
from core.assignment import Assignment, assign_partitions
from core.partition_state import WindowResult

COORDINATOR_NAME = "rayline-coordinator"
log = logging.getLogger(__name__)


class PartitionWorkerActor:
    """Actor body around one PartitionWorker."""

    def __init__(self, config: WorkerConfig, assignment: Assignment, namespace: str) -> None:
        self._worker = PartitionWorker(config, assignment, RemoteWindowSink(namespace))

    def stats(self) -> dict[str, Any]:
        return self._worker.stats()

    def open_windows(
        self, tenant: str, type_: str, window: str, from_ms: int, to_ms: int
    ) -> list[WindowResult]:
        return self._worker.open_windows(tenant, type_, window, from_ms, to_ms)

    def sealed_watermark(self) -> int | None:
        return self._worker.sealed_watermark()

    def arm_crash(self, point: str, after_batches: int = 0) -> None:
        """Test hook: SIGKILL this actor's process at a named point of a coming batch."""
        self._worker.arm_crash(point, after_batches)

    def stop(self) -> None:
        self._worker.stop()


def start_worker_actors(
    config: WorkerConfig,
    assignments: list[Assignment],
    namespace: str,
    num_cpus: float,
    name: str = "rayline-worker",
) -> list[Any]:
    """One PartitionWorker actor per assignment, named ``<name>-<epoch>-<worker>``.

    The coordinator starts its workers here, and so does the deployed-pipeline
    benchmark (on a topic of its own), so both run the very same actors.
    """
    actor_cls = ray.remote(PartitionWorkerActor)
    return [
        actor_cls.options(
            name=f"{name}-{a.epoch}-{a.worker}",
            namespace=namespace,
            max_restarts=-1,
            max_concurrency=4,
            num_cpus=num_cpus,
        ).remote(config, a, namespace)
        for a in assignments
    ]


def stop_worker_actors(handles: list[Any]) -> None:
    """Let each worker finish its batch and stop (15 s at most), then kill its actor."""
    stops = [handle.stop.remote() for handle in handles]
    for handle, ref in zip(handles, stops, strict=True):
        with contextlib.suppress(ray.exceptions.RayError, TimeoutError):
            ray.get(ref, timeout=15)
        ray.kill(handle, no_restart=True)


class Coordinator:
    """Actor body: starts workers for an epoch, rescales them, reports their progress."""

    def __init__(
        self, config: WorkerConfig, workers: int, namespace: str, worker_num_cpus: float
    ) -> None:
        self._config = config
        self._namespace = namespace
        self._worker_num_cpus = worker_num_cpus
        self._store = CheckpointStore(config.checkpoint_dsn)
        self._epoch = 0
        self._workers: list[Any] = []
        self._assignments: list[Assignment] = []
        self._start(workers)

    def _start(self, workers: int) -> None:
        self._epoch = self._store.next_epoch()
        partitions = partition_ids(self._config.bootstrap, self._config.topic)
        self._assignments = assign_partitions(partitions, workers, self._epoch)
        self._workers = start_worker_actors(
            self._config, self._assignments, self._namespace, self._worker_num_cpus
        )

    def scale(self, workers: int) -> dict[str, Any]:
        """Move to ``workers`` workers under a new epoch; ingest goes on meanwhile.

        The old workers stop after their current batch (their snapshots are saved);
        one that does not stop in time is killed, and its late writes are fenced.
        """
        if workers < 1:
            raise ValueError(f"need at least one worker, got {workers}")
        self._stop_workers()
        self._start(workers)
        return self.status()

    def status(self) -> dict[str, Any]:
        stats = []
        for assignment, handle in zip(self._assignments, self._workers, strict=True):
            try:
                stats.append(ray.get(handle.stats.remote(), timeout=10))
            except (ray.exceptions.RayError, TimeoutError) as exc:
                stats.append(
                    {
                        "worker": assignment.worker,
                        "epoch": assignment.epoch,
                        "partitions": list(assignment.partitions),
                        "alive": False,
                        "last_error": str(exc).splitlines()[0],
                    }
                )
        return {"epoch": self._epoch, "topic": self._config.topic, "workers": stats}

    def open_windows(
        self, tenant: str, type_: str, window: str, from_ms: int, to_ms: int
    ) -> list[WindowResult]:
        refs = [w.open_windows.remote(tenant, type_, window, from_ms, to_ms) for w in self._workers]
        found: list[WindowResult] = []
        for ref in refs:
            try:
                found.extend(ray.get(ref, timeout=10))
            except (ray.exceptions.RayError, TimeoutError) as exc:
                log.warning("a worker did not report its open windows: %s", exc)
        return found

    def sealed_watermark(self) -> int | None:
        """The lowest sealed watermark of all workers (see ``PartitionWorker``), or None
        while any worker has none or does not answer: then nothing new is final."""
        refs = [w.sealed_watermark.remote() for w in self._workers]
        marks: list[int] = []
        for ref in refs:
            try:
                mark = ray.get(ref, timeout=10)
            except (ray.exceptions.RayError, TimeoutError):
                return None
            if mark is None:
                return None
            marks.append(int(mark))
        return min(marks) if marks else None

    def _stop_workers(self) -> None:
        stop_worker_actors(self._workers)
        self._workers = []

    def stop(self) -> None:
        self._stop_workers()
