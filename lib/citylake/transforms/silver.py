"""Bronze -> silver: pure DataFrame transforms, one per cleaning rule.

A *series* is one ``(sensor_id, metric)``. Every rule reads its per-metric parameters
(grid interval, aggregate, outlier and gap-fill settings) from the metric catalogue,
turned into a map literal keyed by metric (:func:`metric_params`), so no rule is
written twice and no Python UDF runs.

Rules, in order (:func:`build_silver` composes them):

1. :func:`resolve_conflicts` - one reading per ``(sensor_id, metric, ts)``: the latest
   batch wins (max ``batch_id``, then max ``ingest_ts``, then max ``source_file``, then the
   larger ``value`` so that the choice is deterministic); the others are counted.
2. :func:`resample` - readings combined per grid step ``floor(epoch / interval_s)`` with
   the metric's aggregate (mean or sum).
3. :func:`complete_grid` - every step of each UTC day on which the series has a reading;
   steps without readings get a null value.
4. :func:`flag_outliers` - Hampel rule on a centred window of ``outlier_window`` steps.
5. :func:`fill_gaps` - linear interpolation over runs of at most ``max_fill_gap`` missing
   steps with a usable value on both sides.
6. :func:`attach_region` - region of the sensor's current registry row.

Time is handled in epoch seconds and UTC days computed from them, so results do not
depend on the session time zone.
"""

from __future__ import annotations

import datetime as dt

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from citylake.catalogue import Catalogue

#: Consistency constant of the MAD for normally distributed data.
MAD_SCALE = 1.4826
SECONDS_PER_DAY = 86_400

#: Internal column holding the metric's parameter struct while a rule runs.
_P = "_params"
#: Internal column: grid step index, ``floor(epoch seconds / interval_s)``.
_STEP = "_step"

SERIES = ("sensor_id", "metric")


