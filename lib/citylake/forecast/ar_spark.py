"""AR models for every series of a silver / gold table, fitted in Spark with numpy.

A series is one ``(sensor_id, metric)`` on its regular grid; the model and its
conventions (gaps, filled points, sigma, AIC/BIC) are those of :mod:`citylake.forecast.ar`.

Design: series lists by a Spark aggregate, then an Arrow UDF per batch of series
-------------------------------------------------------------------------------
1. Each row gets its grid step ``floor(epoch / interval_s)``. An object hash aggregate
   (:func:`series_lists`) collects every series' steps and values into two lists.
   Partial aggregation collects them *before* the shuffle, so the shuffle carries one
   row per series and input task, as the floor's count-and-sum does, not one per reading.
2. ``mapInArrow`` hands batches of whole series to Python. Arrow list columns arrive as
   one flat buffer of steps and one of values plus offsets, so each batch becomes a
   ``(n_series, T)`` NaN matrix by grid position (right-aligned on each series' newest
   step, absent steps NaN, shorter series left-padded) in a few numpy operations, and
   :func:`ar.fit_many` / :func:`ar.select_order` run once per group of similar length.
   Python work is per batch, never per row or per series.

Why this shape (figures in ``bench/RESULTS_AR.md``):

* ``spark.sql.objectHashAggregate.sortBased.fallbackThreshold`` is raised in
  ``conf/base.yaml``: at Spark's default (128 series per task) the aggregate falls back to
  sorting every row, and the fit took as long as the earlier design (blocks of 32 steps
  by a native aggregate, then a grouped UDF over buckets of series): 9.4 s vs 9.6 s, with
  the threshold raised 5.9 s, the floor 3.8 s (5,000 x 2,000). Memory: a task holds its
  collected values on the JVM heap (tens of bytes each), at most about its input rows.
* Arrow, not pandas: strings stay Arrow arrays, no Python object is made per value, and
  the coefficient arrays are built as one ``ListArray``.
* Not the other option of the issue - lag columns from window functions and the
  normal-equation sums (for AR(12): 105 X'X/X'y/y'y products) as Spark aggregates,
  solved afterwards: the windows need a shuffle *and* a sort of every row, then ~105
  product columns per row; order selection would need one set of sums per candidate.
  Measured 4x the time (``bench/ar_bench.py --window-sums``), and the same sums from
  block rows in generated code 2x (session 7).

Output: ``gold_ar_coefficients`` (:data:`GOLD_AR_COEFFICIENTS`; the entry for
``schemas/tables.yaml`` is :data:`TABLES_YAML_ENTRY`), its long form
(:func:`coefficients_long`), and recursive forecasts with normal intervals
(:func:`forecast_spark`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from citylake.catalogue import ColumnSpec, TableSpec, load_catalogue
from citylake.forecast import ar

#: AR order when none is configured (grid steps): one hour of 5-minute traffic data.
DEFAULT_ORDER = 12
#: Groups (buckets of forecast origins) of the forecast's grouped UDF. Each bucket is one
#: Python call holding its histories in memory, so more buckets = smaller calls.
DEFAULT_BUCKETS = 64
#: Cells (series x steps) of one value matrix in the fit UDF; a batch's series are
#: fitted in groups of similar length so a few very long series cannot blow up its
#: memory (64 MiB).
MAX_MATRIX_CELLS = 8 * 2**20
#: Default central prediction interval level.
DEFAULT_LEVEL = 0.9

SERIES = ("sensor_id", "metric")

GOLD_AR_COEFFICIENTS = TableSpec(
    name="gold_ar_coefficients",
    path="gold/ar_coefficients",
    layer="gold",
    description="One AR(p) model per series and fit run: OLS with intercept on the silver grid.",
    partition_by=(),
    keys=("sensor_id", "metric", "fitted_ts"),
    unique_keys="critical",
    time_column="fitted_ts",
    columns=(
        ColumnSpec("sensor_id", "string", False),
        ColumnSpec("metric", "string", False),
        ColumnSpec("region", "string", True, "region of the series' newest data"),
        ColumnSpec("p", "int", False, "AR order, grid steps"),
        ColumnSpec("intercept", "double", True, "a, metric unit; null when fit_ok is false"),
        ColumnSpec("coefs", "array<double>", True, "b_1..b_p, lag 1 first; null when fit_ok is false"),
        ColumnSpec("sigma", "double", True, "innovation s.d. sqrt(SSR/(n_train-p-1)), metric unit"),
        ColumnSpec("n_train", "bigint", False, "lag-design rows used (target and p lags all present)"),
        ColumnSpec("train_start", "timestamp", True, "grid step of the first target used"),
        ColumnSpec("train_end", "timestamp", True, "grid step of the last target used"),
        ColumnSpec("criterion", "string", False, "fixed | aic | bic: how p was chosen"),
        ColumnSpec("aic", "double", True, "-2 llf + 2 (p+1), llf Gaussian at SSR/n_train"),
        ColumnSpec("bic", "double", True, "-2 llf + ln(n_train) (p+1)"),
        ColumnSpec("fit_ok", "boolean", False, "false: too few rows or singular design"),
        ColumnSpec("interval_s", "bigint", False, "grid step of the series, seconds"),
        ColumnSpec("fitted_ts", "timestamp", False, "when the fit ran (UTC)"),
    ),
)

#: The same table for ``schemas/tables.yaml`` (for the integrator to paste).
TABLES_YAML_ENTRY = """\
  gold_ar_coefficients:
    path: gold/ar_coefficients
    layer: gold
    description: One AR(p) model per series and fit run, OLS with intercept on the silver grid.
    partition_by: []
    keys: [sensor_id, metric, fitted_ts]
    unique_keys: critical
    time_column: fitted_ts
    columns:
      - {name: sensor_id, type: string, nullable: false}
      - {name: metric, type: string, nullable: false}
      - {name: region, type: string, description: region of the series' newest data}
      - {name: p, type: int, nullable: false, description: AR order in grid steps}
      - {name: intercept, type: double, description: "a, metric unit; null when fit_ok is false"}
      - {name: coefs, type: "array<double>", description: "b_1..b_p, lag 1 first; null when fit_ok is false"}
      - {name: sigma, type: double, description: "innovation s.d. sqrt(SSR/(n_train-p-1)), metric unit"}
      - {name: n_train, type: bigint, nullable: false, description: lag-design rows used}
      - {name: train_start, type: timestamp, description: grid step of the first target used}
      - {name: train_end, type: timestamp, description: grid step of the last target used}
      - {name: criterion, type: string, nullable: false, description: "fixed | aic | bic"}
      - {name: aic, type: double, description: "-2 llf + 2 (p+1)"}
      - {name: bic, type: double, description: "-2 llf + ln(n_train) (p+1)"}
      - {name: fit_ok, type: boolean, nullable: false, description: false when too short or singular}
      - {name: interval_s, type: bigint, nullable: false, description: grid step, seconds}
      - {name: fitted_ts, type: timestamp, nullable: false}
"""

FORECAST_COLUMNS = (
    "sensor_id", "metric", "region", "origin_ts", "target_ts", "step", "y_pred", "y_lower", "y_upper",
)

# Internal column names.
_SID, _BUCKET, _STEP, _Y, _INTERVAL = "_sid", "_bucket", "_step", "_y", "_interval_s"
_STEPS, _VALUES = "_steps", "_values"

_FIT_SCHEMA = T.StructType(
    [
        T.StructField("sensor_id", T.StringType()),
        T.StructField("metric", T.StringType()),
        T.StructField("region", T.StringType()),
        T.StructField("p", T.IntegerType()),
        T.StructField("intercept", T.DoubleType()),
        T.StructField("coefs", T.ArrayType(T.DoubleType())),
        T.StructField("sigma", T.DoubleType()),
        T.StructField("n_train", T.LongType()),
        T.StructField("_first_step", T.LongType()),
        T.StructField("_last_step", T.LongType()),
        T.StructField("aic", T.DoubleType()),
        T.StructField("bic", T.DoubleType()),
        T.StructField("fit_ok", T.BooleanType()),
        T.StructField("interval_s", T.LongType()),
    ]
)

_FORECAST_SCHEMA = T.StructType(
    [
        T.StructField("sensor_id", T.StringType()),
        T.StructField("metric", T.StringType()),
        T.StructField("region", T.StringType()),
        T.StructField("_origin_step", T.LongType()),
        T.StructField("interval_s", T.LongType()),
        T.StructField("step", T.IntegerType()),
        T.StructField("y_pred", T.DoubleType()),
        T.StructField("y_lower", T.DoubleType()),
        T.StructField("y_upper", T.DoubleType()),
    ]
)


@dataclass(frozen=True)
class FitSpec:
    """How each series' order is chosen: fixed ``p``, or from ``candidates`` by
    ``criterion`` when candidates are given. ``max_steps`` (grid steps) keeps only each
    series' newest steps for training; None = all."""

    p: int = DEFAULT_ORDER
    candidates: tuple[int, ...] | None = None
    criterion: str = "aic"
    max_steps: int | None = None

    @property
    def label(self) -> str:
        return self.criterion if self.candidates else "fixed"


# -- input preparation ------------------------------------------------------------------


def _interval_column(intervals: Mapping[str, int]) -> Column:
    """The grid interval (seconds, long) of each row's metric; null for other metrics.

    One ``metric IN (...)`` test per distinct interval (3 for the catalogue) instead of a
    map lookup, which scans all metric names for every row.
    """
    by_value: dict[int, list[str]] = {}
    for metric, seconds in intervals.items():
        by_value.setdefault(int(seconds), []).append(metric)
    column: Column | None = None
    for seconds, metrics in sorted(by_value.items()):
        test, value = F.col("metric").isin(sorted(metrics)), F.lit(seconds).cast("long")
        column = F.when(test, value) if column is None else column.when(test, value)
    return column if column is not None else F.lit(None).cast("long")


def _catalogue_intervals() -> dict[str, int]:
    return {name: m.interval_s for name, m in load_catalogue().metrics.items()}


def prepare_series(
    df: DataFrame,
    intervals: Mapping[str, int] | None = None,
    use_filled: bool = True,
) -> DataFrame:
    """Project a silver or gold table to what the fit needs, one row per grid step.

    Columns out: sensor_id, metric, region, ``_interval_s`` (seconds), ``_step``
    (``floor(epoch seconds / interval_s)``), ``_y`` (the value, null when unusable).
    The value is ``value_clean`` (silver) or ``value`` (gold_features); rows with
    ``is_gap`` are null, and so are ``is_filled`` rows when ``use_filled`` is false.
    ``intervals`` = ``{metric: seconds}`` (default: the metric catalogue); rows of a
    metric without an interval are dropped. Timestamps are expected after 1970 (the
    step uses integer division).
    """
    intervals = intervals or _catalogue_intervals()
    value_col = "value_clean" if "value_clean" in df.columns else "value"
    y = F.col(value_col).cast("double")
    if "is_gap" in df.columns:
        y = F.when(~F.coalesce(F.col("is_gap"), F.lit(False)), y)
    if not use_filled and "is_filled" in df.columns:
        y = F.when(~F.coalesce(F.col("is_filled"), F.lit(False)), y)
    region = F.col("region") if "region" in df.columns else F.lit(None).cast("string")
    interval = _interval_column(intervals)
    return (
        df.select(
            "sensor_id",
            "metric",
            region.alias("region"),
            interval.alias(_INTERVAL),
            F.col("ts"),
            F.when(F.isnan(y), None).otherwise(y).alias(_Y),
        )
        .where(F.col(_INTERVAL).isNotNull())
        .withColumn(_STEP, F.expr(f"unix_seconds(ts) div {_INTERVAL}"))
        .drop("ts")
    )


# -- stage 1 (Spark aggregate): rows -> one row per series --------------------------------


def series_lists(prepared: DataFrame) -> DataFrame:
    """One row per series: its grid steps and values as two lists (same order, not
    sorted), the region of its newest step, and its interval.

    Columns out: sensor_id, metric, ``_interval_s``, ``_steps`` (array<long>), ``_values``
    (array<double>), region. Rows without a usable value are left out, so a series with
    none gets no row. ``collect_list`` is an object hash aggregate: each task collects
    its rows per series before the shuffle, so one row per series and task crosses it.
    It stays hash-based only up to
    ``spark.sql.objectHashAggregate.sortBased.fallbackThreshold`` series per task (Spark's
    default 128 is set higher in ``conf/base.yaml``; past it Spark sorts, which is
    memory-safe but measured ~1.6x slower).
    """
    return (
        prepared.where(F.col(_Y).isNotNull())
        .groupBy("sensor_id", "metric", _INTERVAL)
        .agg(
            F.collect_list(_STEP).alias(_STEPS),
            F.collect_list(_Y).alias(_VALUES),
            F.max_by("region", _STEP).alias("region"),
        )
    )


# -- stage 2 (per Arrow batch): lists -> matrices -> numpy fit ---------------------------


@dataclass(frozen=True)
class _Lists:
    """One Arrow batch of series lists as flat numpy arrays (no Python loop per value)."""

    steps: np.ndarray  # (V,) grid step of each value
    values: np.ndarray  # (V,) the values
    owner: np.ndarray  # (V,) series index (row of the batch) of each value
    first: np.ndarray  # (S,) oldest step of each series
    last: np.ndarray  # (S,) newest step of each series


def _lists_of(batch: pa.RecordBatch) -> _Lists:
    steps = batch.column(batch.schema.get_field_index(_STEPS))
    values = batch.column(batch.schema.get_field_index(_VALUES))
    offsets = steps.offsets.to_numpy()
    flat_steps = steps.values.to_numpy().astype(np.int64)
    flat_values = values.values.to_numpy(zero_copy_only=False).astype(np.float64)
    starts = offsets[:-1]
    # series_lists() only emits series with at least one value, so no list is empty.
    return _Lists(
        steps=flat_steps,
        values=flat_values,
        owner=np.repeat(np.arange(len(starts)), np.diff(offsets)),
        first=np.minimum.reduceat(flat_steps, starts) if len(starts) else flat_steps[:0],
        last=np.maximum.reduceat(flat_steps, starts) if len(starts) else flat_steps[:0],
    )


def _series_groups(spans: np.ndarray, max_cells: int) -> list[np.ndarray]:
    """Split series (by index) into groups of similar span whose matrix stays under
    ``max_cells`` cells; sorting by span keeps little NaN padding per group."""
    order = np.argsort(spans, kind="stable")
    groups: list[np.ndarray] = []
    start = 0
    while start < len(order):
        # Spans ascend, so a group's matrix width is the span of its last member.
        fits = np.flatnonzero(np.arange(1, len(order) - start + 1) * spans[order[start:]] <= max_cells)
        end = start + (int(fits[-1]) + 1 if fits.size else 1)
        groups.append(order[start:end])
        start = end
    return groups


def _matrix(lists: _Lists, series: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(len(series), width) values of ``series`` by grid position, right-aligned on each
    series' newest step (absent steps NaN, shorter series left-padded), and the grid
    step of column 0 of each row. A step given twice keeps the larger value."""
    width = int((lists.last[series] - lists.first[series]).max()) + 1
    row_of = np.full(len(lists.last), -1)
    row_of[series] = np.arange(len(series))
    picked = np.flatnonzero(row_of[lists.owner] >= 0) if len(series) < len(lists.last) else slice(None)
    owner, values = lists.owner[picked], lists.values[picked]
    rows, cols = row_of[owner], width - 1 - (lists.last[owner] - lists.steps[picked])
    matrix = np.full((len(series), width), np.nan)
    matrix[rows, cols] = values
    if np.count_nonzero(np.isfinite(matrix)) < len(values):
        # Some cell was written twice and fancy assignment keeps an arbitrary one;
        # fmax.at is slow but deterministic, and silver has no duplicates to pay it.
        matrix[:] = np.nan
        np.fmax.at(matrix, (rows, cols), values)
    return matrix, lists.last[series] - width + 1


def _keep_newest(matrix: np.ndarray, max_steps: int) -> None:
    """Blank (in place) every value more than ``max_steps - 1`` steps before each row's
    newest value."""
    finite = np.isfinite(matrix)
    newest = matrix.shape[1] - 1 - finite[:, ::-1].argmax(axis=1)
    matrix[np.arange(matrix.shape[1])[None, :] < (newest - max_steps + 1)[:, None]] = np.nan


def _fit_lists(lists: _Lists, spec: FitSpec) -> tuple[ar.ARFit, np.ndarray]:
    """Fit every series of the batch; returns the fit and, per series, the grid step of
    its matrix's column 0 (so a target's step is ``base + first_target``)."""
    n = len(lists.last)
    parts: list[tuple[np.ndarray, ar.ARFit]] = []
    base = np.zeros(n, np.int64)
    for series in _series_groups(lists.last - lists.first + 1, MAX_MATRIX_CELLS):
        matrix, base[series] = _matrix(lists, series)
        if spec.max_steps:
            _keep_newest(matrix, spec.max_steps)
        if spec.candidates:
            _, fit = ar.select_order(matrix, spec.candidates, spec.criterion)
        else:
            fit = ar.fit_many(matrix, spec.p)
        parts.append((series, fit))
    width = max(spec.candidates) if spec.candidates else spec.p
    return ar.combine_fits(parts, n, width), base


def _nullable(values: np.ndarray, ok: np.ndarray) -> pa.Array:
    return pa.array(values, type=pa.float64(), mask=~ok | ~np.isfinite(values))


def _coef_lists(fit: ar.ARFit) -> pa.Array:
    """list<double> of each series' b_1..b_p (null when not ok), from one flat buffer."""
    lengths = np.where(fit.ok, fit.order, 0)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    keep = np.arange(fit.coefs.shape[1])[None, :] < lengths[:, None]
    flat = pa.array(fit.coefs[keep], type=pa.float64())
    return pa.ListArray.from_arrays(pa.array(offsets), flat, mask=pa.array(~fit.ok))


def _fit_batch(batch: pa.RecordBatch, spec: FitSpec) -> pa.RecordBatch:
    """The UDF body: one batch of series lists in, one row per series out."""
    fit, base = _fit_lists(_lists_of(batch), spec)
    has = fit.first_target >= 0
    column = batch.column
    index = batch.schema.get_field_index
    return pa.RecordBatch.from_pydict(
        {
            "sensor_id": column(index("sensor_id")),
            "metric": column(index("metric")),
            "region": column(index("region")),
            "p": pa.array(fit.order.astype(np.int32)),
            "intercept": _nullable(fit.intercept, fit.ok),
            "coefs": _coef_lists(fit),
            "sigma": _nullable(fit.sigma, fit.ok),
            "n_train": pa.array(fit.nobs.astype(np.int64)),
            "_first_step": pa.array(base + fit.first_target, mask=~has),
            "_last_step": pa.array(base + fit.last_target, mask=~has),
            "aic": _nullable(fit.aic, fit.ok),
            "bic": _nullable(fit.bic, fit.ok),
            "fit_ok": pa.array(fit.ok),
            "interval_s": column(index(_INTERVAL)).cast(pa.int64()),
        }
    )


def _fit_udf(spec: FitSpec) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def fit_udf(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            if batch.num_rows:
                yield _fit_batch(batch, spec)

    return fit_udf


# -- public Spark API --------------------------------------------------------------------


def fit_ar(
    df: DataFrame,
    p: int = DEFAULT_ORDER,
    candidates: Sequence[int] | None = None,
    criterion: str = "aic",
    intervals: Mapping[str, int] | None = None,
    use_filled: bool = True,
    max_steps: int | None = None,
    fitted_ts: Column | None = None,
) -> DataFrame:
    """AR models of every series of a silver (``value_clean``) or gold (``value``) table.

    ``df`` needs sensor_id, metric, ts and the value column; region, is_gap, is_filled
    are used when present. One row per series and grid step is expected (a duplicate
    keeps the larger value); a series without any usable value gets no row.

    Order: fixed ``p`` (grid steps), or chosen per series from ``candidates`` by
    ``criterion`` ("aic" | "bic") on a common sample (see :mod:`citylake.forecast.ar`).
    ``intervals``: ``{metric: grid seconds}``, default the catalogue. ``use_filled``:
    False turns ``is_filled`` points into gaps. ``max_steps`` trains on each series'
    newest steps only. ``fitted_ts`` defaults to ``current_timestamp()``.

    Returns the columns of :data:`GOLD_AR_COEFFICIENTS` in order, one row per series
    (lazy: nothing runs until the caller writes or collects it).
    """
    if criterion not in ("aic", "bic"):
        raise ValueError(f"criterion must be 'aic' or 'bic', got {criterion!r}")
    if p < 0 or (candidates is not None and (not candidates or min(candidates) < 0)):
        raise ValueError(f"orders must be >= 0 (p={p}, candidates={candidates})")
    spec = FitSpec(p=p, candidates=tuple(sorted(set(candidates))) if candidates else None,
                   criterion=criterion, max_steps=max_steps)
    lists = series_lists(prepare_series(df, intervals, use_filled))
    fitted = lists.mapInArrow(_fit_udf(spec), _FIT_SCHEMA)
    interval = F.col("interval_s")
    return fitted.select(
        "sensor_id", "metric", "region", "p", "intercept", "coefs", "sigma", "n_train",
        F.timestamp_seconds(F.col("_first_step") * interval).alias("train_start"),
        F.timestamp_seconds(F.col("_last_step") * interval).alias("train_end"),
        F.lit(spec.label).alias("criterion"),
        "aic", "bic", "fit_ok", "interval_s",
        (fitted_ts if fitted_ts is not None else F.current_timestamp()).alias("fitted_ts"),
    )


def coefficients_long(coeffs: DataFrame) -> DataFrame:
    """One row per series and lag: sensor_id, metric, region, lag (1 = previous step),
    coef (dimensionless). Series whose fit failed have no rows."""
    return coeffs.select(
        "sensor_id", "metric", "region", F.posexplode("coefs").alias("_pos", "coef")
    ).select("sensor_id", "metric", "region", (F.col("_pos") + 1).alias("lag"), "coef")


def _latest_models(coeffs: DataFrame) -> DataFrame:
    """The newest fit of each series (the table keeps one row per fit run); without a
    ``fitted_ts`` column (e.g. rows stored with a served model) one row per series."""
    cols = ["sensor_id", "metric", "region", "p", "intercept", "coefs", "sigma", "interval_s"]
    if "fitted_ts" not in coeffs.columns:
        return coeffs.dropDuplicates(list(SERIES)).select(*cols)
    newest = Window.partitionBy(*SERIES).orderBy(F.col("fitted_ts").desc())
    return coeffs.withColumn("_rank", F.row_number().over(newest)).where(F.col("_rank") == 1).select(*cols)


def _coef_matrix(lists: pa.ListArray, width: int) -> np.ndarray:
    """(n, width) matrix of list<double> rows, zero-padded; null lists give zeros."""
    n = len(lists)
    lengths = lists.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = lists.flatten().to_numpy(zero_copy_only=False)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(len(flat)) - np.repeat(starts, lengths)
    coefs = np.zeros((n, width))
    coefs[rows, cols] = flat
    return coefs


def _forecast_table(table: pa.Table, horizon: int, level: float) -> pa.Table:
    """Grouped UDF body: the p history steps of each (series, origin) unit, with the
    unit's model columns -> ``horizon`` forecast rows per unit."""
    units = np.column_stack([table.column(_SID).to_numpy(), table.column("_origin").to_numpy()])
    _, first_row, inverse = np.unique(units, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    n = len(first_row)
    pick = pa.array(first_row)

    def per_series(name: str) -> np.ndarray:
        return table.column(name).take(pick).to_numpy(zero_copy_only=False)

    order = per_series("p").astype(np.int64)
    width = max(1, int(order.max())) if n else 1
    lists = table.column("coefs").take(pick).combine_chunks()
    ok = ~lists.is_null().to_numpy(zero_copy_only=False)
    intercept = np.where(ok, per_series("intercept").astype(np.float64), np.nan)
    sigma = per_series("sigma").astype(np.float64)
    origin = per_series("_origin").astype(np.int64)
    steps = table.column(_STEP).to_numpy()
    history = np.full((n, width), np.nan)
    values = table.column(_Y).to_numpy(zero_copy_only=False).astype(np.float64)
    history[inverse, width - 1 - (origin[inverse] - steps)] = values
    fit = ar.ARFit.from_params(intercept, _coef_matrix(lists, width), sigma, order)
    mean, se = ar.forecast(fit, history, horizon)
    lower, upper = ar.interval(mean, se, level)
    rep = pa.array(np.repeat(first_row, horizon))

    def nullable(x: np.ndarray) -> pa.Array:
        return pa.array(x.ravel(), mask=~np.isfinite(x.ravel()))

    return pa.table(
        {
            "sensor_id": table.column("sensor_id").take(rep),
            "metric": table.column("metric").take(rep),
            "region": table.column("region").take(rep),
            "_origin_step": pa.array(np.repeat(origin, horizon)),
            "interval_s": table.column("interval_s").take(rep),
            "step": pa.array(np.tile(np.arange(1, horizon + 1, dtype=np.int32), n)),
            "y_pred": nullable(mean),
            "y_lower": nullable(lower),
            "y_upper": nullable(upper),
        }
    )


def _forecast_udf(horizon: int, level: float) -> Callable[[pa.Table], pa.Table]:
    def forecast_udf(table: pa.Table) -> pa.Table:
        return _forecast_table(table, horizon, level)

    return forecast_udf


def _models_for_forecast(coeffs: DataFrame) -> DataFrame:
    """The newest model per series, typed as the UDF expects (a coefficient table read
    back from pandas may carry other integer / float widths)."""
    return _latest_models(coeffs).select(
        "sensor_id", "metric", F.col("region").cast("string").alias("region"),
        F.col("p").cast("int").alias("p"), F.col("intercept").cast("double").alias("intercept"),
        F.col("coefs").cast("array<double>").alias("coefs"), F.col("sigma").cast("double").alias("sigma"),
        F.col("interval_s").cast("long").alias("interval_s"),
    )


def forecast_spark(
    coeffs: DataFrame,
    history: DataFrame,
    horizon: int,
    level: float = DEFAULT_LEVEL,
    n_buckets: int = DEFAULT_BUCKETS,
    intervals: Mapping[str, int] | None = None,
    use_filled: bool = True,
    origins: DataFrame | None = None,
) -> DataFrame:
    """Recursive 1..``horizon``-step forecasts with normal intervals.

    ``coeffs``: gold_ar_coefficients rows (the newest fit per series is used).
    ``history``: silver/gold rows of the series (as for :func:`fit_ar`).
    ``origins``: optional (sensor_id, metric, origin_ts) rows, any number per series
    (backtests); by default each series is forecast once, from its newest grid step with
    a usable value. A forecast from origin o uses the p grid steps ending at o; if one of
    them is missing (or the fit failed) that origin's forecasts are null. Origins of
    series without a model get no rows.

    ``level``: central interval level (0.9 -> 5% / 95% normal quantiles; se from psi
    weights, see :func:`ar.forecast`). Returns :data:`FORECAST_COLUMNS`: sensor_id,
    metric, region, origin_ts, target_ts (= origin_ts + step * interval), step
    (1..horizon, int), y_pred, y_lower, y_upper (metric unit).
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    models = _models_for_forecast(coeffs)
    values = prepare_series(history, intervals, use_filled).where(F.col(_Y).isNotNull())
    values = values.select(*SERIES, _STEP, _Y)
    if origins is None:
        units = values.groupBy(*SERIES).agg(F.max(_STEP).alias("_origin")).join(models, list(SERIES))
    else:
        units = (
            origins.select(*SERIES, "origin_ts")
            .join(models, list(SERIES))
            .withColumn("_origin", F.expr("unix_seconds(origin_ts) div interval_s"))
            .drop("origin_ts")
            .dropDuplicates([*SERIES, "_origin"])
        )
    # One row per unit and history step it needs (p steps ending at the origin), then an
    # equi-join on the step: no range join between every row and every origin.
    first = F.col("_origin") - F.greatest(F.col("p"), F.lit(1)) + 1
    needed = units.withColumn(_STEP, F.explode(F.sequence(first, F.col("_origin"))))
    rows = needed.join(values, [*SERIES, _STEP], "left")
    rows = rows.withColumn(_SID, F.xxhash64(*SERIES)).withColumn(
        _BUCKET, F.pmod(F.xxhash64(*SERIES, "_origin"), F.lit(n_buckets))
    )
    rows = rows.select(
        _BUCKET, _SID, "sensor_id", "metric", "region", "p", "intercept", "coefs", "sigma",
        "interval_s", "_origin", _STEP, _Y,
    )
    out = rows.groupBy(_BUCKET).applyInArrow(_forecast_udf(horizon, level), _FORECAST_SCHEMA)
    interval = F.col("interval_s")
    origin_s = F.col("_origin_step") * interval
    return out.select(
        "sensor_id", "metric", "region",
        F.timestamp_seconds(origin_s).alias("origin_ts"),
        F.timestamp_seconds(origin_s + F.col("step") * interval).alias("target_ts"),
        "step", "y_pred", "y_lower", "y_upper",
    )
