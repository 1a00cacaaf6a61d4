"""AR models for every series of a silver / gold table, fitted in Spark with numpy.

A series is one ``(sensor_id, metric)`` on its regular grid; the model and its
conventions (gaps, filled points, sigma, AIC/BIC) are those of :mod:`citylake.forecast.ar`.

Design: blocks by a Spark aggregate, then a grouped Arrow UDF over buckets of series
-----------------------------------------------------------------------------------
1. Each row gets its grid step ``floor(epoch / interval_s)``. A native hash aggregate
   groups rows by (series, step // B) and spreads the values over B columns
   ``_v0 .. _v{B-1}`` (B = :data:`BLOCK_STEPS` = 32). Partial aggregation packs the rows
   *before* the shuffle, so the shuffle and the JVM -> Python transfer carry 1/32 as many
   (32 times wider) rows.
2. Block rows get a bucket ``pmod(xxhash64(sensor_id, metric), n_buckets)``;
   ``groupBy(bucket).applyInArrow`` hands each bucket - many whole series - to one
   Python call, which copies the block rows into a ``(n_series, T)`` NaN matrix by grid
   position (right-aligned on each series' newest block, so absent grid rows are NaN
   and shorter series are left-padded) and calls :func:`ar.fit_many` /
   :func:`ar.select_order` once per group of similar length. Python work is per bucket,
   never per row or per series.

Why this shape (figures in ``bench/RESULTS_AR.md``):

* Arrow rather than pandas (``applyInArrow``, the same grouped-map UDF as
  ``applyInPandas``): strings stay Arrow arrays (``take`` by index), no Python object is
  created per value, and the coefficient arrays are built as one ``ListArray``.
* Not one row per reading into the grouped UDF: that shuffles and sorts every row and
  converts it to Arrow on its own; measured 1.4x the time (bench design (f)).
* Not the other option of the issue - lag columns from window functions and the
  normal-equation sums (for AR(12): 105 X'X/X'y/y'y products) as Spark aggregates,
  solved afterwards: the windows need a shuffle *and* a sort of every row, then ~105
  product columns per row; order selection would need one set of sums per candidate,
  and the SSR could only come from ``y'y - b'X'y``. Measured 4x the time
  (``bench/ar_bench.py --window-sums``).

Cost: for 10k series x 2,000 points this path takes 1.9x the bench's data-movement floor
(one row per series by a plain aggregate) on the Intel machine of session 7 and 3.2-3.8x
on the AMD machine of sessions 10-11. The numpy fit is a small part of it. Most of it is
the block aggregate (32 conditional updates per row) and moving every value once through
a shuffle into Python (stage breakdown in ``bench/RESULTS_AR.md``). ``citylake train``
therefore fits a Delta table with :mod:`citylake.forecast.ar_direct` (1.15x the floor),
which reads the files in the Python workers and falls back to this function when it
cannot; this one serves any DataFrame.

Output: ``gold_ar_coefficients`` (:data:`GOLD_AR_COEFFICIENTS`; the entry for
``schemas/tables.yaml`` is :data:`TABLES_YAML_ENTRY`), its long form
(:func:`coefficients_long`), and recursive forecasts with normal intervals
(:func:`forecast_spark`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from citylake.catalogue import ColumnSpec, TableSpec, load_catalogue
from citylake.forecast import ar

#: AR order when none is configured (grid steps): one hour of 5-minute traffic data.
DEFAULT_ORDER = 12
#: Groups (buckets of series) of the grouped UDF. Each bucket is one Python call holding
#: its series in memory, so more buckets = smaller calls; 64 keeps 10k x 2000-point
#: series at ~160 series (~10k block rows, ~2.6 MB of values) per call.
DEFAULT_BUCKETS = 64
#: Cells (series x steps) of one value matrix inside a bucket; longer series are fitted
#: in smaller groups so one very long series cannot blow up a bucket's memory (64 MiB).
MAX_MATRIX_CELLS = 8 * 2**20
#: Grid steps per block row (stage 1). 32 measured cheaper than 64 in CPU time (fewer
#: conditional aggregates per input row) and far cheaper than shipping single rows.
BLOCK_STEPS = 32
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
_SID, _BUCKET, _BLOCK, _STEP, _Y, _INTERVAL = "_sid", "_bucket", "_block", "_step", "_y", "_interval_s"

FIT_SCHEMA = T.StructType(
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
    metric without an interval, and rows without sensor_id or ts, are dropped.
    Timestamps are expected after 1970 (the step uses integer division).
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
        # rows without a series key or time cannot sit on a grid (silver has none)
        .where(F.col(_INTERVAL).isNotNull() & F.col("sensor_id").isNotNull() & F.col("ts").isNotNull())
        .withColumn(_STEP, F.expr(f"unix_seconds(ts) div {_INTERVAL}"))
        .drop("ts")
    )


# -- stage 1 (Spark aggregate): rows -> blocks of BLOCK_STEPS grid steps -----------------


def _blocks(prepared: DataFrame, width: int = BLOCK_STEPS) -> DataFrame:
    """One row per series, region and block of :data:`BLOCK_STEPS` consecutive grid
    steps, the values in columns ``_v0 .. _v{B-1}`` (null = no usable value), rows
    without a usable value left out. A native hash aggregate: partial aggregation packs
    the rows before the shuffle, and what reaches Python is 1/B as many (B times wider)
    rows. ``max`` makes a duplicated (series, step) deterministic; silver has none.

    Region is a grouping key on purpose: as a value (``max_by(region, step)``) its
    string buffer turns the aggregate into a sort aggregate, measured 1.7x slower for the
    whole fit. A series that moved region inside a block therefore has one row per
    region for that block; :func:`_bucket_of` merges them.
    """
    block = F.floor(F.col(_STEP) / width).cast("long")
    cells = [F.max(F.when(F.col("_k") == j, F.col(_Y))).alias(f"_v{j}") for j in range(width)]
    return (
        prepared.where(F.col(_Y).isNotNull())
        .withColumn(_BLOCK, block)
        .withColumn("_k", F.col(_STEP) - F.col(_BLOCK) * width)
        .groupBy("sensor_id", "metric", "region", _INTERVAL, _BLOCK)
        .agg(*cells)
    )


# -- stage 2 (grouped by bucket): blocks -> matrices -> numpy fit -----------------------------


@dataclass(frozen=True)
class _Bucket:
    """One bucket's block rows, indexed by series (no Python loop over rows or series)."""

    cells: np.ndarray  # (R, B) values of each block row, NaN = missing
    row_series: np.ndarray  # (R,) series index of each row
    block: np.ndarray  # (R,) block number (grid step // B)
    first_block: np.ndarray  # (S,) oldest block of each series
    last_block: np.ndarray  # (S,) newest block of each series
    label_row: np.ndarray  # (S,) input row of the series' newest value (carries its labels)


