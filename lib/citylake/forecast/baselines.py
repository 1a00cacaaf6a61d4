"""Baseline forecasts - persistence and seasonal naive - as pure Spark transforms.

A series is one ``(sensor_id, metric)`` on its regular grid at the metric's catalogue
``interval_s``. Every time is turned into a *grid step* ``floor(epoch seconds /
interval_s)`` and all offsets (horizon, season) are counted in steps, never in rows, so
an absent grid row is a missing value rather than a silent jump further back.

Inputs
------
``history``: sensor_id, metric, region, ts, value (``value_col``; null or NaN = gap),
at most one row per series and ts (silver / gold_features are unique on that key).
``origins``: sensor_id, metric, origin_ts - the last time the forecaster may look at.
An origin between two grid steps is floored to the step containing it; duplicate
origins give one set of rows. Metrics without a catalogue interval give no rows.

Output (:data:`FORECAST_COLUMNS`), one row per origin and step 1..horizon:
model, sensor_id, metric, region (the newest non-null region of the series at or before
the origin), origin_ts (on the grid), target_ts = origin_ts + step * interval, step
(int, grid steps), y_pred (metric unit), y_lower / y_upper (null: filled later by
:func:`citylake.forecast.conformal.apply_conformal`).

Gap rules
---------
* persistence: y_pred = the newest *non-null* value at or before the origin, however old
  (null only when the series has no value at all up to the origin).
* seasonal naive: y_pred = the value of the source step (see :func:`seasonal_naive`);
  null when that step is absent or null - no fallback to another step. Such rows stay in
  the output so scoring can count them (``n_missing``) while leaving them out of errors.

Only window functions, joins and native SQL functions: no Python UDFs.
"""

from __future__ import annotations

from typing import Literal, Mapping

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from citylake.catalogue import Catalogue, load_catalogue

SECONDS_PER_DAY = 86_400
DAYS_PER_WEEK = 7
#: ``season="auto"`` uses the weekly season once this many weeks precede the origin.
AUTO_WEEK_MIN_WEEKS = 3

SERIES = ("sensor_id", "metric")
FORECAST_COLUMNS = (
    "model", "sensor_id", "metric", "region", "origin_ts", "target_ts", "step",
    "y_pred", "y_lower", "y_upper",
)
Season = Literal["day", "week", "auto"]

# Internal column names.
_INTERVAL, _STEP, _VALUE, _IS_ORIGIN = "_interval_s", "_step", "_value", "_is_origin"
_ORIGIN, _LAST_VALUE, _FIRST_STEP, _SEASON = "_origin_step", "_last_value", "_first_step", "_season"


# -- shared helpers (also used by evaluation / conformal) ----------------------------------


def metric_lookup(values: Mapping[str, float | int]) -> Column:
    """``values[metric]`` of each row as a column (null for a metric not in ``values``).

    A literal map keyed by metric name: the catalogue is tiny, so this avoids a join.
    """
    if not values:
        return F.lit(None)
    pairs = [x for key, value in sorted(values.items()) for x in (F.lit(key), F.lit(value))]
    return F.try_element_at(F.create_map(*pairs), F.col("metric"))


def interval_lookup(catalogue: Catalogue) -> Column:
    """Each row's grid interval in seconds (bigint) from its metric; null if unknown."""
    return metric_lookup({n: int(m.interval_s) for n, m in catalogue.metrics.items()}).cast("long")


def day_steps_lookup(catalogue: Catalogue) -> Column:
    """Grid steps per day of each row's metric (bigint). Null when the interval does not
    divide a day (no whole number of steps per season, so no seasonal naive)."""
    steps = {
        n: SECONDS_PER_DAY // m.interval_s
        for n, m in catalogue.metrics.items()
        if m.interval_s > 0 and SECONDS_PER_DAY % m.interval_s == 0
    }
    return metric_lookup(steps).cast("long")


