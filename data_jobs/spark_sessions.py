"""Sessions of each entity, as a PySpark job: the example of a user's existing Spark code.

This module is plain PySpark (no Ray, no Rayline import): the kind of job a team
brings from a Spark cluster. ``data_jobs.sessions`` runs it on the Ray cluster through
the bridge (``data_jobs.spark_bridge``), feeding it the archive replay's event rows and
taking its result back into Ray Data; ``sessionise`` in that module is the same
computation written for Ray Data, and the tests hold the two equal.

A session is a run of one ``(tenant, entity)``'s events in which no two consecutive
events are more than ``gap_ms`` apart. Events without an entity belong to none. Copies
of one event (equal on ``tenant, type, ts, source, event_id``) count once, with the
smallest of their values.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

EVENT_KEY = ["tenant", "type", "ts", "source", "event_id"]


def sessions(events: DataFrame, gap_ms: int) -> DataFrame:
    """``tenant, entity, session_start, session_end, events, value_sum`` per session of
    ``events`` (columns ``tenant, type, ts`` in epoch ms, ``source, event_id, entity,
    value``)."""
    unique = (
        events.where(F.col("entity") != "")
        .groupBy(*EVENT_KEY, "entity")
        .agg(F.min("value").alias("value"))
    )
    in_order = Window.partitionBy("tenant", "entity").orderBy("ts")
    previous = F.lag("ts").over(in_order)
    starts = F.when(previous.isNull() | (F.col("ts") - previous > gap_ms), 1).otherwise(0)
    numbered = unique.withColumn("starts", starts).withColumn(
        "session",
        F.sum("starts").over(in_order.rowsBetween(Window.unboundedPreceding, Window.currentRow)),
    )
    return (
        numbered.groupBy("tenant", "entity", "session")
        .agg(
            F.min("ts").alias("session_start"),
            F.max("ts").alias("session_end"),
            F.count(F.lit(1)).alias("events"),
            F.sum("value").alias("value_sum"),
        )
        .drop("session")
    )