def _merge_split_blocks(
    cells: np.ndarray, row_series: np.ndarray, block: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Merge block rows of the same (series, block) - one per region when a series moved
    region inside a block - into one: each cell keeps the larger value (as ``max`` does
    for a duplicated step), and the row that holds the block's newest value supplies the
    labels. Returns (cells, row_series, block, label index into the input rows)."""
    order = np.lexsort((block, row_series))
    s, b = row_series[order], block[order]
    starts_group = np.r_[True, (s[1:] != s[:-1]) | (b[1:] != b[:-1])]
    if starts_group.all():  # the usual case: no series moved region inside a block
        return cells, row_series, block, np.arange(len(block))
    # Re-sort with each row's newest filled cell as the last key, so the row that labels a
    # group ends it; the groups, and so their starts, stay where they are.
    newest_cell = cells.shape[1] - 1 - np.isfinite(cells)[:, ::-1].argmax(axis=1)
    order = np.lexsort((newest_cell, block, row_series))
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], len(order)] - 1
    merged = np.fmax.reduceat(cells[order], starts, axis=0)
    return merged, s[starts], b[starts], order[ends]


def _bucket_of(table: pa.Table) -> _Bucket:
    # The block width is read from the columns, so the UDF needs no module constant.
    width = sum(1 for name in table.column_names if name.startswith("_v"))
    cells = np.column_stack(
        [table.column(f"_v{j}").to_numpy(zero_copy_only=False).astype(np.float64) for j in range(width)]
    )
    _, row_series = np.unique(table.column(_SID).to_numpy(), return_inverse=True)
    cells, row_series, block, labels = _merge_split_blocks(cells, row_series, table.column(_BLOCK).to_numpy())
    n_series = int(row_series.max()) + 1 if len(row_series) else 0
    first, last, newest_row = series_extent(row_series, n_series, block)
    return _Bucket(cells, row_series, block, first, last, labels[newest_row])


def series_extent(row_series: np.ndarray, n_series: int, position: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per series (``row_series``: each row's series index): the smallest and largest
    ``position`` (grid step or block) of its rows, and a row holding the largest one -
    the row whose labels (region) the series reports."""
    first = np.full(n_series, np.iinfo(np.int64).max)
    np.minimum.at(first, row_series, position)
    last = np.full(n_series, np.iinfo(np.int64).min)
    np.maximum.at(last, row_series, position)
    newest_row = np.zeros(n_series, np.int64)
    newest = np.flatnonzero(position == last[row_series])
    newest_row[row_series[newest]] = newest
    return first, last, newest_row


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


def _matrix(bucket: _Bucket, series: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(len(series), n_blocks * B) values of ``series``, right-aligned on each series'
    newest block, and the grid step of column 0 of each row. Whole block rows are
    copied at once through a (series, block, B) view."""
    width = bucket.cells.shape[1]
    row_of = np.full(len(bucket.last_block), -1)
    row_of[series] = np.arange(len(series))
    n_blocks = int((bucket.last_block[series] - bucket.first_block[series]).max()) + 1
    matrix = np.full((len(series), n_blocks, width), np.nan)
    rows = np.flatnonzero(row_of[bucket.row_series] >= 0)
    s = bucket.row_series[rows]
    matrix[row_of[s], n_blocks - 1 - (bucket.last_block[s] - bucket.block[rows])] = bucket.cells[rows]
    base = (bucket.last_block[series] - n_blocks + 1) * width
    return matrix.reshape(len(series), n_blocks * width), base


def _keep_newest(matrix: np.ndarray, max_steps: int) -> None:
    """Blank (in place) every value more than ``max_steps - 1`` steps before each row's
    newest value."""
    finite = np.isfinite(matrix)
    newest = matrix.shape[1] - 1 - finite[:, ::-1].argmax(axis=1)
    matrix[np.arange(matrix.shape[1])[None, :] < (newest - max_steps + 1)[:, None]] = np.nan


def fit_groups(
    spans: np.ndarray, matrix_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], spec: FitSpec
) -> tuple[ar.ARFit, np.ndarray]:
    """Fit ``len(spans)`` series held in memory, in groups of similar span.

    ``spans``: grid steps from each series' oldest to newest value. ``matrix_of(series
    indices)`` returns their ``(len, width)`` value matrix right-aligned on each newest
    step, and the grid step of column 0 of each row. Returns the fit and, per series, the
    grid step of its matrix's column 0 (so a target's step is ``base + first_target``).
    """
    n = len(spans)
    parts: list[tuple[np.ndarray, ar.ARFit]] = []
    base = np.zeros(n, np.int64)
    for series in _series_groups(spans, MAX_MATRIX_CELLS):
        matrix, base[series] = matrix_of(series)
        if spec.max_steps:
            _keep_newest(matrix, spec.max_steps)
        if spec.candidates:
            _, fit = ar.select_order(matrix, spec.candidates, spec.criterion)
        else:
            fit = ar.fit_many(matrix, spec.p)
        parts.append((series, fit))
    width = max(spec.candidates) if spec.candidates else spec.p
    return ar.combine_fits(parts, n, width), base


def _fit_bucket(bucket: _Bucket, spec: FitSpec) -> tuple[ar.ARFit, np.ndarray]:
    """Fit every series of the bucket (see :func:`fit_groups`)."""
    spans = (bucket.last_block - bucket.first_block + 1) * bucket.cells.shape[1]
    return fit_groups(spans, lambda series: _matrix(bucket, series), spec)


def _nullable(values: np.ndarray, ok: np.ndarray) -> pa.Array:
    return pa.array(values, type=pa.float64(), mask=~ok | ~np.isfinite(values))


def _coef_lists(fit: ar.ARFit) -> pa.Array:
    """list<double> of each series' b_1..b_p (null when not ok), from one flat buffer."""
    lengths = np.where(fit.ok, fit.order, 0)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    keep = np.arange(fit.coefs.shape[1])[None, :] < lengths[:, None]
    flat = pa.array(fit.coefs[keep], type=pa.float64())
    return pa.ListArray.from_arrays(pa.array(offsets), flat, mask=pa.array(~fit.ok))


