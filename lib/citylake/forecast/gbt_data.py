"""Feature rows and targets for the gradient-boosted-tree forecaster (:mod:`citylake.forecast.gbt`).

One row per series ``(sensor_id, metric)``, origin time ``t`` (a gold_features row) and
step ``h`` in ``1..H`` (direct multi-step strategy: ``h`` is a feature, see
:mod:`citylake.forecast.gbt`). Everything in a row is known at ``t``:

* the series' own gold columns at ``t``: ``value`` and every ``lag_k``, ``roll_mean_w``,
  ``roll_std_w`` (gold already builds them from steps strictly before ``t``), and
  ``change_k`` = ``value - lag_k`` for every lag (the recent trend; trees would need
  many splits on two columns to find a difference);
* ``region_mean``: mean over the region's sensors of the metric at ``t``;
* ``step`` = ``h`` and the calendar of the *target* time ``t + h * interval``
  (``target_hour_sin/cos``, ``target_dow_sin/cos``, ``target_doy_sin/cos`` for the
  season; known in advance, so no leakage); the day-of-week pair is null for metrics
  whose catalogue entry says ``weekly_cycle: false`` (so their groups leave it out);
* ``x_<metric>``: for air-quality and weather metrics (catalogue domain ``air`` /
  ``weather``), the same station's other metrics at ``t`` (pivot of their ``value``),
  with ``x_<metric>_change_k`` (``value - lag_k`` of that metric, for the gold lags of
  :data:`CROSS_CHANGE_MIN_LAG` steps or more: a falling pressure or a turning wind
  says more about tomorrow's PM2.5 than today's reading) and ``x_<metric>_mean_w``
  (its ``roll_mean_w`` of the longest gold window); null for other domains (a traffic
  loop has no pm25). A group's own metric's ``x_`` columns (``value`` and its own
  changes again) are left out of that group's features by the trainer;
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
from citylake.transforms.features import season_features, time_features

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
CALENDAR_FEATURES = (
    "target_hour_sin", "target_hour_cos", "target_dow_sin", "target_dow_cos", "target_doy_sin", "target_doy_cos",
)
#: Cross-metric changes use the gold lags of at least this many steps (1-2 step changes
#: of the weather were noise in the Beijing experiments, bench/RESULTS_BEIJING.md).
CROSS_CHANGE_MIN_LAG = 3

_GOLD_DYNAMIC = re.compile(r"(lag_\d+|roll_(mean|std)_\d+)")
_LAG = re.compile(r"lag_(\d+)")
_ROLL_MEAN = re.compile(r"roll_mean_(\d+)")
_GRID = "_grid"
_INTERVAL = "_interval_s"


def cross_metric_names(catalogue: Catalogue | None = None) -> list[str]:
    """Metrics pivoted into ``x_<metric>`` columns: the catalogue's air and weather metrics."""
    cat = catalogue or load_catalogue()
    return sorted(name for name, m in cat.metrics.items() if m.domain in CROSS_DOMAINS)


def _lags(columns: Sequence[str]) -> list[int]:
    return [int(m.group(1)) for c in columns if (m := _LAG.fullmatch(c))]


def _change(k: int) -> Column:
    """``value - lag_k``: the change over the last k steps (of the row's own metric)."""
    return F.col("value") - F.col(f"lag_{k}")


def gold_feature_columns(columns: Sequence[str]) -> list[str]:
    """The series' own numeric features from the gold columns in ``columns``: ``value``,
    the ``lag_k`` / ``roll_mean_w`` / ``roll_std_w`` columns (in table order),
    ``region_mean``, then ``change_k`` for every lag."""
    dynamic = [c for c in columns if _GOLD_DYNAMIC.fullmatch(c)]
    return ["value", *dynamic, "region_mean", *[f"change_{k}" for k in _lags(columns)]]


def cross_feature_columns(columns: Sequence[str], metric: str) -> dict[str, Column]:
    """The ``x_<metric>*`` features of one cross metric, as expressions over that
    metric's own gold row (``columns`` = the gold columns): its value, its changes over
    the lags of at least :data:`CROSS_CHANGE_MIN_LAG` steps and its mean over the
    longest rolling window."""
    name = CROSS_PREFIX + metric
    out = {name: F.col("value")}
    for k in _lags(columns):
        if k >= CROSS_CHANGE_MIN_LAG:
            out[f"{name}_change_{k}"] = _change(k)
    windows = [int(m.group(1)) for c in columns if (m := _ROLL_MEAN.fullmatch(c))]
    if windows:
        out[f"{name}_mean_{max(windows)}"] = F.col(f"roll_mean_{max(windows)}")
    return out


def numeric_feature_candidates(columns: Sequence[str], cross_metrics: Sequence[str]) -> list[str]:
    """Every numeric feature column a group may use (before dropping all-null ones):
    gold features, ``step``, target calendar, the ``x_<metric>*`` columns."""
    return [
        *gold_feature_columns(columns),
        STEP,
        *CALENDAR_FEATURES,
        *[c for m in cross_metrics for c in cross_feature_columns(columns, m)],
    ]


