"""Silver -> gold stage: rebuild gold_features and gold_region_hourly for affected dates.

Lags and rolling windows look back, so a change on day D also changes the features of
the following days up to the longest lookback. The stage recomputes every affected date
from silver (plus the lookback before it) and overwrites exactly those dates with
``replaceWhere`` on ``reading_date``: one atomic commit per table, idempotent on re-run.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from citylake.catalogue import ColumnSpec
from citylake.lake import Lake, in_list
from citylake.stages.clean import SPILL_DAYS
from citylake.state import run_pending
from citylake.transforms.features import (
    build_features,
    feature_columns,
    intervals_of,
    lookback_days,
    region_hourly,
)

log = logging.getLogger(__name__)

STAGE = "gold"


@dataclass
class FeaturesReport:
    """What one run of the features stage did. Row counts are rows written."""

    dates: list[dt.date] = field(default_factory=list)
    feature_rows: int = 0
    region_hourly_rows: int = 0
    newest_batch: int | None = None


def affected_dates(dates: list[dt.date], lookback: int) -> list[dt.date]:
    """Gold dates to rebuild for changed ingest ``dates``: silver may have changed on
    ``d ± SPILL_DAYS`` (see the clean stage), and features reach ``lookback`` days
    forward from any changed silver day."""
    return sorted(
        {d + dt.timedelta(days=o) for d in dates for o in range(-SPILL_DAYS, SPILL_DAYS + lookback + 1)}
    )


def _needed_silver(targets: list[dt.date], lookback: int) -> list[dt.date]:
    return sorted({d - dt.timedelta(days=o) for d in targets for o in range(lookback + 1)})


def _dates_condition(dates: list[dt.date]) -> str:
    return "reading_date IN (" + ", ".join(f"DATE'{d.isoformat()}'" for d in dates) + ")"


def _ensure_features_table(lake: Lake, extra: list[ColumnSpec]) -> None:
    """Create gold_features with the configured dynamic columns, or check that the
    existing table has them (Delta would only say "schema mismatch")."""
    lake.ensure("gold_features", extra)
    expected = lake.spec("gold_features").column_names + [c.name for c in extra]
    actual = lake.read("gold_features").columns
    if actual != expected:
        raise ValueError(
            f"gold_features has columns {actual}, but features.lags/windows give {expected}: "
            "the config changed since the table was created; drop gold/features and rebuild all dates"
        )


def run_features(lake: Lake, dates: list[dt.date] | None = None) -> FeaturesReport:
    """Rebuild gold_features and gold_region_hourly for the dates new data affects.

    ``dates`` default to :func:`pending_dates` of stage ``gold``; the watermark then moves
    to the newest such batch once both tables are written. Explicit ``dates`` (backfill)
    leave the watermark alone. Lags / windows come from ``config.features`` (grid steps).
    """
    return run_pending(lake, STAGE, dates, lambda d, newest: _rebuild(lake, d, newest),
                       lambda newest: FeaturesReport(newest_batch=newest))


def _rebuild(lake: Lake, dates: list[dt.date], newest: int | None) -> FeaturesReport:
    cfg = lake.config.features
    catalogue = lake.catalogue
    lookback = lookback_days(cfg.lags, cfg.windows, catalogue)
    targets = affected_dates(dates, lookback)
    needed = _needed_silver(targets, lookback)
    log.info("features: %d changed date(s) -> rebuild %d date(s) %s..%s (lookback %d day(s))",
             len(dates), len(targets), targets[0], targets[-1], lookback)
    silver = lake.read("silver_readings").where(in_list("reading_date", needed))
    extra = feature_columns(cfg.lags, cfg.windows, catalogue)
    _ensure_features_table(lake, extra)
    features = build_features(silver, cfg.lags, cfg.windows, intervals_of(catalogue))
    condition = _dates_condition(targets)
    feature_rows = lake.replace_where(
        "gold_features", features.where(in_list("reading_date", targets)), condition, extra_columns=extra
    )
    hourly = region_hourly(silver.where(in_list("reading_date", targets)), catalogue)
    hourly_rows = lake.replace_where("gold_region_hourly", hourly, condition)
    log.info("features: wrote %d feature rows, %d region-hour rows", feature_rows, hourly_rows)
    return FeaturesReport(dates=targets, feature_rows=feature_rows, region_hourly_rows=hourly_rows,
                          newest_batch=newest)

