"""Gradient-boosted trees per region and metric: LightGBM in executors or Spark ML, one interface.

Model
-----
One model per group ``(region, metric)`` - "per region" as the issue asks, and per metric
because series of different metrics have different units and scales. Rows, features and
targets come from :mod:`citylake.forecast.gbt_data`: each row is a series, an origin
time ``t`` and a step ``h``; the target is the series' value ``h`` grid steps after ``t``.

Target: the *change* from the origin, ``y_(t+h) - value_t`` (``value`` null -> 0), and
the forecast is that change added back to ``value_t``. Trees predict piecewise
constants, so a model of the level must rebuild "tomorrow is about today" from splits
on ``value`` (coarse on a heavy-tailed range: on Beijing PM2.5 the level model was 29%
*worse* than persistence at step 1); a model of the change starts from persistence and
spends its splits on what moves the series (mean reversion, the daily cycle, weather).
:attr:`GBTModel.target` records which one a model learnt (models logged before this
was added learnt the level).

Multi-step strategy: *direct, one model per step* (by default; ``steps_per_model`` of
:class:`GBTParams`). The rows of steps 1..H are stacked, and each block of
``steps_per_model`` consecutive steps gets its own model ``y_(t+h) = f(features at t,
h, calendar of t+h)`` (within a block the step is a feature). There is no recursion,
so errors do not compound. One pooled model for all steps (``steps_per_model=0``) is
one fit instead of H, but on Beijing PM2.5 it lost to persistence at step 1 (+14%)
where per-step models win (-13%), and at 24 h it was 19.7% below persistence against
21.5% for the per-step models (bench/RESULTS_BEIJING.md): the pooled trees spend their
splits on the long steps. Per-step fits cost about the same in total (each sees 1/H of
the rows); a group's models travel together (one GBTModel, one MLflow model).

Features: the series' own gold columns at ``t`` (value, lags, rolling mean/std, changes
over each lag), ``region_mean`` at ``t``, ``step``, hour/dow/day-of-year sin/cos of the
target time, for air / weather stations the station's other metrics at ``t`` with their
recent changes and daily means (``x_<metric>*``, see :mod:`citylake.forecast.gbt_data`),
and the sensor as a categorical feature named ``sensor``:

* ``local``: integer code = position of the sensor id in the group's sorted sensor list
  (:attr:`GBTModel.categories`), declared categorical to LightGBM; a sensor unseen in
  training gets NaN, which LightGBM treats as missing.
* ``spark-ml``: ``StringIndexer`` (alphabetical, ``handleInvalid="keep"`` so an unseen
  sensor gets its own index). Its output carries nominal metadata through
  ``VectorAssembler``, so ``GBTRegressor`` splits it as a categorical (subsets of
  sensors), not as an ordered number; that needs ``maxBins >= number of sensors + 1``,
  which the trainer sets per group (one-hot would also work, but widens every row and
  trees split one sensor at a time).

Linear stage (``GBTParams.linear_stage``, on by default): each step model first fits a
ridge regression on its numeric features and the trees get its forecast as one more
input, ``linear_forecast`` (last in :func:`model_features`); see
:mod:`citylake.forecast.linear_stage`. ``local`` keeps the stages beside the LightGBM
texts (:attr:`GBTModel.linear`); ``spark-ml`` holds them as ``Imputer`` /
``LinearRegression`` / ``VectorAssembler`` stages of its PipelineModel.

Missing feature values: LightGBM handles NaN natively. Spark ML trees do not, so the
spark-ml pipeline starts with a ``SQLTransformer`` that replaces nulls by
:data:`SPARK_MISSING` (far below any physical value, so a tree can isolate "missing"
with one split); it is part of the saved ``PipelineModel``, so a model loaded from
MLflow takes raw feature columns. Feature columns that are null in every row of a group
(e.g. ``x_pm10`` where no station measures pm10) are left out of that group's model.

Engines
-------
* ``local``: one grouped pandas UDF (``applyInPandas``) trains LightGBM
  (``n_jobs=1``: Spark already runs one task per core) for many groups at once, in the
  executors. Groups are packed into ``parallelism`` buckets by training rows (longest
  first), and each bucket is sent to its own partition (:func:`partition_keys`), so
  ``parallelism`` tasks train concurrently and no task gets two large groups by hash
  collision. Each group returns its model text (``Booster.model_to_string``), gain
  importances, rows, fit seconds and in-sample RMSE.
* ``spark-ml``: a ``pyspark.ml`` PipelineModel (SQLTransformer, StringIndexer,
  VectorAssembler, one GBTRegressor per step block, a SQLTransformer picking the
  block's prediction) per group; ``parallelism`` groups are fitted at once,
  each from its own thread of a ``ThreadPoolExecutor``, in its own scheduler pool
  (``sc.setLocalProperty("spark.scheduler.pool", ...)``). Pools only share the cluster
  fairly when the session was built with :data:`FAIR_SCHEDULER_CONF`
  (``spark.scheduler.mode=FAIR``); under the default FIFO the first group's jobs take
  every free core and the others wait (a warning is logged).
* ``auto`` (default): per group, ``spark-ml`` when the training rows of one of its fits
  (a step block: ``n_train / blocks``) are at least ``spark_min_rows``, else ``local``
  (:func:`choose_engine`). On 2 local cores Spark ML
  was never close to LightGBM (6-33x slower, ``bench/RESULTS_GBT.md``), hence the
  large default :data:`DEFAULT_SPARK_MIN_ROWS`: Spark ML is for groups too big for one
  Python worker's memory, where it is the only engine that scales out.

In-sample RMSE is on the training rows (all steps pooled), in the metric's unit. The
``seconds`` of a group are the fit's wall time (for spark-ml measured on the driver,
so with parallelism > 1 they include time shared with other groups).
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import reduce
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from citylake.catalogue import ColumnSpec, TableSpec
from citylake.forecast.gbt_data import (
    GROUP,
    ORIGIN_TS,
    SENSOR_FEATURE,
    STEP,
    TARGET,
    TARGET_TS,
    cross_metric_names,
    numeric_feature_candidates,
    origin_rows,
    own_cross_features,
    training_set,
)
from citylake.forecast.linear_stage import (
    DEFAULT_L2,
    LINEAR_FEATURE,
    LinearStage,
    fit_linear_stage,
    linear_forecast,
    linear_inputs,
)

log = logging.getLogger(__name__)

ENGINES = ("auto", "local", "spark-ml")
MODEL_NAME = "gbt"
#: ``forecast.gbt_spark_min_rows`` default: training rows of a group from which ``auto``
#: uses Spark ML. Set from bench/RESULTS_GBT.md: on local[2] Spark ML was 6-33x slower
#: than LightGBM at every size measured (5k-80k rows) with the gap not closing, so the
#: threshold is a memory bound, not a speed one: the local engine holds a whole group in
#: one Python worker, measured 0.5-0.7 KB per row with 16 features (peak RSS), i.e.
#: ~3 GB at 5M rows, the most we want one executor's Python side to take.
DEFAULT_SPARK_MIN_ROWS = 5_000_000
#: What the SparkSession needs for concurrent spark-ml groups (conf/base.yaml spark.conf).
FAIR_SCHEDULER_CONF = {"spark.scheduler.mode": "FAIR"}
#: Scheduler pool name prefix of the spark-ml threads.
POOL_PREFIX = "citylake-gbt"
#: Stand-in for a missing feature value in Spark ML (its trees cannot split on null/NaN).
SPARK_MISSING = -1.0e9
#: Training rows per partition of a spark-ml group's cached feature vectors (at most; a
#: group never gets more partitions than its input has): ~20 MB of 25 doubles per task.
SPARK_ROWS_PER_PARTITION = 100_000

_BUCKET = "_bucket"
_BLOCK = "_block"
_FILLED = "_f_"
_SENSOR_INDEX = "_sensor_idx"
_VECTOR = "_features"
_LINEAR_INPUT = "_l_"
_LINEAR_VECTOR = "_linear_features"
_LINEAR_PREDICTION = "_linear_block_"
_BLOCK_VECTOR = "_features_block_"
_PREDICTION = "prediction"  # MLflow's pyfunc wrapper of a Spark model reads this column
_BLOCK_PREDICTION = "_prediction_block_"

PREDICTION_COLUMNS = ("model", "sensor_id", "metric", "region", ORIGIN_TS, TARGET_TS, STEP, "y_pred")
_PREDICTION_SCHEMA = T.StructType(
    [
        T.StructField("model", T.StringType()),
        T.StructField("sensor_id", T.StringType()),
        T.StructField("metric", T.StringType()),
        T.StructField("region", T.StringType()),
        T.StructField(ORIGIN_TS, T.TimestampType()),
        T.StructField(TARGET_TS, T.TimestampType()),
        T.StructField(STEP, T.IntegerType()),
        T.StructField("y_pred", T.DoubleType()),
    ]
)
_LOCAL_FIT_SCHEMA = T.StructType(
    [
        T.StructField("region", T.StringType()),
        T.StructField("metric", T.StringType()),
        T.StructField("block", T.IntegerType()),
        T.StructField("model_text", T.StringType()),
        T.StructField("linear", T.StringType()),
        T.StructField("gains", T.ArrayType(T.DoubleType())),
        T.StructField("n_train", T.LongType()),
        T.StructField("seconds", T.DoubleType()),
        T.StructField("sse", T.DoubleType()),
    ]
)

GOLD_FEATURE_IMPORTANCE = TableSpec(
    name="gold_feature_importance",
    path="gold/feature_importance",
    layer="gold",
    description="Feature importances of each GBT model (region x metric), normalised to sum 1.",
    partition_by=(),
    keys=("region", "metric", "engine", "feature"),
    unique_keys=None,
    time_column=None,
    columns=(
        ColumnSpec("region", "string", False),
        ColumnSpec("metric", "string", False),
        ColumnSpec("engine", "string", False, "local (LightGBM) | spark-ml (GBTRegressor)"),
        ColumnSpec("feature", "string", False, "model input; sensor = the categorical sensor id"),
        ColumnSpec("importance", "double", False, "share of total gain, sums to 1 per model"),
        ColumnSpec("rank", "int", False, "1 = most important"),
    ),
)

#: The same table for ``schemas/tables.yaml`` (for the integrator; add run keys as needed).
TABLES_YAML_ENTRY = """\
  gold_feature_importance:
    path: gold/feature_importance
    layer: gold
    description: Feature importances of each GBT model (region x metric), normalised to sum 1.
    partition_by: []
    keys: [region, metric, engine, feature]
    columns:
      - {name: region, type: string, nullable: false}
      - {name: metric, type: string, nullable: false}
      - {name: engine, type: string, nullable: false, description: "local (LightGBM) | spark-ml (GBTRegressor)"}
      - {name: feature, type: string, nullable: false, description: model input; sensor = the categorical sensor id}
      - {name: importance, type: double, nullable: false, description: share of total gain, sums to 1 per model}
      - {name: rank, type: int, nullable: false, description: 1 = most important}