def fit_table(
    labels: Mapping[str, pa.Array], fit: ar.ARFit, base: np.ndarray
) -> pa.Table:
    """The fit of some series as a table of :data:`FIT_SCHEMA`. ``labels``: sensor_id,
    metric, region and interval_s (seconds) of each series; ``base`` from :func:`fit_groups`."""
    has = fit.first_target >= 0
    return pa.table(
        {
            "sensor_id": labels["sensor_id"],
            "metric": labels["metric"],
            "region": labels["region"],
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
            "interval_s": labels["interval_s"].cast(pa.int64()),
        }
    )


def _fit_table(table: pa.Table, spec: FitSpec) -> pa.Table:
    """The grouped UDF body: one bucket's rows in, one row per series out."""
    bucket = _bucket_of(table)
    fit, base = _fit_bucket(bucket, spec)
    pick = pa.array(bucket.label_row)
    labels = {name: table.column(source).take(pick) for name, source in
              (("sensor_id", "sensor_id"), ("metric", "metric"), ("region", "region"), ("interval_s", _INTERVAL))}
    return fit_table(labels, fit, base)


def _fit_udf(spec: FitSpec) -> Callable[[pa.Table], pa.Table]:
    def fit_udf(table: pa.Table) -> pa.Table:
        return _fit_table(table, spec)

    return fit_udf


