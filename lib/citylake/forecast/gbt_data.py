"""Feature rows and targets for the gradient-boosted-tree forecaster (:mod:`citylake.forecast.gbt`).

One row per series ``(sensor_id, metric)``, origin time ``t`` (a gold_features row) and
step ``h`` in ``1..H`` (direct multi-step strategy: ``h`` is a feature, see
:mod:`citylake.forecast.gbt`). Everything in a row is known at ``t``:

* the series' own gold columns at ``t``: ``value`` and every ``lag_k``, ``roll_mean_w``,
  ``roll_std_w`` (gold already builds them from steps strictly before ``t``);
* ``region_mean``: mean over the region's sensors of the metric at ``t``;
* ``step`` = ``h`` and the calendar of the *target* time ``t + h * interval``
  (``target_hour_sin/cos``, ``target_dow_sin/cos``; known in advance, so no leakage);
* ``x_<metric>``: for air-quality and weather metrics (catalogue domain ``air`` /
  ``weather``), the same station's other metrics at ``t`` (pivot of their ``value``);
  null for other domains (a traffic loop has no pm25). A group's own metric's ``x_``
  column (= ``value``) is left out of that group's features by the trainer;
* ``sensor_id`` (the trainer turns it into a categorical code).

Targets (training only): ``y`` = the series' ``value`` exactly ``h`` grid steps after
``t``. Steps are counted on the grid index ``floor(epoch / interval_s)`` with a
``rangeBetween(h, h)`` window (as gold's lags are), not with a row-based ``lead``: when a
day of the series is absent from gold, a row ``lead`` would silently reach further
ahead. A null target (gap, or the step is absent) drops the row.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from citylake.catalogue import Catalogue, load_catalogue
from citylake.transforms.features import time_features

SERIES = ("sensor_id", "metric")
#: One model per group: region and metric (series of different metrics have different scales).
GROUP = ("region", "metric")
STEP = "step"
TARGET = "y"
ORIGIN_TS = "origin_ts"
TARGET_TS = "target_ts"
#: The sensor as a categorical feature (integer code, built by the trainer).
SENSOR_FEATURE = "sensor"
CROSS_PREFIX = "x_"
#: Catalogue domains whose stations report several metrics worth using for each other.
CROSS_DOMAINS = ("air", "weather")
CALENDAR_FEATURES = ("target_hour_sin", "target_hour_cos", "target_dow_sin", "target_dow_cos")

_GOLD_DYNAMIC = re.compile(r"(lag_\d+|roll_(mean|std)_\d+)")
_GRID = "_grid"
_INTERVAL = "_interval_s"


def cross_metric_names(catalogue: Catalogue | None = None) -> list[str]:
    """Metrics pivoted into ``x_<metric>`` columns: the catalogue's air and weather metrics."""
    cat = catalogue or load_catalogue()
    return sorted(name for name, m in cat.metrics.items() if m.domain in CROSS_DOMAINS)


def gold_feature_columns(columns: Sequence[str]) -> list[str]:
    """The series' own numeric gold features present in ``columns``: ``value``, the
    ``lag_k`` / ``roll_mean_w`` / ``roll_std_w`` columns (in table order), ``region_mean``."""
    dynamic = [c for c in columns if _GOLD_DYNAMIC.fullmatch(c)]
    return ["value", *dynamic, "region_mean"]


def numeric_feature_candidates(columns: Sequence[str], cross_metrics: Sequence[str]) -> list[str]:
    """Every numeric feature column a group may use (before dropping all-null ones):
    gold features, ``step``, target calendar, ``x_<metric>``."""
    return [
        *gold_feature_columns(columns),
        STEP,
        *CALENDAR_FEATURES,
        *[CROSS_PREFIX + m for m in cross_metrics],
    ]


def _interval_column(intervals: Mapping[str, int]) -> Column:
    pairs = [x for m, s in sorted(intervals.items()) for x in (F.lit(m), F.lit(int(s)).cast("long"))]
    return F.try_element_at(F.create_map(*pairs), F.col("metric"))


def _with_grid(gold: DataFrame, intervals: Mapping[str, int] | None) -> DataFrame:
    """Attach ``_interval_s`` (seconds, from the catalogue by default) and the grid index.
    Rows of a metric without an interval, or without a region, are dropped: no group."""
    intervals = intervals or {n: m.interval_s for n, m in load_catalogue().metrics.items()}
    return (
        gold.withColumn(_INTERVAL, _interval_column(intervals))
        .where(F.col(_INTERVAL).isNotNull() & F.col("region").isNotNull())
        .withColumn(_GRID, F.floor(F.unix_seconds("ts") / F.col(_INTERVAL)).cast("long"))
    )


def with_cross_metrics(gold: DataFrame, cross_metrics: Sequence[str]) -> DataFrame:
    """Add ``x_<m>`` for every m in ``cross_metrics``: the same sensor's ``value`` of
    metric m at the same ``ts`` (null when absent).

    A window over ``(sensor_id, ts)`` (one shuffle; a pivot + join back would take two)
    picks each metric's value; (sensor_id, metric, ts) is gold's key, so there is one.
    Only rows of the cross metrics take part; the others (5-minute traffic, energy: the
    bulk of a city) get null columns without a shuffle.
    """
    names = [CROSS_PREFIX + m for m in cross_metrics]
    if not names:
        return gold
    is_cross = F.col("metric").isin(list(cross_metrics))
    station_step = Window.partitionBy("sensor_id", "ts")
    pivoted = [
        F.max(F.when(F.col("metric") == m, F.col("value"))).over(station_step).alias(CROSS_PREFIX + m)
        for m in cross_metrics
    ]
    joined = gold.where(is_cross).select("*", *pivoted)
    others = gold.where(~is_cross).select("*", *[F.lit(None).cast("double").alias(n) for n in names])
    return joined.unionByName(others)