"""


@dataclass(frozen=True)
class GBTParams:
    """Tree-ensemble settings shared by both engines.

    ``n_trees`` boosting rounds; ``learning_rate`` shrinkage; ``max_depth`` tree depth
    (LightGBM gets ``num_leaves = 2**max_depth`` so both engines grow trees of the same
    size); ``min_rows_per_leaf``; ``subsample`` share of rows per tree (1 = all);
    ``feature_fraction`` share of features per tree (1 = all); ``max_bins`` histogram
    bins per feature (Spark ML raises it per group to fit the sensor categories);
    ``steps_per_model``: consecutive steps sharing one model (1 = one model per step,
    0 = one model for all steps; :func:`step_blocks`); ``linear_stage``: a ridge
    regression's forecast as one more input of the trees
    (:mod:`citylake.forecast.linear_stage`); ``seed``.
    """

    n_trees: int = 100
    learning_rate: float = 0.1
    max_depth: int = 5
    min_rows_per_leaf: int = 20
    subsample: float = 1.0
    feature_fraction: float = 1.0
    max_bins: int = 255
    steps_per_model: int = 1
    linear_stage: bool = True
    seed: int = 42

    def lightgbm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``lightgbm.LGBMRegressor`` (single-threaded, quiet)."""
        kwargs: dict[str, Any] = {
            "n_estimators": self.n_trees,
            "learning_rate": self.learning_rate,
            "max_depth": self.max_depth,
            "num_leaves": 2**self.max_depth,
            "min_child_samples": self.min_rows_per_leaf,
            "max_bin": self.max_bins,
            "random_state": self.seed,
            # One task per core already: threads inside a task would oversubscribe.
            "n_jobs": 1,
            "force_col_wise": True,
            "verbose": -1,
        }
        if self.subsample < 1:
            kwargs.update(subsample=self.subsample, subsample_freq=1)
        if self.feature_fraction < 1:
            kwargs.update(colsample_bytree=self.feature_fraction)
        return kwargs