def grid_step(ts: Column, interval_s: Column) -> Column:
    """``floor(epoch seconds / interval_s)``: the index of the grid step holding ``ts``."""
    return F.floor(F.unix_seconds(ts) / interval_s).cast("long")


def step_ts(step: Column, interval_s: Column) -> Column:
    """The start (UTC timestamp) of grid step ``step``."""
    return F.timestamp_seconds(step * interval_s)


def clean_double(column: Column) -> Column:
    """The column as double, with NaN turned into null (both mean "no value")."""
    value = column.cast("double")
    return F.when(~F.isnan(value), value)


def stepped_history(history: DataFrame, catalogue: Catalogue, value_col: str = "value") -> DataFrame:
    """History projected to sensor_id, metric, region, ``_interval_s``, ``_step``,
    ``_value`` (double, null for gaps); rows of metrics without an interval dropped."""
    region = F.col("region") if "region" in history.columns else F.lit(None).cast("string")
    return (
        history.select(
            "sensor_id",
            "metric",
            region.alias("region"),
            interval_lookup(catalogue).alias(_INTERVAL),
            "ts",
            clean_double(F.col(value_col)).alias(_VALUE),
        )
        .where(F.col(_INTERVAL).isNotNull())
        .withColumn(_STEP, grid_step(F.col("ts"), F.col(_INTERVAL)))
        .drop("ts")
    )


# -- origin state ------------------------------------------------------------------------


def _origin_state(stepped: DataFrame, origins: DataFrame, catalogue: Catalogue) -> DataFrame:
    """One row per distinct (series, origin step) with what the forecaster knows there.

    Columns: sensor_id, metric, region, ``_interval_s``, ``_origin_step``, ``_last_value``
    (newest non-null value at or before the origin), ``_first_step`` (oldest step with a
    non-null value at or before the origin; null when none).

    Origins are appended to the history as marker rows and one running window per
    series carries the state forward - a single sort per series instead of a range join
    of every origin with all its history (origins x history rows).
    """
    markers = (
        origins.select(
            "sensor_id",
            "metric",
            F.lit(None).cast("string").alias("region"),
            interval_lookup(catalogue).alias(_INTERVAL),
            F.col("origin_ts"),
            F.lit(None).cast("double").alias(_VALUE),
        )
        .where(F.col(_INTERVAL).isNotNull())
        .withColumn(_STEP, grid_step(F.col("origin_ts"), F.col(_INTERVAL)))
        .drop("origin_ts")
        .distinct()
        .withColumn(_IS_ORIGIN, F.lit(True))
    )
    rows = stepped.withColumn(_IS_ORIGIN, F.lit(False)).unionByName(markers)
    # false sorts before true: a reading at the origin's own step is "at or before" it.
    upto = (
        Window.partitionBy(*SERIES)
        .orderBy(_STEP, _IS_ORIGIN)
        .rowsBetween(Window.unboundedPreceding, Window.currentRow)
    )
    value = F.col(_VALUE)
    return (
        rows.select(
            "sensor_id",
            "metric",
            _INTERVAL,
            _IS_ORIGIN,
            F.col(_STEP).alias(_ORIGIN),
            F.last("region", ignorenulls=True).over(upto).alias("region"),
            F.last(value, ignorenulls=True).over(upto).alias(_LAST_VALUE),
            F.min(F.when(value.isNotNull(), F.col(_STEP))).over(upto).alias(_FIRST_STEP),
        )
        .where(F.col(_IS_ORIGIN))
        .drop(_IS_ORIGIN)
    )