# -- public Spark API --------------------------------------------------------------------


def fit_ar(
    df: DataFrame,
    p: int = DEFAULT_ORDER,
    candidates: Sequence[int] | None = None,
    criterion: str = "aic",
    n_buckets: int = DEFAULT_BUCKETS,
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
    ``n_buckets``: groups of the grouped UDF (see :data:`DEFAULT_BUCKETS`).
    ``intervals``: ``{metric: grid seconds}``, default the catalogue. ``use_filled``:
    False turns ``is_filled`` points into gaps. ``max_steps`` trains on each series'
    newest steps only. ``fitted_ts`` defaults to ``current_timestamp()``.

    Returns the columns of :data:`GOLD_AR_COEFFICIENTS` in order, one row per series
    (lazy: nothing runs until the caller writes or collects it).
    """
    spec = fit_spec(p, candidates, criterion, max_steps)
    blocks = _blocks(prepare_series(df, intervals, use_filled))
    blocks = blocks.withColumn(_SID, F.xxhash64("sensor_id", "metric")).withColumn(
        _BUCKET, F.pmod(F.col(_SID), F.lit(n_buckets))
    )
    fitted = blocks.groupBy(_BUCKET).applyInArrow(_fit_udf(spec), FIT_SCHEMA)
    return finish_fit(fitted, spec, fitted_ts)


def fit_spec(p: int, candidates: Sequence[int] | None, criterion: str, max_steps: int | None) -> FitSpec:
    """A checked :class:`FitSpec` (ValueError on a bad criterion or order)."""
    if criterion not in ("aic", "bic"):
        raise ValueError(f"criterion must be 'aic' or 'bic', got {criterion!r}")
    if p < 0 or (candidates is not None and (not candidates or min(candidates) < 0)):
        raise ValueError(f"orders must be >= 0 (p={p}, candidates={candidates})")
    return FitSpec(p=p, candidates=tuple(sorted(set(candidates))) if candidates else None,
                   criterion=criterion, max_steps=max_steps)


def finish_fit(fitted: DataFrame, spec: FitSpec, fitted_ts: Column | None = None) -> DataFrame:
    """Rows of :data:`FIT_SCHEMA` as the columns of :data:`GOLD_AR_COEFFICIENTS`."""
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
