"""Forecast accuracy: actuals, error metrics, the backtest_metrics table, champions.

Backtest rows are forecast rows (:data:`citylake.forecast.baselines.FORECAST_COLUMNS`)
plus ``y_true`` (:func:`attach_actuals`). A row is *scored* when both y_true and y_pred
are present (not null, not NaN); the others are counted in ``n_missing`` and left out
of every error. With ``e = y_pred - y_true`` over the scored rows of a group:

==========  =======================================================================
n           scored rows
n_missing   rows of the group that could not be scored (no y_pred or no y_true)
mae         mean |e| (metric unit)
rmse        sqrt(mean e^2) (metric unit)
mape        100 * mean(|e| / |y_true|) in %, over scored rows with y_true != 0 only
            (a zero actual has no percentage error); null when there are none
smape       100 * mean(2 |e| / (|y_true| + |y_pred|)) in % (0..200); a row with
            y_true = y_pred = 0 contributes 0
mase        mean(|e| / mase_scale) (unitless) where mase_scale is the series' in-sample
            MAE of the one-step naive forecast over the training period
            (:func:`mase_scale`); rows whose series has no scale or a zero scale
            (constant training data) are left out; null when none remain
coverage    share (0..1) of scored rows with y_lower <= y_true <= y_upper, among the
            scored rows that have both bounds; null when none has an interval
==========  =======================================================================

Only aggregates, window functions and joins: no Python UDFs.
"""

from __future__ import annotations

from typing import Sequence

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from citylake.catalogue import Catalogue, ColumnSpec, TableSpec, load_catalogue
from citylake.forecast.baselines import SERIES, clean_double, stepped_history

#: Region value of the rows aggregated over all regions.
ALL_REGIONS = "ALL"
METRIC_COLUMNS = ("n", "n_missing", "mae", "rmse", "mape", "smape", "mase", "coverage")
BACKTEST_METRICS_COLUMNS = ("model", "region", "metric", "step", *METRIC_COLUMNS)
CHAMPION_COLUMNS = ("region", "metric", "champion_model", "rmse", "runner_up", "runner_up_rmse")

BACKTEST_METRICS = TableSpec(
    name="backtest_metrics",
    path="gold/backtest_metrics",
    layer="gold",
    description="Forecast accuracy per model, region (and 'ALL'), metric and horizon step.",
    partition_by=(),
    keys=("model", "region", "metric", "step"),
    unique_keys="critical",
    columns=(
        ColumnSpec("model", "string", False),
        ColumnSpec("region", "string", True, "sensor region, or 'ALL' for every region together"),
        ColumnSpec("metric", "string", False),
        ColumnSpec("step", "int", False, "horizon, grid steps after the origin"),
        ColumnSpec("n", "bigint", False, "scored rows (y_true and y_pred present)"),
        ColumnSpec("n_missing", "bigint", False, "rows without y_pred or y_true, not scored"),
        ColumnSpec("mae", "double", True, "metric unit"),
        ColumnSpec("rmse", "double", True, "metric unit"),
        ColumnSpec("mape", "double", True, "%, rows with y_true != 0 only"),
        ColumnSpec("smape", "double", True, "%, 0..200; 0 when y_true = y_pred = 0"),
        ColumnSpec("mase", "double", True, "mean |e| / series' one-step naive in-sample MAE"),
        ColumnSpec("coverage", "double", True, "share of rows with an interval holding y_true"),
    ),
)

#: The same table for ``schemas/tables.yaml`` (for the integrator to paste).
TABLES_YAML_ENTRY = """\
  backtest_metrics:
    path: gold/backtest_metrics
    layer: gold
    description: Forecast accuracy per model, region (and 'ALL'), metric and horizon step.
    partition_by: []
    keys: [model, region, metric, step]
    unique_keys: critical
    columns:
      - {name: model, type: string, nullable: false}
      - {name: region, type: string, description: "sensor region, or 'ALL' for every region together"}
      - {name: metric, type: string, nullable: false}
      - {name: step, type: int, nullable: false, description: horizon in grid steps after the origin}
      - {name: n, type: bigint, nullable: false, description: scored rows (y_true and y_pred present)}
      - {name: n_missing, type: bigint, nullable: false, description: rows without y_pred or y_true}
      - {name: mae, type: double, description: metric unit}
      - {name: rmse, type: double, description: metric unit}
      - {name: mape, type: double, description: "%, rows with y_true != 0 only"}
      - {name: smape, type: double, description: "%, 0..200; 0 when y_true = y_pred = 0"}
      - {name: mase, type: double, description: "mean |e| / the series' one-step naive in-sample MAE"}
      - {name: coverage, type: double, description: share of rows with an interval that hold y_true}
"""


def attach_actuals(forecasts: DataFrame, history: DataFrame, value_col: str = "value") -> DataFrame:
    """Forecast rows + ``y_true`` = the history value at (sensor_id, metric, target_ts).

    Left join: a target without a history row (or with a null / NaN value) keeps its row
    with y_true null, so scoring counts it in ``n_missing``. An existing y_true is
    replaced. History must have at most one row per (sensor_id, metric, ts).
    """
    base = forecasts.drop("y_true")
    actuals = history.select(
        *SERIES, F.col("ts").alias("target_ts"), clean_double(F.col(value_col)).alias("y_true")
    )
    return base.join(actuals, [*SERIES, "target_ts"], "left").select(*base.columns, "y_true")