def _stack_steps(df: DataFrame, horizon: int, targets: bool) -> DataFrame:
    """One row per origin and step 1..horizon, with ``target_ts`` and its calendar."""
    entries = [
        F.struct(
            F.lit(h).alias(STEP),
            (F.col(f"_y{h}") if targets else F.lit(None).cast("double")).alias(TARGET),
        )
        for h in range(1, horizon + 1)
    ]
    stacked = df.withColumn("_s", F.explode(F.array(*entries)))
    target_ts = F.timestamp_seconds(F.unix_seconds("ts") + F.col("_s.step") * F.col(_INTERVAL))
    stacked = stacked.withColumn(STEP, F.col("_s.step")).withColumn(TARGET, F.col("_s.y"))
    stacked = stacked.withColumn(TARGET_TS, target_ts).withColumn(ORIGIN_TS, F.col("ts"))
    return stacked.select("*", *_target_calendar(F.col(TARGET_TS)))


def _target_calendar(ts: Column) -> list[Column]:
    """hour/dow sin/cos of the target time, named ``target_*`` (same formulas as gold)."""
    hour_sin, hour_cos, dow_sin, dow_cos = time_features(ts)
    return [
        hour_sin.alias("target_hour_sin"),
        hour_cos.alias("target_hour_cos"),
        dow_sin.alias("target_dow_sin"),
        dow_cos.alias("target_dow_cos"),
    ]


def _feature_output(gold_columns: Sequence[str], cross_metrics: Sequence[str]) -> list[str]:
    features = numeric_feature_candidates(gold_columns, cross_metrics)
    return [c for c in features if c != STEP]


def training_set(
    gold: DataFrame,
    horizon: int,
    intervals: Mapping[str, int] | None = None,
    cross_metrics: Sequence[str] | None = None,
    sample_fraction: float = 1.0,
    seed: int = 42,
) -> DataFrame:
    """Training rows of the direct multi-step model from a gold_features-shaped frame.

    ``horizon``: H, steps 1..H are stacked. ``intervals``: ``{metric: seconds}``
    (default: the catalogue). ``cross_metrics``: metrics pivoted into ``x_*`` columns
    (default :func:`cross_metric_names`; ``[]`` for none). ``sample_fraction`` in (0, 1]
    keeps that share of the (origin, step) rows, chosen by a hash of series, origin and
    step (deterministic for a seed; each step sees different origins, and no fixed
    hour of day is favoured, unlike a stride over origins).

    Columns: region, metric, sensor_id, origin_ts, target_ts, step (int), y (double,
    never null), then the feature candidates (:func:`numeric_feature_candidates` order,
    ``step`` already among the keys).
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if not 0 < sample_fraction <= 1:
        raise ValueError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
    cross = cross_metric_names() if cross_metrics is None else list(cross_metrics)
    df = with_cross_metrics(_with_grid(gold, intervals), cross)
    grid = Window.partitionBy(*SERIES).orderBy(_GRID)
    targets = [F.first("value").over(grid.rangeBetween(h, h)).alias(f"_y{h}") for h in range(1, horizon + 1)]
    df = df.select("*", *targets)
    rows = _stack_steps(df, horizon, targets=True).where(F.col(TARGET).isNotNull())
    if sample_fraction < 1:
        bucket = F.pmod(F.xxhash64("sensor_id", "metric", ORIGIN_TS, STEP, F.lit(seed)), F.lit(1_000_000))
        rows = rows.where(bucket < int(sample_fraction * 1_000_000))
    return rows.select(*_keys(with_target=True), *_feature_output(gold.columns, cross))


def origin_rows(
    gold_at_origins: DataFrame,
    horizon: int,
    intervals: Mapping[str, int] | None = None,
    cross_metrics: Sequence[str] | None = None,
) -> DataFrame:
    """Prediction rows: every row of ``gold_at_origins`` (gold_features-shaped; each row an
    origin) times steps 1..horizon, with the same feature columns as :func:`training_set`
    and no target. For the ``x_*`` columns, pass every metric's row of a station at the
    origin time (e.g. gold filtered to ``ts = origin``), not only the forecast metric's.
    """
    cross = cross_metric_names() if cross_metrics is None else list(cross_metrics)
    df = with_cross_metrics(_with_grid(gold_at_origins, intervals), cross)
    rows = _stack_steps(df, horizon, targets=False)
    return rows.select(*_keys(with_target=False), *_feature_output(gold_at_origins.columns, cross))


def _keys(with_target: bool) -> list[str | Column]:
    keys = ["region", "metric", "sensor_id", ORIGIN_TS, TARGET_TS, F.col(STEP).cast("int").alias(STEP)]
    return keys + ([TARGET] if with_target else [])
