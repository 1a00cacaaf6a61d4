"""Split-conformal prediction intervals and physical clipping, as pure Spark transforms.

Split conformal: score absolute residuals ``|y_true - y_pred|`` on a *calibration*
backtest (origins disjoint from - ideally before - the rows the intervals are evaluated
on), take per group the finite-sample-corrected quantile ``q``, and use
``y_pred +/- q`` as the interval. For exchangeable residuals the interval then holds the
actual with probability >= level.

Quantile rule: with the group's n present residuals sorted ascending r_(1) <= ... <=
r_(n), ``q = r_(k)`` with ``k = ceil((n + 1) * level)``. E.g. residuals 1..10 at level
0.9: k = ceil(11 * 0.9) = ceil(9.9) = 10, so q = 10 (the plain 90% quantile, 9.1, would
under-cover). When k > n (n < level / (1 - level), e.g. n <= 8 at 0.9) the guarantee
needs an infinite interval; we use the largest residual instead and flag the group
(``q_capped``). q is null when the group has no residual (n = 0).

Only window functions, aggregates and joins: no Python UDFs.
"""

from __future__ import annotations

from functools import reduce
from typing import Sequence

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from citylake.catalogue import Catalogue
from citylake.forecast.baselines import metric_lookup

DEFAULT_LEVEL = 0.9
DEFAULT_BY = ("model", "region", "metric", "step")
QUANTILE_COLUMNS = ("n_calib", "q", "q_capped")
#: (n + 1) * level is computed in floating point and can land a hair above an integer
#: (100 * 0.07 = 7.000000000000001); without this slack its ceil would be one rank high.
_RANK_SLACK = 1e-9


def _present(column: str) -> Column:
    return F.col(column).isNotNull() & ~F.isnan(F.col(column))


def conformal_quantiles(
    backtest_rows: DataFrame,
    level: float = DEFAULT_LEVEL,
    by: Sequence[str] = DEFAULT_BY,
) -> DataFrame:
    """Per group of ``by``, the split-conformal quantile of the absolute residuals.

    ``backtest_rows``: forecast rows with y_true (calibration period). ``level`` in (0, 1):
    the target coverage. Rows without y_true or y_pred are ignored. Columns: ``by`` +
    n_calib (bigint, residuals used), q (double, metric unit; null when n_calib = 0),
    q_capped (boolean: true when ceil((n+1) level) > n and q is the largest residual;
    null when n_calib = 0). Rule: module docstring.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    keys = list(by)
    residual = F.when(_present("y_true") & _present("y_pred"), F.abs(F.col("y_true") - F.col("y_pred")))
    rows = backtest_rows.select(*keys, residual.alias("_r"))
    group = Window.partitionBy(*keys)
    # Nulls last, so the present residuals hold ranks 1..n.
    ranked = rows.withColumn("_rank", F.row_number().over(group.orderBy(F.col("_r").asc_nulls_last())))
    ranked = ranked.withColumn("_n", F.count("_r").over(group))
    wanted = F.ceil((F.col("_n") + 1) * F.lit(float(level)) - _RANK_SLACK)
    ranked = ranked.withColumn("_k", F.least(wanted, F.col("_n"))).withColumn(
        "_capped", F.when(F.col("_n") > 0, wanted > F.col("_n"))
    )
    return ranked.groupBy(*keys).agg(
        F.max("_n").cast("long").alias("n_calib"),
        F.max(F.when(F.col("_rank") == F.col("_k"), F.col("_r"))).alias("q"),
        F.max("_capped").alias("q_capped"),
    )


def apply_conformal(
    forecasts: DataFrame,
    quantiles: DataFrame,
    models: Sequence[str] | None = None,
) -> DataFrame:
    """Fill y_lower = y_pred - q and y_upper = y_pred + q from :func:`conformal_quantiles`.

    Rows are matched on every key column of ``quantiles`` (its columns other than
    n_calib / q / q_capped, e.g. model, region, metric, step), null-safe so a null region
    matches a null region. Which rows are filled: those whose ``model`` is in ``models``
    (their own intervals are replaced); with ``models=None``, every row whose y_lower and
    y_upper are both null (models with their own intervals keep them). A row without a
    matching quantile (or with q null) keeps its bounds; a null y_pred gives null bounds.
    Columns: those of ``forecasts``, in order.
    """
    keys = [c for c in quantiles.columns if c not in QUANTILE_COLUMNS]
    lookup = quantiles.select(*[F.col(k).alias(f"_q_{k}") for k in keys], F.col("q").alias("_q"))
    match = reduce(lambda a, b: a & b, [F.col(k).eqNullSafe(F.col(f"_q_{k}")) for k in keys], F.lit(True))
    # Quantiles are one row per model x region x metric x step: small enough to broadcast.
    joined = forecasts.join(F.broadcast(lookup), match, "left")
    if models is None:
        chosen = F.col("y_lower").isNull() & F.col("y_upper").isNull()
    else:
        chosen = F.col("model").isin(list(models))
    fill = chosen & F.col("_q").isNotNull()
    bounds = {
        "y_lower": F.when(fill, F.col("y_pred") - F.col("_q")).otherwise(F.col("y_lower")),
        "y_upper": F.when(fill, F.col("y_pred") + F.col("_q")).otherwise(F.col("y_upper")),
    }
    return joined.select(*[bounds[c].alias(c) if c in bounds else F.col(c) for c in forecasts.columns])


def _bounded(column: Column, low: Column, high: Column) -> Column:
    """``column`` limited to [low, high]; null stays null, a null bound does not bound.

    greatest/least skip nulls, so without the guard a null prediction would become
    the bound itself.
    """
    return F.when(column.isNotNull(), F.least(F.greatest(column, low), high))


def clip(forecasts: DataFrame, catalogue: Catalogue) -> DataFrame:
    """Bound y_pred, y_lower and y_upper to the metric's physical [min, max] (metric
    unit, from the catalogue); rows of a metric not in the catalogue are unchanged.
    Columns: those of ``forecasts``, in order."""
    low = metric_lookup({n: float(m.min) for n, m in catalogue.metrics.items()})
    high = metric_lookup({n: float(m.max) for n, m in catalogue.metrics.items()})
    targets = {"y_pred", "y_lower", "y_upper"}
    return forecasts.select(
        *[_bounded(F.col(c), low, high).alias(c) if c in targets else F.col(c) for c in forecasts.columns]
    )
