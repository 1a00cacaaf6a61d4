"""Scoring served forecasts against what actually happened (``citylake score``).

The daily loop is: forecast, act, measure. ``run_score(lake, day)`` takes every row of
``forecasts`` whose target time falls on ``day`` (UTC), attaches the actual from gold
(the same ``value`` the backtest scored against), and writes per region, metric, model
and step: n, MAE, RMSE and interval coverage into ``forecast_accuracy``, replacing any
earlier score of that day (idempotent per day, so an Airflow re-run or backfill gives
the same table). Each row also carries the latest backtest's RMSE for the same region,
metric, model and step; when a region's error over the day is well above it (ratio >
``forecast.drift_ratio``), a drift warning is logged.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from citylake.errors import CitylakeError
from citylake.forecast import evaluation
from citylake.lake import Lake

log = logging.getLogger(__name__)

GROUP = ["region", "metric", "model", "step"]


def day_accuracy(forecasts: DataFrame, actuals: DataFrame, day: dt.date) -> DataFrame:
    """Accuracy of the ``forecasts`` rows targeting ``day`` (UTC).

    ``actuals``: (sensor_id, metric, ts, value). Columns: target_date, region, metric,
    model, step, n, n_missing, mae, rmse (metric unit), coverage (0..1). A forecast
    whose actual has not arrived is counted in n_missing, not scored.
    """
    rows = forecasts.where(F.to_date("target_ts") == F.lit(day))
    rows = evaluation.attach_actuals(rows, actuals)
    scored = evaluation.score(rows, GROUP)
    return scored.select(F.lit(day).alias("target_date"), *GROUP, "n", "n_missing", "mae", "rmse", "coverage")


def with_backtest_level(accuracy: DataFrame, backtest_metrics: DataFrame) -> DataFrame:
    """Adds ``backtest_rmse`` (same region, metric, model, step) and ``drift_ratio``."""
    level = backtest_metrics.select(*GROUP, F.col("rmse").alias("backtest_rmse"))
    return accuracy.join(level, GROUP, "left").withColumn(
        "drift_ratio", F.when(F.col("backtest_rmse") > 0, F.col("rmse") / F.col("backtest_rmse")))


def drifting(accuracy: DataFrame, ratio: float, min_n: int = 10) -> DataFrame:
    """Region, metric and model whose day RMSE (over all steps) is above ``ratio`` times
    the backtest's (RMSEs averaged over the same steps, weighted by n)."""
    weighted = accuracy.where(F.col("backtest_rmse").isNotNull() & (F.col("n") > 0))
    by = ["region", "metric", "model"]
    day = weighted.groupBy(*by).agg(
        F.sqrt(F.sum(F.col("rmse") ** 2 * F.col("n")) / F.sum("n")).alias("rmse"),
        F.sqrt(F.sum(F.col("backtest_rmse") ** 2 * F.col("n")) / F.sum("n")).alias("backtest_rmse"),
        F.sum("n").alias("n"),
    )
    return day.where((F.col("n") >= min_n) & (F.col("rmse") > ratio * F.col("backtest_rmse")))


@dataclass
class ScoreReport:
    """What ``citylake score`` did for one day."""

    day: dt.date
    rows: int
    scored_forecasts: int
    missing_actuals: int
    drift: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"{self.day}: {self.rows} accuracy rows from {self.scored_forecasts} forecasts "
                f"({self.missing_actuals} without an actual yet)")
        return text + "".join(f"\n        DRIFT {d}" for d in self.drift)


def newest_gold_date(lake: Lake) -> dt.date:
    day = lake.read("gold_features").agg(F.max("reading_date")).first()[0]
    if day is None:
        raise CitylakeError("gold_features is empty: nothing to score against (run the pipeline first)")
    return day


def run_score(lake: Lake, day: dt.date | None = None) -> ScoreReport:
    """Score the forecasts targeting ``day`` (default: the newest date in gold)."""
    day = day or newest_gold_date(lake)
    actuals = lake.read("gold_features").where(F.col("reading_date") == F.lit(day)).select(
        "sensor_id", "metric", "ts", "value")
    accuracy = day_accuracy(lake.read("forecasts"), actuals, day)
    accuracy = with_backtest_level(accuracy, lake.read("backtest_metrics").where(F.col("region") != "ALL"))
    accuracy = accuracy.withColumn("scored_ts", F.current_timestamp()).persist()
    totals = accuracy.agg(F.count(F.lit(1)).alias("rows"), F.sum("n").alias("n"),
                          F.sum("n_missing").alias("missing")).first()
    lake.replace_where("forecast_accuracy", accuracy, f"target_date = '{day.isoformat()}'")
    drift = []
    for r in drifting(accuracy, lake.config.forecast.drift_ratio).collect():
        text = (f"{r['region']}/{r['metric']}/{r['model']}: RMSE {r['rmse']:.3g} vs backtest "
                f"{r['backtest_rmse']:.3g} (x{r['rmse'] / r['backtest_rmse']:.2f}, n={r['n']})")
        log.warning("forecast drift on %s: %s", day, text)
        drift.append(text)
    accuracy.unpersist()
    if not totals["rows"]:
        log.warning("no forecasts target %s: nothing scored (forecast runs before the day it targets)", day)
    return ScoreReport(day, int(totals["rows"] or 0), int(totals["n"] or 0), int(totals["missing"] or 0), drift)