def step_blocks(horizon: int, steps_per_model: int) -> tuple[tuple[int, int], ...]:
    """The (first, last) steps of each model of a group: blocks of ``steps_per_model``
    consecutive steps of 1..``horizon`` (the last block may be shorter); ``0`` or a
    value >= ``horizon`` gives one block of every step."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    size = horizon if steps_per_model <= 0 else min(steps_per_model, horizon)
    return tuple((lo, min(lo + size - 1, horizon)) for lo in range(1, horizon + 1, size))


def block_of(steps: np.ndarray, blocks: Sequence[tuple[int, int]]) -> np.ndarray:
    """Index into ``blocks`` of each step (steps beyond the last block get the last)."""
    ends = np.asarray([hi for _, hi in blocks])
    return np.minimum(np.searchsorted(ends, np.asarray(steps), side="left"), len(blocks) - 1)


def nearest_fitted(fitted: Sequence[bool]) -> list[int]:
    """For each block, the block whose model serves it: itself when it was fitted, else
    the nearest fitted block (the earlier one on a tie). A block has no rows to fit
    when no series reached that far ahead in training (history shorter than the step)."""
    have = [i for i, ok in enumerate(fitted) if ok]
    if not have:
        raise ValueError("no block has training rows")
    return [i if fitted[i] else min(have, key=lambda j: (abs(j - i), j)) for i in range(len(fitted))]


@dataclass(frozen=True)
class GBTModel:
    """A fitted model of one group.

    ``features``: model inputs in order (numeric columns of the training set, then
    ``sensor``); ``categories``: sorted sensor ids seen in training (the ``sensor``
    codes of the local engine); ``model``: LightGBM model text (``local``) or a
    ``pyspark.ml.PipelineModel`` (``spark-ml``); for ``local`` a tuple of LightGBM
    model texts, one per entry of ``blocks`` (the (first, last) steps each serves);
    a spark-ml PipelineModel holds one GBT stage per block and picks the block's
    prediction itself; ``importances``: feature -> share of
    total gain (sums to 1; all 0 for a model without any split); ``n_train`` training
    rows; ``seconds`` fit wall time; ``rmse`` in-sample RMSE in the metric's unit.
    """

    region: str
    metric: str
    engine: str
    horizon: int
    features: tuple[str, ...]
    categories: tuple[str, ...]
    model: Any
    importances: Mapping[str, float]
    n_train: int
    seconds: float
    rmse: float
    #: ``change`` (target y - value at the origin) or ``level`` (target y).
    target: str = "change"
    #: (first, last) step of each block model; empty = one model for steps 1..horizon.
    blocks: tuple[tuple[int, int], ...] = ()
    #: ``local``: the linear stage of each entry of ``model`` (empty: models without
    #: one); spark-ml models hold theirs as pipeline stages.
    linear: tuple[LinearStage, ...] = ()

    @property
    def step_blocks(self) -> tuple[tuple[int, int], ...]:
        """``blocks``, or the single block of every step for a model without blocks."""
        return self.blocks or ((1, self.horizon),)

    @property
    def numeric_features(self) -> list[str]:
        """The training-set columns the model reads (``features`` without ``sensor`` and
        the linear stage's output)."""
        return [f for f in self.features if f not in (SENSOR_FEATURE, LINEAR_FEATURE)]


@dataclass(frozen=True)
class GroupPlan:
    """What the trainer knows about a group before fitting: its rows (``n_train``), the
    numeric features with at least one value, its sensors and the engine to use."""

    region: str
    metric: str
    n_train: int
    numeric_features: tuple[str, ...]
    categories: tuple[str, ...]
    engine: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.region, self.metric)


# -- routing ----------------------------------------------------------------------------


def choose_engine(n_train: int, engine: str, spark_min_rows: int) -> str:
    """The engine for a group of ``n_train`` training rows: ``engine`` itself unless it is
    ``auto``, then ``spark-ml`` when ``n_train >= spark_min_rows`` and ``local`` below."""
    if engine not in ENGINES:
        raise ValueError(f"unknown GBT engine {engine!r}; use one of {ENGINES}")
    if engine != "auto":
        return engine
    return "spark-ml" if n_train >= spark_min_rows else "local"


def assign_buckets(sizes: Sequence[int], n_buckets: int) -> list[int]:
    """Pack groups of ``sizes`` rows into ``n_buckets`` buckets, largest first into the
    currently lightest bucket (LPT), so concurrent tasks finish at about the same time.
    Returns the bucket of each group, in input order."""
    if n_buckets < 1:
        raise ValueError("n_buckets must be >= 1")
    loads = [0] * n_buckets
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        b = min(range(n_buckets), key=lambda b: (loads[b], b))
        out[i] = b
        loads[b] += sizes[i]
    return out


def plan_groups(
    train: DataFrame, candidates: Sequence[str], engine: str, spark_min_rows: int, n_blocks: int = 1
) -> list[GroupPlan]:
    """One aggregation over the training set: rows, sensors and non-null count of every
    candidate feature per group; routes each group (:func:`choose_engine`) by the rows
    of one of its ``n_blocks`` step-block fits (``n_train / n_blocks``): the local
    engine holds one block's rows in a Python worker at a time."""
    aggs = [F.count(F.lit(1)).alias("_n"), F.array_sort(F.collect_set("sensor_id")).alias("_sensors")]
    aggs += [F.count(F.col(c)).alias(f"_nn{i}") for i, c in enumerate(candidates)]
    plans = []
    for row in train.groupBy(*GROUP).agg(*aggs).collect():
        own = own_cross_features(candidates, row["metric"])  # the group's own metric again
        features = tuple(c for i, c in enumerate(candidates) if row[f"_nn{i}"] > 0 and c not in own)
        n = int(row["_n"])
        plans.append(
            GroupPlan(row["region"], row["metric"], n, features, tuple(row["_sensors"]),
                      choose_engine(math.ceil(n / max(1, n_blocks)), engine, spark_min_rows))
        )
    return sorted(plans, key=lambda p: p.key)