def mase_scale(
    history_before_cutoff: DataFrame,
    catalogue: Catalogue | None = None,
    value_col: str = "value",
) -> DataFrame:
    """Per series: ``mase_scale`` = mean |y_t - y_(t-1)| over the training history.

    Pass only the history before the backtest cutoff (the scale must not see the test
    period). Pairs are consecutive *grid steps* with both values present, so a gap or an
    absent step breaks the pair instead of differencing across it. Columns: sensor_id,
    metric, mase_scale (metric unit; null when the series has no such pair).
    """
    catalogue = catalogue or load_catalogue()
    stepped = stepped_history(history_before_cutoff, catalogue, value_col)
    ordered = Window.partitionBy(*SERIES).orderBy("_step")
    adjacent = F.col("_step") - F.lag("_step").over(ordered) == 1
    diff = F.when(adjacent, F.abs(F.col("_value") - F.lag("_value").over(ordered)))
    return stepped.withColumn("_diff", diff).groupBy(*SERIES).agg(F.avg("_diff").alias("mase_scale"))


def _present(column: str) -> Column:
    return F.col(column).isNotNull() & ~F.isnan(F.col(column))


def _metric_aggregates(has_scale: bool, has_interval: bool) -> list[Column]:
    """The aggregate columns of :data:`METRIC_COLUMNS` (see the module docstring)."""
    y, p = F.col("y_true"), F.col("y_pred")
    scored = _present("y_true") & _present("y_pred")
    err = F.when(scored, p - y)
    abs_err = F.abs(err)
    denom = F.abs(y) + F.abs(p)
    # Both zero is a perfect forecast, not 0/0.
    sape = F.when(scored, F.when(denom == 0, F.lit(0.0)).otherwise(2 * abs_err / denom))
    if has_scale:
        scale = F.col("mase_scale")
        mase = F.avg(F.when(scale > 0, abs_err / scale))
    else:
        mase = F.lit(None).cast("double")
    if has_interval:
        lower, upper = F.col("y_lower"), F.col("y_upper")
        inside = ((lower <= y) & (y <= upper)).cast("double")
        coverage = F.avg(F.when(scored & lower.isNotNull() & upper.isNotNull(), inside))
    else:
        coverage = F.lit(None).cast("double")
    return [
        F.count(err).alias("n"),
        (F.count(F.lit(1)) - F.count(err)).alias("n_missing"),
        F.avg(abs_err).alias("mae"),
        F.sqrt(F.avg(err * err)).alias("rmse"),
        (100 * F.avg(F.when(y != 0, abs_err / F.abs(y)))).alias("mape"),
        (100 * F.avg(sape)).alias("smape"),
        mase.alias("mase"),
        coverage.alias("coverage"),
    ]


def _with_scale(rows: DataFrame, scale: DataFrame | None) -> DataFrame:
    if scale is None:
        return rows
    return rows.drop("mase_scale").join(scale.select(*SERIES, "mase_scale"), list(SERIES), "left")


def score(backtest_rows: DataFrame, by: Sequence[str], scale: DataFrame | None = None) -> DataFrame:
    """Accuracy metrics per group of ``by``: columns ``by`` + :data:`METRIC_COLUMNS`.

    ``scale``: (sensor_id, metric, mase_scale) from :func:`mase_scale`; without it a
    ``mase_scale`` column already on the rows is used, else mase is null. Rules and
    units: module docstring. ``by=[]`` scores all rows as one group.
    """
    rows = _with_scale(backtest_rows, scale)
    has_interval = {"y_lower", "y_upper"} <= set(rows.columns)
    aggregates = _metric_aggregates("mase_scale" in rows.columns, has_interval)
    return rows.groupBy(*by).agg(*aggregates).select(*by, *METRIC_COLUMNS)


def backtest_metrics(backtest_rows: DataFrame, scale: DataFrame | None = None) -> DataFrame:
    """The ``backtest_metrics`` table (:data:`BACKTEST_METRICS`): :func:`score` per model,
    region, metric and step, plus the same per model, metric and step with region
    ``'ALL'`` (every region together, rows with a null region included). Columns:
    :data:`BACKTEST_METRICS_COLUMNS`. A null region stays a null region row.
    """
    rows = _with_scale(backtest_rows, scale)
    per_region = score(rows, ["model", "region", "metric", "step"])
    overall = score(rows, ["model", "metric", "step"]).withColumn("region", F.lit(ALL_REGIONS))
    return per_region.unionByName(overall).select(*BACKTEST_METRICS_COLUMNS)


def champions(metrics_df: DataFrame) -> DataFrame:
    """Per region (including ``'ALL'``) and metric, the model with the lowest horizon RMSE.

    Horizon RMSE = the unweighted mean over steps of the per-step ``rmse`` of
    ``metrics_df`` (backtest_metrics rows), over the steps where the model has an rmse,
    so every horizon step counts the same whatever its row count. Ties go to the model
    name first in alphabetical order; models without any rmse are not ranked.
    Columns: :data:`CHAMPION_COLUMNS`; runner_up / runner_up_rmse are null when only one
    model was ranked.
    """
    horizon = (
        metrics_df.where(F.col("rmse").isNotNull())
        .groupBy("region", "metric", "model")
        .agg(F.avg("rmse").alias("_rmse"))
    )
    ranking = Window.partitionBy("region", "metric").orderBy(F.col("_rmse").asc(), F.col("model").asc())
    ranked = horizon.withColumn("_rank", F.row_number().over(ranking)).where(F.col("_rank") <= 2)

    def at_rank(rank: int, column: str) -> Column:
        return F.max(F.when(F.col("_rank") == rank, F.col(column)))

    return ranked.groupBy("region", "metric").agg(
        at_rank(1, "model").alias("champion_model"),
        at_rank(1, "_rmse").alias("rmse"),
        at_rank(2, "model").alias("runner_up"),
        at_rank(2, "_rmse").alias("runner_up_rmse"),
    ).select(*CHAMPION_COLUMNS)
