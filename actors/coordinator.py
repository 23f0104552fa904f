"""The coordinator: assigns each raw-topic partition to exactly one PartitionWorker.

The assignment itself is pure (``core.assignment``); this module holds every Ray call
of the coordinator and its workers. Workers are owned by the coordinator (they share
its fate) and restart with the same assignment, resuming from committed offsets.
"""

from __future__ import annotations

import contextlib
from typing import Any

import ray

from actors.clickhouse_owner import RemoteWindowSink
from actors.partition_worker import PartitionWorker, WorkerConfig
from adapters.kafka import partition_ids
from core.assignment import Assignment, assign_partitions

COORDINATOR_NAME = "rayline-coordinator"


class PartitionWorkerActor:
    """Actor body around one PartitionWorker."""

    def __init__(self, config: WorkerConfig, assignment: Assignment, namespace: str) -> None:
        self._worker = PartitionWorker(config, assignment, RemoteWindowSink(namespace))

    def stats(self) -> dict[str, Any]:
        return self._worker.stats()

    def stop(self) -> None:
        self._worker.stop()


class Coordinator:
    """Actor body: starts workers for an epoch and reports their progress."""

    def __init__(
        self, config: WorkerConfig, workers: int, namespace: str, worker_num_cpus: float
    ) -> None:
        self._config = config
        self._namespace = namespace
        self._worker_num_cpus = worker_num_cpus
        self._epoch = 0
        self._workers: list[Any] = []
        self._assignments: list[Assignment] = []
        self._start(workers)

    def _start(self, workers: int) -> None:
        self._epoch += 1
        partitions = partition_ids(self._config.bootstrap, self._config.topic)
        self._assignments = assign_partitions(partitions, workers, self._epoch)
        actor_cls = ray.remote(PartitionWorkerActor)
        self._workers = [
            actor_cls.options(
                name=f"rayline-worker-{a.worker}",
                namespace=self._namespace,
                max_restarts=-1,
                max_concurrency=4,
                num_cpus=self._worker_num_cpus,
            ).remote(self._config, a, self._namespace)
            for a in self._assignments
        ]

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

    def stop(self) -> None:
        for handle in self._workers:
            with contextlib.suppress(ray.exceptions.RayError, TimeoutError):
                ray.get(handle.stop.remote(), timeout=15)
            ray.kill(handle)
        self._workers = []