# -- target --------------------------------------------------------------------------------

TARGETS = ("change", "level")


def origin_baseline() -> Column:
    """What a ``change`` model's output is added to: the series' value at the origin (0
    where it is missing, so such rows are learnt and forecast as levels)."""
    return F.coalesce(F.col("value").cast("double"), F.lit(0.0))


def _as_target(train: DataFrame, target: str) -> DataFrame:
    if target not in TARGETS:
        raise ValueError(f"unknown GBT target {target!r}; use one of {TARGETS}")
    return train.withColumn(TARGET, F.col(TARGET) - origin_baseline()) if target == "change" else train


# -- local engine: LightGBM in a grouped pandas UDF ---------------------------------------


def model_features(numeric: Sequence[str], linear_stage: bool) -> tuple[str, ...]:
    """A model's inputs in order: the numeric features, ``sensor``, and the linear
    stage's output when it has one (the order of both engines' feature vectors)."""
    return (*numeric, SENSOR_FEATURE, *([LINEAR_FEATURE] if linear_stage else []))


def _design(pdf: pd.DataFrame, numeric: Sequence[str], categories: Sequence[str],
            linear: LinearStage | None = None) -> pd.DataFrame:
    """The LightGBM input matrix: numeric features as float (null -> NaN), ``sensor``
    as its code in ``categories`` (NaN when unseen), then the ``linear`` stage's
    forecast when given."""
    X = pdf[list(numeric)].astype("float64")
    codes = {s: float(i) for i, s in enumerate(categories)}
    X[SENSOR_FEATURE] = pdf["sensor_id"].map(codes).astype("float64")
    if linear is not None:
        X[LINEAR_FEATURE] = linear_forecast(linear, pdf)
    return X


def _normalise(values: Sequence[float]) -> list[float]:
    total = float(np.sum(values))
    return [float(v) / total if total > 0 else 0.0 for v in values]


def uses_linear_stage(numeric: Sequence[str], params: GBTParams) -> bool:
    """Whether a group's models get the linear stage: when ``params.linear_stage`` asks
    for it and the group has inputs for it (a group whose only numeric features are the
    target calendar and ``step`` has none, and then trains without it in both engines)."""
    return params.linear_stage and bool(linear_inputs(numeric))


def fit_lightgbm(
    pdf: pd.DataFrame, numeric: Sequence[str], categories: Sequence[str], params: GBTParams
) -> tuple[str, list[float], float, LinearStage | None]:
    """Fit one LightGBM model on training rows (pandas; target column ``y``): one step
    block of one group in the local engine, after its linear stage when
    ``params.linear_stage``. Returns (model text, gain importance per feature in
    :func:`model_features` order, in-sample RMSE, the linear stage or None)."""
    import lightgbm as lgb

    y = pdf[TARGET].to_numpy(dtype="float64")
    linear = fit_linear_stage(pdf, numeric, y) if uses_linear_stage(numeric, params) else None
    X = _design(pdf, numeric, categories, linear)
    booster = lgb.LGBMRegressor(**params.lightgbm_kwargs()).fit(X, y, categorical_feature=[SENSOR_FEATURE]).booster_
    rmse = float(np.sqrt(np.mean((booster.predict(X) - y) ** 2)))
    gains = booster.feature_importance(importance_type="gain").astype(float).tolist()
    return booster.model_to_string(), gains, rmse, linear


def predict_lightgbm(
    boosters: Sequence[Any], pdf: pd.DataFrame, numeric: Sequence[str], categories: Sequence[str],
    blocks: Sequence[tuple[int, int]], target: str, linear: Sequence[LinearStage] = (),
) -> np.ndarray:
    """Forecasts (metric unit) for the rows of ``pdf`` (feature columns, ``sensor_id``,
    ``step``, ``value``): each row by the booster of its step's block (``boosters``
    and ``linear``, when given, aligned with ``blocks``); a ``change`` model's output
    is added to the origin value (the same baseline as :func:`origin_baseline`)."""
    which = block_of(pdf[STEP].to_numpy(), blocks)
    out = np.empty(len(pdf))
    for i in np.unique(which):
        rows = which == i
        part = pdf[rows]
        out[rows] = boosters[i].predict(_design(part, numeric, categories, linear[i] if linear else None))
    if target == "change":
        out = out + pdf["value"].astype("float64").fillna(0.0).to_numpy()
    return out


def _local_fit_fn(
    specs: Mapping[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]],
    params: GBTParams,
) -> Callable[[tuple, pd.DataFrame], pd.DataFrame]:
    """The applyInPandas function, called once per group and step block (key: bucket,
    region, metric, block); ``specs`` = group -> (numeric features, sensors)."""

    def fit(key: tuple, pdf: pd.DataFrame) -> pd.DataFrame:
        region, metric, block = key[1], key[2], int(key[3])
        numeric, categories = specs[(region, metric)]
        start = time.perf_counter()
        text, gains, rmse, linear = fit_lightgbm(pdf, numeric, categories, params)
        seconds = time.perf_counter() - start
        return pd.DataFrame(
            {
                "region": [region],
                "metric": [metric],
                "block": [block],
                "model_text": [text],
                "linear": [linear.to_json() if linear is not None else None],
                "gains": [gains],
                "n_train": [len(pdf)],
                "seconds": [seconds],
                "sse": [rmse**2 * len(pdf)],
            }
        )

    return fit


def block_index_column(blocks: Sequence[tuple[int, int]]) -> Column:
    """The index into ``blocks`` of each row's ``step`` (as :func:`block_of`)."""
    index = F.lit(len(blocks) - 1)
    for i in reversed(range(len(blocks) - 1)):
        index = F.when(F.col(STEP) <= blocks[i][1], i).otherwise(index)
    return index