# -- parameters ------------------------------------------------------------------------
def metric_params(catalogue: Catalogue) -> Column:
    """A ``map<metric, struct>`` literal of the catalogue's cleaning parameters.

    Struct fields: ``interval_s`` (seconds, long), ``aggregate`` ("mean"|"sum"),
    ``max_fill_gap`` (steps), ``half_window`` (``outlier_window // 2``, steps),
    ``outlier_k`` (dimensionless), ``outlier_min_dev`` (metric unit), ``unit``.
    """
    entries: list[Column] = []
    for name, m in sorted(catalogue.metrics.items()):
        entries.append(F.lit(name))
        entries.append(
            F.struct(
                F.lit(m.interval_s).cast("long").alias("interval_s"),
                F.lit(m.aggregate).alias("aggregate"),
                F.lit(m.max_fill_gap).cast("int").alias("max_fill_gap"),
                F.lit(m.outlier_window // 2).cast("int").alias("half_window"),
                F.lit(m.outlier_k).cast("double").alias("outlier_k"),
                F.lit(m.outlier_min_dev).cast("double").alias("outlier_min_dev"),
                F.lit(m.unit).alias("unit"),
            )
        )
    return F.create_map(*entries)


def _with_params(df: DataFrame, catalogue: Catalogue) -> DataFrame:
    """Attach the metric's parameters; rows of metrics unknown to the catalogue are
    dropped (ingest quarantines them, so none should reach here)."""
    params = F.try_element_at(metric_params(catalogue), F.col("metric"))
    return df.withColumn(_P, params).where(F.col(_P).isNotNull())


def _step_of(ts: Column, interval_s: Column) -> Column:
    """Grid step index of ``ts``: ``floor(epoch seconds / interval_s)`` (long)."""
    return F.floor(F.unix_seconds(ts) / interval_s).cast("long")


def utc_date(ts: Column) -> Column:
    """UTC calendar date of a timestamp, independent of the session time zone."""
    return F.date_from_unix_date(F.floor(F.unix_seconds(ts) / SECONDS_PER_DAY).cast("int"))


def _series_window() -> Window:
    """Per-series window ordered by grid step (range frames count steps, not rows)."""
    return Window.partitionBy(*SERIES).orderBy(_STEP)


# -- 1. conflicts ----------------------------------------------------------------------
def resolve_conflicts(bronze: DataFrame) -> DataFrame:
    """Keep one reading per ``(sensor_id, metric, ts)``.

    Rule: the reading from the latest batch wins - highest ``batch_id``, then latest
    ``ingest_ts``, then greatest ``source_file``, then the greater ``value`` (a last,
    arbitrary but deterministic tie-break, so re-runs pick the same row). Exact
    duplicates were removed at ingest, so every other row for the key is a conflicting
    re-send: ``n_conflicts`` (int) counts them.

    Input: bronze columns (``sensor_id, metric, ts, value, batch_id, ingest_ts,
    source_file``). Output: ``sensor_id, metric, ts, value, n_conflicts``.
    """
    key = Window.partitionBy("sensor_id", "metric", "ts")
    ranked = key.orderBy(
        F.col("batch_id").desc(),
        F.col("ingest_ts").desc(),
        F.col("source_file").desc(),
        F.col("value").desc(),
    )
    return (
        bronze.withColumn("_rank", F.row_number().over(ranked))
        .withColumn("n_conflicts", (F.count(F.lit(1)).over(key) - 1).cast("int"))
        .where(F.col("_rank") == 1)
        .select("sensor_id", "metric", "ts", "value", "n_conflicts")
    )


# -- 2. resample -----------------------------------------------------------------------
def _ordered_sum(values: Column) -> Column:
    """Sum of an array in sorted order: the same bits whatever the shuffle order, so a
    re-run yields identical doubles and the silver MERGE sees no change."""
    return F.aggregate(F.array_sort(values), F.lit(0.0).cast("double"), lambda acc, x: acc + x)


def resample(readings: DataFrame, catalogue: Catalogue) -> DataFrame:
    """Combine readings into grid steps of the metric's ``interval_s``.

    Step start = ``floor(epoch(ts) / interval_s) * interval_s`` (UTC). Readings in a step
    combine by the metric's aggregate: ``sum`` or ``mean`` (in the metric's unit).
    ``n_readings`` counts them; ``n_conflicts`` sums the input's (0 when absent).

    Output: ``sensor_id, metric, ts (step start), value, n_readings, n_conflicts``;
    only steps with at least one reading.
    """
    if "n_conflicts" not in readings.columns:
        readings = readings.withColumn("n_conflicts", F.lit(0))
    with_step = _with_params(readings, catalogue).withColumn(
        _STEP, _step_of(F.col("ts"), F.col(f"{_P}.interval_s"))
    )
    grouped = with_step.groupBy(*SERIES, _STEP).agg(
        F.first(_P).alias(_P),  # constant within a metric
        F.collect_list("value").alias("_values"),
        F.sum("n_conflicts").cast("int").alias("n_conflicts"),
    )
    n = F.size("_values")
    total = _ordered_sum(F.col("_values"))
    value = F.when(F.col(f"{_P}.aggregate") == "sum", total).otherwise(total / n)
    return grouped.select(
        *SERIES,
        F.timestamp_seconds(F.col(_STEP) * F.col(f"{_P}.interval_s")).alias("ts"),
        value.alias("value"),
        n.cast("int").alias("n_readings"),
        "n_conflicts",
    )


# -- 3. grid ---------------------------------------------------------------------------
def complete_grid(steps: DataFrame, catalogue: Catalogue) -> DataFrame:
    """Every grid step of each UTC day on which the series has at least one step.

    A day's steps are those whose start falls on that day (all catalogue intervals
    divide 24 h, so that is ``86400 / interval_s`` steps). A series silent for a whole
    day gets no rows that day. Added steps have ``value`` null and counts 0.

    Input/output: ``sensor_id, metric, ts, value, n_readings, n_conflicts``.
    """
    # One pass per series-day: gather the day's steps into a map, then explode the full
    # step sequence and look each step up (no self-join, so the input is computed once).
    interval = F.col(f"{_P}.interval_s")
    by_day = (
        _with_params(steps, catalogue)
        .withColumn(_STEP, _step_of(F.col("ts"), interval))
        .withColumn("_day", F.floor(F.unix_seconds("ts") / SECONDS_PER_DAY))
        .groupBy(*SERIES, "_day")
        .agg(
            F.first(_P).alias(_P),  # constant within a metric
            F.map_from_entries(
                F.collect_list(
                    F.struct(
                        F.col(_STEP),
                        F.struct("value", "n_readings", "n_conflicts"),
                    )
                )
            ).alias("_steps"),
        )
    )
    day_start = F.col("_day") * SECONDS_PER_DAY
    first = F.floor((day_start + interval - 1) / interval).cast("long")  # ceil
    last = F.floor((day_start + SECONDS_PER_DAY - 1) / interval).cast("long")
    exploded = by_day.select(*SERIES, _P, "_steps", F.explode(F.sequence(first, last)).alias(_STEP))
    found = F.try_element_at(F.col("_steps"), F.col(_STEP))
    return exploded.select(
        *SERIES,
        F.timestamp_seconds(F.col(_STEP) * interval).alias("ts"),
        found["value"].alias("value"),
        F.coalesce(found["n_readings"], F.lit(0)).cast("int").alias("n_readings"),
        F.coalesce(found["n_conflicts"], F.lit(0)).cast("int").alias("n_conflicts"),
    )


# -- 4. outliers -----------------------------------------------------------------------
def _median_sorted(arr: Column) -> Column:
    """Median of a sorted array of doubles (null when empty). Both middle elements are
    averaged; for odd sizes they are the same element."""
    n = F.size(arr)
    lo = F.floor((n + 1) / 2).cast("int")
    hi = (F.floor(n / 2) + 1).cast("int")
    # try_element_at: an empty window must give null, not an ANSI index error.
    lower = F.try_element_at(arr, F.greatest(lo, F.lit(1)))
    upper = F.try_element_at(arr, F.greatest(hi, F.lit(1)))
    return F.when(n > 0, (lower + upper) / 2)


def _max_half_window(catalogue: Catalogue) -> int:
    return max(m.outlier_window // 2 for m in catalogue.metrics.values())


def flag_outliers(grid: DataFrame, catalogue: Catalogue) -> DataFrame:
    """Hampel rule per series on a centred window of ``outlier_window`` grid steps.

    For each step with a value x: m = median and MAD = median(|v - m|) of the non-null
    raw ``value``s whose step is within ``outlier_window // 2`` steps (x included);
    ``is_outlier`` when ``|x - m| > max(outlier_k * 1.4826 * MAD, outlier_min_dev)``
    (``outlier_min_dev`` in the metric's unit keeps flat series, MAD = 0, from flagging
    small changes). Null values are never outliers. ``value`` is kept as is;
    ``value_clean`` = ``value`` with outliers set to null.

    The frame is a range over step indexes (missing days are not bridged) sized for the
    widest metric, then narrowed per metric, since frame bounds must be constants.
    """
    half_max = _max_half_window(catalogue)
    window = _series_window().rangeBetween(-half_max, half_max)
    df = _with_params(grid, catalogue).withColumn(
        _STEP, _step_of(F.col("ts"), F.col(f"{_P}.interval_s"))
    )
    neighbours = F.collect_list(F.struct(F.col(_STEP).alias("s"), F.col("value").alias("v"))).over(window)
    half = F.col(f"{_P}.half_window")
    step = F.col(_STEP)
    in_window = F.filter(
        F.col("_nb"), lambda e: e["v"].isNotNull() & (F.abs(e["s"] - step) <= half)
    )
    df = df.withColumn("_nb", neighbours).withColumn(
        "_vals", F.array_sort(F.transform(in_window, lambda e: e["v"]))
    )
    df = df.withColumn("_median", _median_sorted(F.col("_vals")))
    # Each array is materialised as a column before its median reads it several times.
    deviations = F.array_sort(F.transform(F.col("_vals"), lambda v: F.abs(v - F.col("_median"))))
    df = df.withColumn("_devs", deviations).withColumn("_mad", _median_sorted(F.col("_devs")))
    threshold = F.greatest(
        F.col(f"{_P}.outlier_k") * MAD_SCALE * F.col("_mad"), F.col(f"{_P}.outlier_min_dev")
    )
    is_outlier = F.coalesce(F.abs(F.col("value") - F.col("_median")) > threshold, F.lit(False))
    return (
        df.withColumn("is_outlier", is_outlier)
        .withColumn("value_clean", F.when(~F.col("is_outlier"), F.col("value")))
        .drop(_P, _STEP, "_nb", "_vals", "_median", "_devs", "_mad")
    )


# -- 5. gap fill -----------------------------------------------------------------------
def _max_fill_gap(catalogue: Catalogue) -> int:
    return max(m.max_fill_gap for m in catalogue.metrics.values())


def fill_gaps(flagged: DataFrame, catalogue: Catalogue) -> DataFrame:
    """Linearly interpolate ``value_clean`` over short runs of missing steps.

    A step is missing when ``value_clean`` is null (no reading, or an outlier). A run of
    missing steps is filled when it is at most the metric's ``max_fill_gap`` steps long
    and has a usable value on both sides; the filled value at step s between (s0, v0)
    and (s1, v1) is ``v0 + (v1 - v0) * (s - s0) / (s1 - s0)``. Steps absent from the grid
    (a silent day) count as missing, so no fill bridges a silent day.
    ``is_filled`` marks filled steps; ``is_gap`` = ``value_clean`` still null.

    Neighbours are searched in a range frame of ``max(max_fill_gap) + 1`` steps: a run
    whose neighbours lie further away is too long to fill anyway.
    """
    reach = _max_fill_gap(catalogue) + 1
    series = _series_window()
    df = _with_params(flagged, catalogue).withColumn(
        _STEP, _step_of(F.col("ts"), F.col(f"{_P}.interval_s"))
    )
    point = F.when(
        F.col("value_clean").isNotNull(),
        F.struct(F.col(_STEP).alias("s"), F.col("value_clean").alias("v")),
    )
    df = df.select(
        "*",
        F.last(point, ignorenulls=True).over(series.rangeBetween(-reach, -1)).alias("_prev"),
        F.first(point, ignorenulls=True).over(series.rangeBetween(1, reach)).alias("_next"),
    )
    s0, v0 = F.col("_prev.s"), F.col("_prev.v")
    s1, v1 = F.col("_next.s"), F.col("_next.v")
    fillable = (
        F.col("value_clean").isNull()
        & F.col("_prev").isNotNull()
        & F.col("_next").isNotNull()
        & ((s1 - s0 - 1) <= F.col(f"{_P}.max_fill_gap"))
    )
    interpolated = v0 + (v1 - v0) * (F.col(_STEP) - s0) / (s1 - s0)
    return (
        df.withColumn("is_filled", F.coalesce(fillable, F.lit(False)))
        .withColumn("value_clean", F.when(F.col("is_filled"), interpolated).otherwise(F.col("value_clean")))
        .withColumn("is_gap", F.col("value_clean").isNull())
        .drop(_P, _STEP, "_prev", "_next")
    )


# -- 6. region -------------------------------------------------------------------------
def attach_region(df: DataFrame, sensors: DataFrame) -> DataFrame:
    """Add ``region`` from the sensor registry's current row (``is_current``).

    Should the registry hold several current rows for a sensor, the one with the latest
    ``valid_from`` wins. Sensors missing from the registry get a null region.
    """
    current = (
        sensors.where(F.col("is_current"))
        .groupBy("sensor_id")
        .agg(F.max_by("region", "valid_from").alias("region"))
    )
    # The registry is small: broadcast it rather than shuffle the readings by sensor.
    return df.join(F.broadcast(current), on="sensor_id", how="left")


# -- composed --------------------------------------------------------------------------
SILVER_CONTENT_COLUMNS = (
    "region",
    "value",
    "n_readings",
    "n_conflicts",
    "is_outlier",
    "value_clean",
    "is_filled",
    "is_gap",
)


def build_silver(bronze: DataFrame, sensors: DataFrame, catalogue: Catalogue, now: dt.datetime) -> DataFrame:
    """Bronze readings -> silver_readings rows (all rules, in order; see module doc).

    ``now`` (UTC) becomes ``updated_ts``. Output columns are those of
    ``silver_readings``, in order; one row per series and grid step of every UTC day with
    a reading. ``reading_date`` = UTC date of the step start.
    """
    # One shuffle by series: every later window and aggregate is keyed by (sensor_id,
    # metric, ...), so Spark reuses this partitioning instead of shuffling per step.
    resolved = resolve_conflicts(bronze.repartition(*SERIES))
    grid = complete_grid(resample(resolved, catalogue), catalogue)
    cleaned = fill_gaps(flag_outliers(grid, catalogue), catalogue)
    with_region = attach_region(cleaned, sensors)
    return with_region.select(
        "sensor_id",
        "metric",
        "region",
        "ts",
        utc_date(F.col("ts")).alias("reading_date"),
        "value",
        "n_readings",
        "n_conflicts",
        "is_outlier",
        "value_clean",
        "is_filled",
        "is_gap",
        F.lit(now).cast("timestamp").alias("updated_ts"),
    )