def own_cross_features(candidates: Sequence[str], metric: str) -> set[str]:
    """The ``x_`` columns of a group's own metric among ``candidates`` (its value and
    changes again, already among the group's own features)."""
    own = re.compile(re.escape(CROSS_PREFIX + metric) + r"(_(change|mean)_\d+)?")
    return {c for c in candidates if own.fullmatch(c)}


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
    """Add the ``x_<m>*`` columns of every m in ``cross_metrics``
    (:func:`cross_feature_columns`): the same sensor's value, changes and mean of metric
    m at the same ``ts`` (null when absent).

    A window over ``(sensor_id, ts)`` (one shuffle; a pivot + join back would take two)
    picks each metric's value; (sensor_id, metric, ts) is gold's key, so there is one.
    Only rows of the cross metrics take part; the others (5-minute traffic, energy: the
    bulk of a city) get null columns without a shuffle.
    """
    if not cross_metrics:
        return gold
    is_cross = F.col("metric").isin(list(cross_metrics))
    station_step = Window.partitionBy("sensor_id", "ts")
    pivoted = [
        F.max(F.when(F.col("metric") == m, expr)).over(station_step).alias(name)
        for m in cross_metrics
        for name, expr in cross_feature_columns(gold.columns, m).items()
    ]
    names = [n for m in cross_metrics for n in cross_feature_columns(gold.columns, m)]
    joined = gold.where(is_cross).select("*", *pivoted)
    others = gold.where(~is_cross).select("*", *[F.lit(None).cast("double").alias(n) for n in names])
    return joined.unionByName(others)


def weekly_metric_names(catalogue: Catalogue | None = None) -> list[str]:
    """Metrics with a weekly cycle (catalogue ``weekly_cycle``): they get day-of-week features."""
    cat = catalogue or load_catalogue()
    return sorted(name for name, m in cat.metrics.items() if m.weekly_cycle)


def _stack_steps(df: DataFrame, horizon: int, targets: bool, weekly_metrics: Sequence[str]) -> DataFrame:
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
    return stacked.select("*", *_target_calendar(F.col(TARGET_TS), F.col("metric").isin(list(weekly_metrics))))


def _target_calendar(ts: Column, weekly: Column) -> list[Column]:
    """hour/dow sin/cos of the target time (same formulas as gold; dow null where
    ``weekly`` is false) and its time of year, named ``target_*``."""
    hour_sin, hour_cos, dow_sin, dow_cos = time_features(ts)
    return [
        hour_sin.alias("target_hour_sin"),
        hour_cos.alias("target_hour_cos"),
        F.when(weekly, dow_sin).alias("target_dow_sin"),
        F.when(weekly, dow_cos).alias("target_dow_cos"),
        *season_features(ts, "target_doy"),
    ]


def _with_changes(df: DataFrame, gold_columns: Sequence[str]) -> DataFrame:
    """``change_k = value - lag_k`` for every gold lag."""
    return df.withColumns({f"change_{k}": _change(k) for k in _lags(gold_columns)})


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
    weekly_metrics: Sequence[str] | None = None,
) -> DataFrame:
    """Training rows of the direct multi-step model from a gold_features-shaped frame.

    ``horizon``: H, steps 1..H are stacked. ``intervals``: ``{metric: seconds}``
    (default: the catalogue). ``cross_metrics``: metrics pivoted into ``x_*`` columns
    (default :func:`cross_metric_names`; ``[]`` for none). ``sample_fraction`` in (0, 1]
    keeps that share of the (origin, step) rows, chosen by a hash of series, origin and
    step (deterministic for a seed; each step sees different origins, and no fixed
    hour of day is favoured, unlike a stride over origins). ``weekly_metrics``: metrics
    that get day-of-week features (default :func:`weekly_metric_names`).

    Columns: region, metric, sensor_id, origin_ts, target_ts, step (int), y (double,
    never null), then the feature candidates (:func:`numeric_feature_candidates` order,
    ``step`` already among the keys).
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if not 0 < sample_fraction <= 1:
        raise ValueError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
    cross = cross_metric_names() if cross_metrics is None else list(cross_metrics)
    df = _with_changes(with_cross_metrics(_with_grid(gold, intervals), cross), gold.columns)
    grid = Window.partitionBy(*SERIES).orderBy(_GRID)
    targets = [F.first("value").over(grid.rangeBetween(h, h)).alias(f"_y{h}") for h in range(1, horizon + 1)]
    df = df.select("*", *targets)
    weekly = weekly_metric_names() if weekly_metrics is None else list(weekly_metrics)
    rows = _stack_steps(df, horizon, True, weekly).where(F.col(TARGET).isNotNull())
    if sample_fraction < 1:
        bucket = F.pmod(F.xxhash64("sensor_id", "metric", ORIGIN_TS, STEP, F.lit(seed)), F.lit(1_000_000))
        rows = rows.where(bucket < int(sample_fraction * 1_000_000))
    return rows.select(*_keys(with_target=True), *_feature_output(gold.columns, cross))


def origin_rows(
    gold_at_origins: DataFrame,
    horizon: int,
    intervals: Mapping[str, int] | None = None,
    cross_metrics: Sequence[str] | None = None,
    weekly_metrics: Sequence[str] | None = None,
) -> DataFrame:
    """Prediction rows: every row of ``gold_at_origins`` (gold_features-shaped; each row an
    origin) times steps 1..horizon, with the same feature columns as :func:`training_set`
    and no target. For the ``x_*`` columns, pass every metric's row of a station at the
    origin time (e.g. gold filtered to ``ts = origin``), not only the forecast metric's.
    """
    cross = cross_metric_names() if cross_metrics is None else list(cross_metrics)
    df = _with_changes(with_cross_metrics(_with_grid(gold_at_origins, intervals), cross), gold_at_origins.columns)
    weekly = weekly_metric_names() if weekly_metrics is None else list(weekly_metrics)
    rows = _stack_steps(df, horizon, False, weekly)
    return rows.select(*_keys(with_target=False), *_feature_output(gold_at_origins.columns, cross))


def _keys(with_target: bool) -> list[str | Column]:
    keys = ["region", "metric", "sensor_id", ORIGIN_TS, TARGET_TS, F.col(STEP).cast("int").alias(STEP)]
    return keys + ([TARGET] if with_target else [])