def partition_keys(spark: SparkSession, n: int) -> list[int]:
    """Integers ``k_0..k_(n-1)`` that ``repartition(n, col)`` sends to partitions 0..n-1.

    Hash partitioning puts key k in ``pmod(murmur3(k), n)``, so n bucket numbers
    0..n-1 used as keys can collide (two buckets in one task, one core idle), and range
    partitioning decides its bounds from a sample, which for a handful of distinct keys
    also merged buckets when tried. Searching small integers for one per partition with
    Spark's own ``hash`` (the partitioner's function) makes the placement exact.
    """
    cap = 64 * n
    found = (
        spark.range(cap)
        .select(F.col("id").cast("int").alias("k"), F.pmod(F.hash(F.col("id").cast("int")), F.lit(n)).alias("p"))
        .groupBy("p")
        .agg(F.min("k").alias("k"))
        .collect()
    )
    keys = {int(r["p"]): int(r["k"]) for r in found}
    if len(keys) < n:  # practically impossible: 64 candidates per partition
        raise RuntimeError(f"no key for partitions {sorted(set(range(n)) - set(keys))} of {n}")
    return [keys[p] for p in range(n)]


def _train_local(
    train: DataFrame, plans: Sequence[GroupPlan], params: GBTParams, horizon: int, parallelism: int
) -> list[GBTModel]:
    """Fit every group of ``plans`` with LightGBM in one Spark job of
    ``min(parallelism, groups)`` tasks (buckets, see the module doc). Each call of the
    UDF fits one step block of one group, so a Python worker holds one block's rows
    (1/H of the group's with one model per step), not the whole group's."""
    spark = train.sparkSession
    n_buckets = max(1, min(parallelism, len(plans)))
    buckets = assign_buckets([p.n_train for p in plans], n_buckets)
    keys = partition_keys(spark, n_buckets)
    mapping = spark.createDataFrame(
        [(p.region, p.metric, keys[b]) for p, b in zip(plans, buckets)], f"region string, metric string, {_BUCKET} int"
    )
    blocks = step_blocks(horizon, params.steps_per_model)
    columns = sorted({c for p in plans for c in p.numeric_features})
    data = (
        train.select(*GROUP, "sensor_id", STEP, TARGET, *[c for c in columns if c != STEP])
        .withColumn(_BLOCK, block_index_column(blocks))
        .join(F.broadcast(mapping), list(GROUP))
        .repartition(n_buckets, _BUCKET)
    )
    specs = {p.key: (p.numeric_features, p.categories) for p in plans}
    spark.sparkContext.setJobDescription(f"gbt local: {len(plans)} groups x {len(blocks)} step blocks in {n_buckets} tasks")
    fit_fn = _local_fit_fn(specs, params)
    rows = data.groupBy(_BUCKET, *GROUP, _BLOCK).applyInPandas(fit_fn, _LOCAL_FIT_SCHEMA).collect()
    by_group: dict[tuple[str, str], dict[int, Any]] = {}
    for row in rows:
        by_group.setdefault((row["region"], row["metric"]), {})[int(row["block"])] = row
    models = []
    for plan in plans:
        fitted = by_group[plan.key]
        served = nearest_fitted([i in fitted for i in range(len(blocks))])
        n_train = sum(int(r["n_train"]) for r in fitted.values())
        with_linear = uses_linear_stage(plan.numeric_features, params)
        features = model_features(plan.numeric_features, with_linear)
        models.append(
            GBTModel(
                region=plan.region,
                metric=plan.metric,
                engine="local",
                horizon=horizon,
                features=features,
                categories=plan.categories,
                model=tuple(fitted[j]["model_text"] for j in served),
                importances=dict(zip(features, _normalise(np.sum([r["gains"] for r in fitted.values()], axis=0)))),
                n_train=n_train,
                seconds=sum(float(r["seconds"]) for r in fitted.values()),
                rmse=math.sqrt(sum(float(r["sse"]) for r in fitted.values()) / n_train),
                blocks=blocks,
                linear=tuple(LinearStage.from_json(fitted[j]["linear"]) for j in served)
                if with_linear else (),
            )
        )
    return models


# -- spark-ml engine --------------------------------------------------------------------


def spark_prep_pipeline(numeric: Sequence[str], linear_stage: bool = False) -> Any:
    """The unfitted feature stages of a group's ``pyspark.ml`` model: fill nulls with
    :data:`SPARK_MISSING`, index the sensor (alphabetical, unseen -> own index),
    assemble the feature vector; with ``linear_stage``, also the linear stage's inputs
    (:func:`citylake.forecast.linear_stage.linear_inputs`, nulls -> training mean)
    assembled into their own vector."""
    from pyspark.ml import Pipeline
    from pyspark.ml.feature import Imputer, SQLTransformer, StringIndexer, VectorAssembler

    columns = [f"coalesce(CAST(`{c}` AS DOUBLE), {SPARK_MISSING!r}) AS `{_FILLED}{c}`" for c in numeric]
    lin = linear_inputs(numeric) if linear_stage else []
    columns += [f"CAST(`{c}` AS DOUBLE) AS `{_LINEAR_INPUT}{c}`" for c in lin]
    fill = SQLTransformer(statement=f"SELECT *, {', '.join(columns)} FROM __THIS__")
    indexer = StringIndexer(
        inputCol="sensor_id", outputCol=_SENSOR_INDEX, handleInvalid="keep", stringOrderType="alphabetAsc"
    )
    assembler = VectorAssembler(inputCols=[f"{_FILLED}{c}" for c in numeric] + [_SENSOR_INDEX], outputCol=_VECTOR)
    stages = [fill, indexer, assembler]
    if lin:
        imputed = [f"{_LINEAR_INPUT}i_{c}" for c in lin]
        stages += [
            Imputer(inputCols=[f"{_LINEAR_INPUT}{c}" for c in lin], outputCols=imputed, strategy="mean"),
            VectorAssembler(inputCols=imputed, outputCol=_LINEAR_VECTOR),
        ]
    return Pipeline(stages=stages)


