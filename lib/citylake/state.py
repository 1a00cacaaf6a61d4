"""Stage watermarks: which ingest batches a downstream stage has already processed.

Downstream stages (silver, gold) recompute only the UTC dates that new ingest batches
touched. ``pipeline_state`` is append-only; the newest row per stage wins. A stage
writes its watermark *after* its data commit, so a crash in between only causes the same
dates to be recomputed (and MERGE makes that harmless).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Callable, TypeVar

from pyspark.sql import functions as F

from citylake.lake import Lake

log = logging.getLogger(__name__)
T = TypeVar("T")


def last_batch(lake: Lake, stage: str) -> int:
    """The last ingest batch id ``stage`` has processed (0 when none)."""
    row = (
        lake.read("pipeline_state")
        .where(F.col("stage") == stage)
        .agg(F.max("last_batch_id").alias("b"))
        .first()
    )
    return int(row["b"]) if row and row["b"] is not None else 0


def set_last_batch(lake: Lake, stage: str, batch_id: int) -> None:
    """Record that ``stage`` has processed every ingest batch up to ``batch_id``."""
    df = lake.spark.createDataFrame(
        [(stage, int(batch_id), dt.datetime.now(dt.timezone.utc).replace(tzinfo=None))],
        "stage string, last_batch_id long, updated_ts timestamp",
    )
    lake.append("pipeline_state", df)


def pending_dates(lake: Lake, stage: str) -> tuple[list[dt.date], int]:
    """UTC reading dates touched by ingest batches newer than ``stage``'s watermark.

    Returns ``(sorted dates, newest batch id)``; the batch id is the watermark to record
    once the stage has committed (equal to the old one when nothing is pending).
    """
    since = last_batch(lake, stage)
    rows = (
        lake.read("ingest_log")
        .where(F.col("batch_id") > since)
        .select("batch_id", F.explode_outer("reading_dates").alias("d"))
        .collect()
    )
    dates = sorted({r["d"] for r in rows if r["d"] is not None})
    newest = max([since] + [int(r["batch_id"]) for r in rows])
    return dates, newest


def run_pending(lake: Lake, stage: str, dates: list[dt.date] | None,
                work: Callable[[list[dt.date], int | None], T], empty: Callable[[int | None], T]) -> T:
    """Run a date-driven stage on ``dates``, or on its pending dates and then move its watermark.

    ``work(dates, newest_batch)`` does the stage's job; ``empty(newest_batch)`` is its report
    when there is nothing to do. Explicit ``dates`` (a backfill) leave the watermark alone.
    Without pending dates the watermark still moves past batches that landed no rows.
    """
    newest: int | None = None
    if dates is None:
        dates, newest = pending_dates(lake, stage)
    if dates:
        report = work(sorted(set(dates)), newest)
    else:
        log.info("%s: no pending dates", stage)
        report = empty(newest)
    if newest is not None and (dates or newest > last_batch(lake, stage)):
        set_last_batch(lake, stage, newest)
        log.info("%s: watermark -> batch %d", stage, newest)
    return report
