"""The stages composed: what ``citylake run`` and the jobs call.

Each ``*_stage`` function picks *what* to process (new ingest batches, pending dates, or
the ``--date`` given) and hands it to the stage module; stages themselves stay unaware
of scheduling. Validation watermarks (``validate_<layer>``) make ``validate`` without a
date check exactly the data that arrived since it last ran.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import functions as F

from citylake import state
from citylake.lake import Lake, in_list

log = logging.getLogger(__name__)

#: The table each layer's quality gate validates.
LAYER_TABLES = {"bronze": "bronze_readings", "silver": "silver_readings", "gold": "gold_features"}


@dataclass
class PipelineReport:
    """What ``run_pipeline`` did, stage by stage (each value is that stage's report)."""

    stages: dict[str, Any] = field(default_factory=dict)


def end_of_day(date: dt.date) -> dt.datetime:
    """Midnight UTC after ``date``: the reference time for freshness of that day."""
    return dt.datetime.combine(date + dt.timedelta(days=1), dt.time(), dt.timezone.utc)


def validate_stage(lake: Lake, layer: str, date: dt.date | None = None):
    """Validate a layer's table: the rows of ``date``, or the data new since the last check.

    Returns the :class:`~citylake.stages.validate.ValidationReport`, or None when there is
    nothing new to validate. Raises ``ValidationFailed`` on a critical failure.
    """
    from citylake.stages.validate import recent_batch_counts, validate_table

    table = LAYER_TABLES[layer]
    stage = f"validate_{layer}"
    df = lake.read(table)
    newest = None
    recent: list[int] = []
    if date is not None:
        rows = df.where(F.col("reading_date") == F.lit(date))
        scope, reference = f"date {date.isoformat()}", end_of_day(date)
    elif layer == "bronze":
        since = state.last_batch(lake, stage)
        log_rows = lake.read("ingest_log").where(F.col("batch_id") > since).select("batch_id", "finished_ts").collect()
        if not log_rows:
            log.info("validate %s: no new ingest batch since batch %d", layer, since)
            return None
        batches = sorted(r["batch_id"] for r in log_rows)
        newest = batches[-1]
        rows = df.where(in_list("batch_id", batches))
        scope = f"batches {batches[0]}-{newest}" if len(batches) > 1 else f"batch {newest}"
        reference = max(r["finished_ts"] for r in log_rows).replace(tzinfo=dt.timezone.utc)
        recent = recent_batch_counts(lake, lake.config.validation.row_count_history, before_batch=batches[0])
    else:
        dates, newest = state.pending_dates(lake, stage)
        if not dates:
            log.info("validate %s: no new dates since the last validation", layer)
            return None
        rows = df.where(in_list("reading_date", dates))
        scope = f"dates {dates[0]}..{dates[-1]} ({len(dates)})"
        reference = end_of_day(dates[-1])
    report = validate_table(lake, table, rows, scope, reference_ts=reference, recent_counts=recent)
    if newest is not None:
        state.set_last_batch(lake, stage, newest)
    return report


def ingest_stage(lake: Lake, date: dt.date | None = None):
    from citylake.stages.ingest import run_ingest

    return run_ingest(lake, date=date)


def clean_stage(lake: Lake, date: dt.date | None = None):
    from citylake.stages.clean import run_clean

    return run_clean(lake, dates=[date] if date else None)


def features_stage(lake: Lake, date: dt.date | None = None):
    from citylake.stages.features import run_features

    return run_features(lake, dates=[date] if date else None)


#: Stage order of ``citylake run``: (name, function, layer for validation or None).
STAGES = [
    ("ingest", ingest_stage),
    ("validate-bronze", lambda lake, date=None: validate_stage(lake, "bronze", date)),
    ("clean", clean_stage),
    ("validate-silver", lambda lake, date=None: validate_stage(lake, "silver", date)),
    ("features", features_stage),
    ("validate-gold", lambda lake, date=None: validate_stage(lake, "gold", date)),
]


def run_pipeline(lake: Lake, date: dt.date | None = None, progress=None) -> PipelineReport:
    """Run every stage in order; a failing stage (e.g. a critical validation) stops the run.

    ``progress(name, report)`` is called after each stage (the CLI prints with it).
    """
    report = PipelineReport()
    for name, fn in STAGES:
        log.info("stage %s ...", name)
        result = fn(lake, date=date)
        report.stages[name] = result
        if progress:
            progress(name, result)
    return report