def spark_linear_stage(block: int) -> tuple[Any, Any]:
    """The unfitted linear stage of step block ``block`` (``LinearRegression`` on the
    linear inputs' vector, ridge ``regParam`` :data:`DEFAULT_L2`) and the assembler
    appending its forecast to the feature vector the block's trees read."""
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.regression import LinearRegression

    regression = LinearRegression(
        featuresCol=_LINEAR_VECTOR, labelCol=TARGET, predictionCol=f"{_LINEAR_PREDICTION}{block}",
        regParam=DEFAULT_L2, elasticNetParam=0.0, standardization=True, solver="normal",
    )
    assembler = VectorAssembler(inputCols=[_VECTOR, f"{_LINEAR_PREDICTION}{block}"], outputCol=f"{_BLOCK_VECTOR}{block}")
    return regression, assembler


def spark_regressor(n_sensors: int, params: GBTParams, prediction_col: str = _PREDICTION,
                    features_col: str = _VECTOR) -> Any:
    """An unfitted ``GBTRegressor`` (label ``y``) on the assembled features.
    ``maxBins`` is raised to ``n_sensors + 1`` when needed (categorical sensor incl.
    the "unseen" index)."""
    from pyspark.ml.regression import GBTRegressor

    return GBTRegressor(
        featuresCol=features_col,
        labelCol=TARGET,
        predictionCol=prediction_col,
        maxIter=params.n_trees,
        stepSize=params.learning_rate,
        maxDepth=params.max_depth,
        minInstancesPerNode=params.min_rows_per_leaf,
        subsamplingRate=params.subsample,
        featureSubsetStrategy="all" if params.feature_fraction >= 1 else repr(float(params.feature_fraction)),
        maxBins=max(params.max_bins, n_sensors + 1),
        seed=params.seed,
    )


def block_selector(blocks: Sequence[tuple[int, int]], served: Sequence[int]) -> Any:
    """The last stage of a spark-ml model: ``prediction`` = the output of the block
    model serving each row's step (``served[i]`` = the fitted block of block i)."""
    from pyspark.ml.feature import SQLTransformer

    cases = " ".join(
        f"WHEN `{STEP}` <= {hi} THEN `{_BLOCK_PREDICTION}{served[i]}`" for i, (_, hi) in enumerate(blocks[:-1])
    )
    last = f"`{_BLOCK_PREDICTION}{served[-1]}`"
    expr = f"CASE {cases} ELSE {last} END" if cases else last
    return SQLTransformer(statement=f"SELECT *, {expr} AS `{_PREDICTION}` FROM __THIS__")


def _in_pool(spark: SparkSession, pool: str, description: str) -> None:
    """Route this thread's jobs to scheduler pool ``pool`` (effective under FAIR)."""
    sc = spark.sparkContext
    sc.setLocalProperty("spark.scheduler.pool", pool)
    sc.setJobDescription(description)


def _train_spark_group(train: DataFrame, plan: GroupPlan, params: GBTParams, horizon: int, pool: str) -> GBTModel:
    """Fit one group's Spark ML model (called from a worker thread): the feature stages
    once, then per step block on that block's rows its linear stage (when
    ``params.linear_stage``) and one ``GBTRegressor``, joined into one
    ``PipelineModel`` whose last stage picks each row's block prediction."""
    from pyspark.ml import PipelineModel

    _in_pool(train.sparkSession, pool, f"gbt spark-ml {plan.region}/{plan.metric}")
    subset = train.where((F.col("region") == plan.region) & (F.col("metric") == plan.metric))
    blocks = step_blocks(horizon, params.steps_per_model)
    start = time.perf_counter()
    with_linear = uses_linear_stage(plan.numeric_features, params)
    prep = spark_prep_pipeline(plan.numeric_features, with_linear).fit(subset)
    vectors = [_VECTOR, _LINEAR_VECTOR] if with_linear else [_VECTOR]
    prepared = prep.transform(subset).select(STEP, TARGET, *vectors)
    # A Spark ML fit is hundreds of small jobs (one per tree level): on few rows, every
    # extra partition is one more task per job. One partition per SPARK_ROWS_PER_PARTITION
    # rows keeps a small group's jobs to one task, so concurrent groups overlap instead
    # of queueing for the same cores; a large group keeps up to its input's partitions.
    # (coalesce never adds partitions.)
    prepared = prepared.coalesce(max(1, math.ceil(plan.n_train / SPARK_ROWS_PER_PARTITION))).persist()
    features = model_features(plan.numeric_features, with_linear)
    try:
        counts = {r[0]: r[1] for r in prepared.groupBy(block_index_column(blocks)).count().collect()}
        served = nearest_fitted([counts.get(i, 0) > 0 for i in range(len(blocks))])
        block_stages: list[Any] = []
        weights = np.zeros(len(features))
        for i in sorted(set(served)):
            rows = prepared.where(F.col(STEP).between(*blocks[i]))
            vector = _VECTOR
            if with_linear:
                regression, assembler = spark_linear_stage(i)
                linear = regression.fit(rows)
                rows, vector = assembler.transform(linear.transform(rows)), f"{_BLOCK_VECTOR}{i}"
                block_stages += [linear, assembler]
            trees = spark_regressor(len(plan.categories), params, f"{_BLOCK_PREDICTION}{i}", vector).fit(rows)
            block_stages.append(trees)
            weights += counts[i] * trees.featureImportances.toArray()
    finally:
        prepared.unpersist()
    fitted = PipelineModel(stages=[*prep.stages, *block_stages, block_selector(blocks, served)])
    seconds = time.perf_counter() - start
    mse = fitted.transform(subset).select(F.avg((F.col(_PREDICTION) - F.col(TARGET)) ** 2)).first()[0]
    importances = _normalise(weights.tolist())
    return GBTModel(
        region=plan.region,
        metric=plan.metric,
        engine="spark-ml",
        horizon=horizon,
        features=features,
        categories=plan.categories,
        model=fitted,
        importances=dict(zip(features, importances)),
        n_train=plan.n_train,
        seconds=seconds,
        rmse=math.sqrt(mse) if mse is not None else float("nan"),
        blocks=blocks,
    )


def _warn_without_fair(spark: SparkSession, n_spark: int, parallelism: int) -> None:
    mode = spark.sparkContext.getConf().get("spark.scheduler.mode", "FIFO")
    if n_spark > 1 and parallelism > 1 and mode.upper() != "FAIR":
        log.warning(
            "spark.scheduler.mode is %s: concurrent spark-ml groups queue behind each other; "
            "build the session with spark.scheduler.mode=FAIR",
            mode,
        )


