"""Silver -> gold: model features per series step, and the region x hour aggregate.

Pure DataFrame transforms built only from window functions and native SQL functions.

Time offsets are counted in *grid steps*, never in rows: each row gets its step index
``floor(epoch seconds / interval_s)`` and lags / rolling windows are ``rangeBetween``
frames on that index. A step absent from silver (a day the series was silent) therefore
gives a null lag instead of silently reaching further back, as a row-based ``lag`` would.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from citylake.catalogue import Catalogue, ColumnSpec, load_catalogue
from citylake.transforms.silver import utc_date

SECONDS_PER_DAY = 86_400
SECONDS_PER_HOUR = 3_600
_STEP = "_step"
_INTERVAL = "_interval_s"
SERIES = ("sensor_id", "metric")

def lag_name(k: int) -> str:
    """Column of the value k grid steps back (tables.yaml ``lag_{k}``)."""
    return f"lag_{k}"


def roll_mean_name(w: int) -> str:
    """Column of the mean over the w steps before ts (tables.yaml ``roll_mean_{w}``)."""
    return f"roll_mean_{w}"


def roll_std_name(w: int) -> str:
    """Column of the sample std over the w steps before ts (tables.yaml ``roll_std_{w}``)."""
    return f"roll_std_{w}"


def feature_columns(
    lags: list[int], windows: list[int], catalogue: Catalogue | None = None
) -> list[ColumnSpec]:
    """The dynamic gold_features columns for ``lags`` / ``windows`` (in grid steps).

    Built from the ``dynamic_columns`` patterns of ``tables.yaml`` (``{k}`` expands over
    lags, ``{w}`` over windows, in pattern order), for ``lake.ensure/append/replace_where(
    ..., extra_columns=...)``.
    """
    spec = (catalogue or load_catalogue()).table("gold_features")
    columns: list[ColumnSpec] = []
    for dyn in spec.dynamic_columns:
        pattern = dyn["pattern"]
        values = lags if "{k}" in pattern else windows
        for v in values:
            name = pattern.format(k=v, w=v)
            columns.append(ColumnSpec(name, dyn["type"], True, dyn.get("description", "")))
    return columns


def intervals_of(catalogue: Catalogue) -> dict[str, int]:
    """``{metric: grid interval in seconds}`` from the catalogue."""
    return {name: m.interval_s for name, m in catalogue.metrics.items()}


def lookback_days(lags: list[int], windows: list[int], catalogue: Catalogue) -> int:
    """Whole UTC days the longest lag / rolling window can reach back, for the metric
    with the longest interval: ``ceil(max(lags + windows) * max interval_s / 86400)``."""
    steps = max([*lags, *windows, 0])
    longest = max(m.interval_s for m in catalogue.metrics.values())
    return math.ceil(steps * longest / SECONDS_PER_DAY)


def _map_literal(pairs: Mapping[str, Any]) -> Column:
    """A ``map<string, ...>`` literal, keyed by metric name, to look up per row."""
    return F.create_map(*[x for key, value in sorted(pairs.items()) for x in (F.lit(key), F.lit(value))])


def _with_interval(silver: DataFrame, intervals: Mapping[str, int] | None) -> DataFrame:
    """Attach each series' grid interval (seconds): from ``intervals`` when given, else
    inferred as the smallest gap between consecutive steps of the series (silver's grid
    holds every step of each day it covers, so that gap is the interval)."""
    if intervals:
        mapping = _map_literal({m: int(s) for m, s in intervals.items()})
        return silver.withColumn(_INTERVAL, F.try_element_at(mapping, F.col("metric")).cast("long"))
    epoch = F.unix_seconds("ts")
    ordered = Window.partitionBy(*SERIES).orderBy("ts")
    gap = epoch - F.lag(epoch).over(ordered)
    # A one-step series has no gap; any positive interval works for it (nothing to reach).
    return (
        silver.withColumn("_gap", gap)
        .withColumn(_INTERVAL, F.coalesce(F.min("_gap").over(Window.partitionBy(*SERIES)), F.lit(1)).cast("long"))
        .drop("_gap")
    )


def _cyclical(angle_fraction: Column, prefix: str) -> list[Column]:
    radians = 2 * math.pi * angle_fraction
    return [F.sin(radians).alias(f"{prefix}_sin"), F.cos(radians).alias(f"{prefix}_cos")]


def time_features(ts: Column) -> list[Column]:
    """``hour_sin/cos`` on a 24 h cycle (fractional hour of the UTC day, so 12:30 is
    12.5 h) and ``dow_sin/cos`` on a 7-day cycle (UTC weekday, Monday = 0)."""
    epoch = F.unix_seconds(ts)
    hour = F.pmod(epoch, F.lit(SECONDS_PER_DAY)) / SECONDS_PER_HOUR
    # 1970-01-01 was a Thursday (weekday 3 with Monday = 0).
    dow = F.pmod(F.floor(epoch / SECONDS_PER_DAY) + 3, F.lit(7))
    return _cyclical(hour / 24, "hour") + _cyclical(dow / 7, "dow")


#: Mean tropical year (s): the season's cycle, so day-of-year features drift by no
#: more than a few hours a century.
SECONDS_PER_YEAR = 365.2425 * SECONDS_PER_DAY


def season_features(ts: Column, prefix: str = "doy") -> list[Column]:
    """``<prefix>_sin/cos``: the time of year on a cycle of one mean tropical year
    (0 at 1970-01-01 00:00 UTC)."""
    return _cyclical(F.pmod(F.unix_seconds(ts), F.lit(SECONDS_PER_YEAR)) / SECONDS_PER_YEAR, prefix)


def build_features(
    silver: DataFrame,
    lags: list[int],
    windows: list[int],
    intervals: Mapping[str, int] | None = None,
) -> DataFrame:
    """Model features for every silver row (columns of gold_features, in order).

    Per series, in grid steps (see module doc; ``intervals`` = ``{metric: seconds}``,
    inferred from the data when omitted):

    * ``value`` = silver ``value_clean``;
    * ``lag_k`` = ``value_clean`` exactly k steps before ts (null when that step is
      absent or null);
    * ``roll_mean_w`` / ``roll_std_w`` = mean / sample std of the non-null
      ``value_clean`` of the w steps before ts, ts excluded so no feature sees the target
      (std null with fewer than 2 values);
    * ``hour_sin/cos``, ``dow_sin/cos``: see :func:`time_features`;
    * ``region_mean`` / ``region_n_sensors``: mean and count of non-null ``value_clean``
      over the sensors of the same region and metric at the same ts (the series itself
      included); null / 0 when the region is unknown.
    """
    df = _with_interval(silver, intervals)
    df = df.withColumn(_STEP, F.floor(F.unix_seconds("ts") / F.col(_INTERVAL)).cast("long"))
    series = Window.partitionBy(*SERIES).orderBy(_STEP)
    value = F.col("value_clean")
    lag_cols = [F.first(value).over(series.rangeBetween(-k, -k)).alias(lag_name(k)) for k in lags]
    roll_cols: list[Column] = []
    for w in windows:
        frame = series.rangeBetween(-w, -1)
        roll_cols.append(F.avg(value).over(frame).alias(roll_mean_name(w)))
    for w in windows:
        frame = series.rangeBetween(-w, -1)
        roll_cols.append(F.stddev_samp(value).over(frame).alias(roll_std_name(w)))
    # Partitioning by a null region would pool unrelated sensors: compute, then blank.
    same_step = Window.partitionBy("region", "metric", "ts")
    known = F.col("region").isNotNull()
    region_cols = [
        F.when(known, F.avg(value).over(same_step)).alias("region_mean"),
        F.when(known, F.count(value).over(same_step)).otherwise(0).cast("int").alias("region_n_sensors"),
    ]
    return df.select(
        "sensor_id",
        "metric",
        "region",
        "ts",
        "reading_date",
        value.alias("value"),
        "is_filled",
        "is_outlier",
        *time_features(F.col("ts")),
        *region_cols,
        *lag_cols,
        *roll_cols,
    )


def region_hourly(silver: DataFrame, catalogue: Catalogue) -> DataFrame:
    """gold_region_hourly: one row per region, metric and UTC hour with silver rows.

    Over the usable points (non-null ``value_clean``) of the hour: ``n_sensors`` = sensors
    with at least one point, ``n_points`` = points, ``value_mean/min/max`` over all points,
    ``value_total`` = sum over sensors of each sensor's hourly aggregate by the metric's
    catalogue aggregate (sum of its points for sum metrics, their mean for mean metrics).
    ``unit`` from the catalogue. Rows without a region are left out.
    """
    units = _map_literal({name: m.unit for name, m in catalogue.metrics.items()})
    aggregates = _map_literal({name: m.aggregate for name, m in catalogue.metrics.items()})
    epoch = F.unix_seconds("ts")
    hour_ts = F.timestamp_seconds(F.floor(epoch / SECONDS_PER_HOUR) * SECONDS_PER_HOUR)
    value = F.col("value_clean")
    per_sensor = (
        silver.where(F.col("region").isNotNull())
        .withColumn("hour_ts", hour_ts)
        .groupBy("region", "metric", "hour_ts", "sensor_id")
        .agg(
            F.count(value).alias("_n"),
            F.sum(value).alias("_sum"),
            F.min(value).alias("_min"),
            F.max(value).alias("_max"),
        )
        .withColumn(
            "_agg",
            F.when(F.try_element_at(aggregates, F.col("metric")) == "sum", F.col("_sum"))
            .otherwise(F.col("_sum") / F.when(F.col("_n") > 0, F.col("_n"))),
        )
    )
    hourly = per_sensor.groupBy("region", "metric", "hour_ts").agg(
        F.count("_agg").cast("int").alias("n_sensors"),
        F.sum("_n").cast("int").alias("n_points"),
        F.sum("_sum").alias("_total_points"),
        F.min("_min").alias("value_min"),
        F.max("_max").alias("value_max"),
        F.sum("_agg").alias("value_total"),
    )
    return hourly.select(
        "region",
        "metric",
        F.try_element_at(units, F.col("metric")).alias("unit"),
        "hour_ts",
        utc_date(F.col("hour_ts")).alias("reading_date"),
        "n_sensors",
        "n_points",
        (F.col("_total_points") / F.when(F.col("n_points") > 0, F.col("n_points"))).alias("value_mean"),
        "value_min",
        "value_max",
        "value_total",
    )
