"""Bronze -> silver stage: recompute the UTC dates new ingest batches touched and MERGE.

The stage reads bronze for the target dates plus ``silver.context_days`` on each side
(windows and gap fills cross midnight), builds silver with
:func:`citylake.transforms.silver.build_silver`, keeps the target dates and MERGEs on
``(sensor_id, metric, ts)``: a row is rewritten only when a content column differs, so
re-running the same dates commits no change.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Iterable

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from citylake.lake import Lake, in_list
from citylake.state import run_pending
from citylake.transforms.silver import SILVER_CONTENT_COLUMNS, build_silver

log = logging.getLogger(__name__)

STAGE = "silver"
#: Days next to a changed day whose silver may change too: the centred outlier window
#: and gap fills reach a few steps across midnight (always less than a day).
SPILL_DAYS = 1


@dataclass
class CleanReport:
    """What one run of the clean stage did. Counts are rows of silver_readings."""

    dates: list[dt.date] = field(default_factory=list)
    rows: int = 0
    inserted: int = 0
    updated: int = 0
    outliers: int = 0
    filled: int = 0
    gaps: int = 0
    conflicts: int = 0
    newest_batch: int | None = None


def around(dates: Iterable[dt.date], days: int) -> list[dt.date]:
    """Sorted union of ``[d - days, d + days]`` over ``dates``."""
    return sorted({d + dt.timedelta(days=o) for d in dates for o in range(-days, days + 1)})


def target_dates(dates: Iterable[dt.date]) -> list[dt.date]:
    """Silver dates to recompute for changed bronze ``dates``: the dates themselves and
    their neighbours (late data near midnight changes the next/previous day's windows)."""
    return around(dates, SPILL_DAYS)


def _date_sql(dates: list[dt.date]) -> str:
    return ", ".join(f"DATE'{d.isoformat()}'" for d in dates)


def _merge(lake: Lake, source: DataFrame, dates: list[dt.date]) -> tuple[int, int]:
    """MERGE ``source`` into silver_readings; returns (inserted, updated) from the commit."""
    target = lake.delta("silver_readings")
    on = (
        "t.sensor_id = s.sensor_id AND t.metric = s.metric AND t.ts = s.ts"
        # Partition predicate so the MERGE only scans the recomputed dates.
        f" AND t.reading_date IN ({_date_sql(dates)})"
    )
    changed = " OR ".join(f"NOT (t.{c} <=> s.{c})" for c in SILVER_CONTENT_COLUMNS)
    (
        target.alias("t")
        .merge(source.alias("s"), on)
        .whenMatchedUpdateAll(condition=changed)
        .whenNotMatchedInsertAll()
        .execute()
    )
    # Only this stage writes silver, so the latest commit is the MERGE just run.
    commit = target.history(1).select("operation", "operationMetrics").first()
    if commit is None or commit["operation"] != "MERGE":
        log.warning("clean: latest silver commit is not our MERGE; row counts unknown")
        return 0, 0
    metrics = commit["operationMetrics"]
    return int(metrics.get("numTargetRowsInserted", 0)), int(metrics.get("numTargetRowsUpdated", 0))


def _summary(silver: DataFrame) -> dict[str, int]:
    row = silver.agg(
        F.count(F.lit(1)).alias("rows"),
        F.count(F.when(F.col("is_outlier"), 1)).alias("outliers"),
        F.count(F.when(F.col("is_filled"), 1)).alias("filled"),
        F.count(F.when(F.col("is_gap"), 1)).alias("gaps"),
        F.coalesce(F.sum("n_conflicts"), F.lit(0)).alias("conflicts"),
    ).first()
    return {k: int(row[k]) for k in ("rows", "outliers", "filled", "gaps", "conflicts")}


def run_clean(lake: Lake, dates: list[dt.date] | None = None) -> CleanReport:
    """Recompute silver_readings for the UTC ``dates`` touched by new bronze data.

    ``dates`` default to :func:`pending_dates` of stage ``silver`` (dates of ingest
    batches newer than its watermark, late data for old dates included); the watermark
    then moves to the newest such batch after the MERGE. Explicit ``dates`` (a backfill)
    leave the watermark alone. Each date is recomputed with its neighbouring days
    (:func:`target_dates`), from bronze of those days ``± silver.context_days``.
    """
    return run_pending(lake, STAGE, dates, lambda d, newest: _clean_dates(lake, d, newest),
                       lambda newest: CleanReport(newest_batch=newest))


def _clean_dates(lake: Lake, dates: list[dt.date], newest: int | None) -> CleanReport:
    targets = target_dates(dates)
    context = around(targets, lake.config.silver.context_days)
    log.info("clean: %d changed date(s) %s..%s -> recompute %d date(s) from %d bronze date(s)",
             len(dates), dates[0], dates[-1], len(targets), len(context))
    bronze = lake.read("bronze_readings").where(in_list("reading_date", context))
    sensors = lake.read("sensors")
    now = dt.datetime.now(dt.timezone.utc)
    silver = build_silver(bronze, sensors, lake.catalogue, now).where(in_list("reading_date", targets))
    # Persisted: the MERGE scans its source twice and the summary reads it again.
    source = lake.conform("silver_readings", silver).persist()
    try:
        summary = _summary(source)
        inserted, updated = _merge(lake, source, targets)
    finally:
        source.unpersist()
    log.info("clean: %d rows recomputed, %d inserted, %d updated, %d outliers, %d filled, %d gaps",
             summary["rows"], inserted, updated, summary["outliers"], summary["filled"], summary["gaps"])
    return CleanReport(dates=targets, inserted=inserted, updated=updated, newest_batch=newest, **summary)