# -- public API -------------------------------------------------------------------------


def train_gbt(
    gold: DataFrame,
    horizon: int,
    engine: str = "auto",
    params: GBTParams | None = None,
    spark_min_rows: int = DEFAULT_SPARK_MIN_ROWS,
    parallelism: int = 2,
    *,
    intervals: Mapping[str, int] | None = None,
    cross_metrics: Sequence[str] | None = None,
    sample_fraction: float = 1.0,
    metrics: Sequence[str] | None = None,
    target: str = "change",
) -> list[GBTModel]:
    """Train one GBT model per (region, metric) on a gold_features-shaped frame.

    ``horizon``: H, models forecast steps 1..H (grid steps of each metric).
    ``engine``: ``auto`` | ``local`` | ``spark-ml`` (module doc). ``spark_min_rows``:
    ``auto`` threshold in training rows per group (config ``forecast.gbt_spark_min_rows``).
    ``parallelism``: groups trained at once (tasks of the local job; threads for
    spark-ml; 1 = one after another). ``intervals`` / ``cross_metrics`` /
    ``sample_fraction``: see :func:`citylake.forecast.gbt_data.training_set`.
    ``metrics``: model only these metrics (default: all in ``gold``); ``gold`` should
    still hold the others, which feed the ``x_<metric>`` features.
    ``target``: ``change`` (default) or ``level`` (module doc).
    Rows without a region are not used. Returns the models sorted by (region, metric).
    """
    params = params or GBTParams()
    if engine not in ENGINES:
        raise ValueError(f"unknown GBT engine {engine!r}; use one of {ENGINES}")
    cross = cross_metric_names() if cross_metrics is None else list(cross_metrics)
    train = training_set(gold, horizon, intervals, cross, sample_fraction, params.seed)
    if metrics:
        train = train.where(F.col("metric").isin(list(metrics)))
    train = _as_target(train, target).persist()
    try:
        n_blocks = len(step_blocks(horizon, params.steps_per_model))
        plans = plan_groups(train, numeric_feature_candidates(gold.columns, cross), engine, spark_min_rows, n_blocks)
        local = [p for p in plans if p.engine == "local"]
        spark_ml = sorted((p for p in plans if p.engine == "spark-ml"), key=lambda p: -p.n_train)
        _warn_without_fair(gold.sparkSession, len(spark_ml) + bool(local), parallelism)
        with ThreadPoolExecutor(max_workers=max(1, parallelism), thread_name_prefix=POOL_PREFIX) as pool:
            futures = []
            if local:
                futures.append(pool.submit(_train_local, train, local, params, horizon, parallelism))
            for i, plan in enumerate(spark_ml):
                pool_name = f"{POOL_PREFIX}-{i % max(1, parallelism)}"
                futures.append(pool.submit(_train_spark_group, train, plan, params, horizon, pool_name))
            results = [f.result() for f in futures]
    finally:
        train.unpersist()
    models = [replace(m, target=target) for r in results for m in (r if isinstance(r, list) else [r])]
    return sorted(models, key=lambda m: (m.region, m.metric))