def _with_steps(state: DataFrame, horizon: int) -> DataFrame:
    """One row per origin and step 1..horizon, with ``target_step``."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1 grid step, got {horizon}")
    return state.withColumn("step", F.explode(F.sequence(F.lit(1), F.lit(int(horizon))))).withColumn(
        "_target_step", F.col(_ORIGIN) + F.col("step")
    )


def _forecast_rows(df: DataFrame, model: str, y_pred: Column) -> DataFrame:
    """Project to :data:`FORECAST_COLUMNS` (intervals null)."""
    interval = F.col(_INTERVAL)
    return df.select(
        F.lit(model).alias("model"),
        "sensor_id",
        "metric",
        "region",
        step_ts(F.col(_ORIGIN), interval).alias("origin_ts"),
        step_ts(F.col("_target_step"), interval).alias("target_ts"),
        F.col("step").cast("int").alias("step"),
        y_pred.cast("double").alias("y_pred"),
        F.lit(None).cast("double").alias("y_lower"),
        F.lit(None).cast("double").alias("y_upper"),
    )


# -- baselines ---------------------------------------------------------------------------


def persistence(
    history: DataFrame,
    origins: DataFrame,
    horizon: int,
    catalogue: Catalogue | None = None,
    value_col: str = "value",
    model: str = "persistence",
) -> DataFrame:
    """Persistence ("last value") forecasts: y_pred for every step 1..``horizon`` = the
    newest non-null value at or before the origin (metric unit).

    ``horizon`` in grid steps; ``catalogue`` gives each metric's interval (default: the
    packaged one); ``model`` names the rows. A gap at the origin falls back to the last
    value before it, with no age limit; a series with no value up to its origin gives
    null y_pred. Returns :data:`FORECAST_COLUMNS`.
    """
    catalogue = catalogue or load_catalogue()
    state = _origin_state(stepped_history(history, catalogue, value_col), origins, catalogue)
    return _forecast_rows(_with_steps(state, horizon), model, F.col(_LAST_VALUE))


def _season_steps(season: Season, catalogue: Catalogue) -> Column:
    """Season length in grid steps per origin row (needs ``_origin_step``/``_first_step``)."""
    day = day_steps_lookup(catalogue)
    week = day * DAYS_PER_WEEK
    if season == "day":
        return day
    if season == "week":
        return week
    if season == "auto":
        # Steps of history from the first non-null value to the origin, both included.
        span = F.col(_ORIGIN) - F.col(_FIRST_STEP) + 1
        return F.when(span >= week * AUTO_WEEK_MIN_WEEKS, week).otherwise(day)
    raise ValueError(f"season must be 'day', 'week' or 'auto', got {season!r}")


def seasonal_naive(
    history: DataFrame,
    origins: DataFrame,
    horizon: int,
    catalogue: Catalogue | None = None,
    season: Season = "auto",
    value_col: str = "value",
    model: str = "seasonal_naive",
) -> DataFrame:
    """Seasonal naive forecasts: y_pred = the value one season before the target.

    Season ``m`` in grid steps: ``"day"`` = 86400 / interval_s (24 for hourly, 288 for
    5-minute data); ``"week"`` = 7 days; ``"auto"`` = week when the series has at least
    3 weeks of history at the origin - ``origin_step - first_non_null_step + 1 >= 3 m_week``
    - else day (decided per origin). The source step is ``target - k m`` with
    ``k = floor((step - 1) / m) + 1``: one season back while step <= m, and for longer
    horizons the last season *observed at the origin* is repeated, so no forecast ever
    reads a value after its origin. y_pred is null when the source step is absent or null
    (no fallback), and when the metric's interval does not divide a day. ``horizon`` in
    grid steps; returns :data:`FORECAST_COLUMNS`.
    """
    catalogue = catalogue or load_catalogue()
    stepped = stepped_history(history, catalogue, value_col)
    state = _origin_state(stepped, origins, catalogue).withColumn(_SEASON, _season_steps(season, catalogue))
    rows = _with_steps(state, horizon).withColumn(
        "_source_step",
        F.col("_target_step")
        - (F.floor((F.col("step") - 1) / F.col(_SEASON)) + 1).cast("long") * F.col(_SEASON),
    )
    sources = stepped.select(*SERIES, F.col(_STEP).alias("_source_step"), F.col(_VALUE).alias("_source_value"))
    joined = rows.join(sources, [*SERIES, "_source_step"], "left")
    return _forecast_rows(joined, model, F.col("_source_value"))