def _local_predict_fn(
    specs: Any,
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The mapInPandas function; ``specs`` = broadcast of group -> (model texts, step
    blocks, numeric features, sensors, target, linear stages)."""

    def predict(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import lightgbm as lgb

        boosters: dict[tuple[str, str], list[Any]] = {}  # parse each model once per task
        for pdf in batches:
            for key, part in pdf.groupby(list(GROUP), sort=False):
                spec = specs.value.get(key)
                if spec is None:
                    continue
                texts, blocks, numeric, categories, target, linear = spec
                if key not in boosters:
                    boosters[key] = [lgb.Booster(model_str=t) for t in texts]
                y_pred = predict_lightgbm(boosters[key], part, numeric, categories, blocks, target, linear)
                out = part[["sensor_id", "metric", "region", ORIGIN_TS, TARGET_TS, STEP]].assign(y_pred=y_pred)
                yield out.assign(model=MODEL_NAME)[list(PREDICTION_COLUMNS)]

    return predict


def _predict_local(models: Sequence[GBTModel], rows: DataFrame) -> DataFrame:
    spark = rows.sparkSession
    specs = {
        (m.region, m.metric): (tuple(m.model), m.step_blocks, m.numeric_features, m.categories, m.target, m.linear)
        for m in models
    }
    broadcast = spark.sparkContext.broadcast(specs)
    in_models = reduce(
        lambda a, b: a | b, [(F.col("region") == r) & (F.col("metric") == m) for r, m in specs]
    )
    return rows.where(in_models).mapInPandas(_local_predict_fn(broadcast), _PREDICTION_SCHEMA)


def _predict_spark(model: GBTModel, rows: DataFrame) -> DataFrame:
    subset = rows.where((F.col("region") == model.region) & (F.col("metric") == model.metric))
    out = model.model.transform(subset)
    y_pred = F.col(_PREDICTION).cast("double")
    if model.target == "change":
        y_pred = y_pred + origin_baseline()
    return out.select(
        F.lit(MODEL_NAME).alias("model"),
        "sensor_id",
        "metric",
        "region",
        ORIGIN_TS,
        TARGET_TS,
        F.col(STEP).cast("int").alias(STEP),
        y_pred.alias("y_pred"),
    )


def predict_gbt(
    models: Sequence[GBTModel],
    gold_at_origins: DataFrame,
    horizon: int,
    *,
    intervals: Mapping[str, int] | None = None,
    cross_metrics: Sequence[str] | None = None,
) -> DataFrame:
    """Point forecasts for steps 1..``horizon`` from every origin row of ``gold_at_origins``
    (gold_features-shaped, one row per series and origin; include a station's other
    metrics at the origin for the ``x_*`` features, see
    :func:`citylake.forecast.gbt_data.origin_rows`).

    Columns: model (``'gbt'``), sensor_id, metric, region, origin_ts, target_ts, step,
    y_pred (metric unit); the same for both engines. Rows of groups without a model are
    left out. ``horizon`` must not exceed the models' training horizon.
    """
    if not models:
        raise ValueError("no models to predict with")
    too_far = [f"{m.region}/{m.metric} (H={m.horizon})" for m in models if horizon > m.horizon]
    if too_far:
        raise ValueError(f"horizon {horizon} beyond the training horizon of {too_far}")
    cross = cross_metric_names() if cross_metrics is None else list(cross_metrics)
    rows = origin_rows(gold_at_origins, horizon, intervals, cross)
    parts = [_predict_spark(m, rows) for m in models if m.engine == "spark-ml"]
    local = [m for m in models if m.engine == "local"]
    if local:
        parts.append(_predict_local(local, rows))
    return reduce(DataFrame.unionByName, parts)


def feature_importances_df(spark: SparkSession, models: Sequence[GBTModel]) -> DataFrame:
    """The ``gold_feature_importance`` rows of ``models``: region, metric, engine, feature,
    importance (share of total gain, sums to 1 per model), rank (1 = most important,
    ties by feature name)."""
    rows = []
    for m in models:
        ordered = sorted(m.importances.items(), key=lambda kv: (-kv[1], kv[0]))
        rows += [(m.region, m.metric, m.engine, f, float(v), r) for r, (f, v) in enumerate(ordered, start=1)]
    return spark.createDataFrame(rows, GOLD_FEATURE_IMPORTANCE.struct())


# -- MLflow -----------------------------------------------------------------------------


def _mlflow_metadata(model: GBTModel) -> dict[str, Any]:
    """What a loaded model needs besides the fitted object (plain types: YAML in MLmodel)."""
    return {
        "citylake_gbt": {
            "region": model.region,
            "metric": model.metric,
            "engine": model.engine,
            "horizon": int(model.horizon),
            "features": list(model.features),
            "categories": list(model.categories),
            "importances": {k: float(v) for k, v in model.importances.items()},
            "n_train": int(model.n_train),
            "seconds": float(model.seconds),
            "rmse": float(model.rmse),
            "target": model.target,
            "blocks": [list(b) for b in model.step_blocks],
        }
    }


def log_model_mlflow(model: GBTModel, artifact_path: str, dfs_tmpdir: str | None = None) -> str:
    """Log ``model`` to the active MLflow run (the caller manages runs); returns its URI.

    ``local``: a ``pyfunc`` model (:class:`citylake.forecast.served.LightGBMBlocks`)
    holding the LightGBM text of every step block (one Booster per block cannot be one
    ``mlflow.lightgbm`` flavour); ``spark-ml``: ``mlflow.spark`` flavour of the
    PipelineModel (its block stages included). ``dfs_tmpdir`` (spark-ml only): where Spark writes the
    model before MLflow copies it into the artifact store; default ``MLFLOW_DFS_TMP`` or
    ``/tmp/mlflow``, which works on ``local[*]``; on a cluster use a folder every
    executor and the driver can reach (``hdfs:///tmp/mlflow``, ``s3a://.../tmp``).
    The group, features, sensor categories, importances and training figures go into the
    MLmodel ``metadata`` so :func:`load_model_mlflow` rebuilds the whole :class:`GBTModel`.
    Pip requirements are given explicitly: MLflow's inference would start a subprocess
    (for Spark, a second Spark session) per logged model.
    """
    import mlflow

    metadata = _mlflow_metadata(model)
    if model.engine == "local":
        import lightgbm as lgb
        import mlflow.pyfunc

        from citylake.forecast.served import LightGBMBlocks

        info = mlflow.pyfunc.log_model(
            name=artifact_path,
            python_model=LightGBMBlocks(
                tuple(model.model), model.step_blocks, model.numeric_features, model.categories, model.target,
                tuple(s.to_json() for s in model.linear),
            ),
            pip_requirements=[f"lightgbm=={lgb.__version__}", "pandas", "numpy", f"mlflow=={mlflow.__version__}"],
            metadata=metadata,
        )
    elif model.engine == "spark-ml":
        import mlflow.spark
        import pyspark

        info = mlflow.spark.log_model(
            model.model,
            artifact_path,
            dfs_tmpdir=dfs_tmpdir,
            pip_requirements=[f"pyspark=={pyspark.__version__}", f"mlflow=={mlflow.__version__}"],
            metadata=metadata,
        )
    else:
        raise ValueError(f"cannot log a model of engine {model.engine!r}")
    return info.model_uri


def load_model_mlflow(uri: str, engine: str, dfs_tmpdir: str | None = None) -> GBTModel:
    """Load a model logged by :func:`log_model_mlflow` (``uri`` e.g. ``models:/<id>`` or
    ``runs:/<run>/<path>``) as a :class:`GBTModel` ready for :func:`predict_gbt`.
    ``engine`` must be the engine it was trained with; spark-ml needs the active
    SparkSession (``dfs_tmpdir`` as for logging)."""
    import mlflow

    info = mlflow.models.get_model_info(uri)
    meta = (info.metadata or {}).get("citylake_gbt")
    if meta is None:
        raise ValueError(f"{uri} was not logged by citylake's log_model_mlflow (no citylake_gbt metadata)")
    if meta["engine"] != engine:
        raise ValueError(f"{uri} is a {meta['engine']} model, not {engine}")
    if engine == "local" and "lightgbm" in info.flavors:  # logged before step blocks: one Booster
        import mlflow.lightgbm

        fitted: Any = (mlflow.lightgbm.load_model(uri).model_to_string(),)
        linear: tuple[LinearStage, ...] = ()
    elif engine == "local":
        import mlflow.pyfunc

        served = mlflow.pyfunc.load_model(uri).unwrap_python_model()
        fitted = tuple(served.texts)
        linear = tuple(LinearStage.from_json(t) for t in getattr(served, "linear", ()))
    else:
        import mlflow.spark

        fitted = mlflow.spark.load_model(uri, dfs_tmpdir=dfs_tmpdir)
        linear = ()
    return GBTModel(
        region=meta["region"],
        metric=meta["metric"],
        engine=engine,
        horizon=int(meta["horizon"]),
        features=tuple(meta["features"]),
        categories=tuple(meta["categories"]),
        model=fitted,
        importances=dict(meta["importances"]),
        n_train=int(meta["n_train"]),
        seconds=float(meta["seconds"]),
        rmse=float(meta["rmse"]),
        target=meta.get("target", "level"),  # models logged before targets were recorded
        blocks=tuple(tuple(b) for b in meta.get("blocks", ())),
        linear=linear,
    )
