"""Scoring served forecasts (forecast_accuracy, drift) and lake maintenance."""

from __future__ import annotations

import datetime as dt
import math

import pytest
from pyspark.sql import functions as F

from citylake.stages import maintenance, monitoring

DAY = dt.date(2026, 1, 8)
T0 = dt.datetime(2026, 1, 8, 0, 0)


def _forecasts(spark, rows):
    return spark.createDataFrame(
        rows,
        "model string, sensor_id string, metric string, region string, origin_ts timestamp, "
        "target_ts timestamp, step int, y_pred double, y_lower double, y_upper double",
    )


def _actuals(spark, rows):
    return spark.createDataFrame(rows, "sensor_id string, metric string, ts timestamp, value double")


def test_day_accuracy_by_region_model_and_step(spark):
    h = dt.timedelta(hours=1)
    forecasts = _forecasts(spark, [
        # step 1: errors +2 and -4 -> mae 3, rmse sqrt(10); one of two inside its interval
        ("ar", "s1", "pm25", "r1", T0 - h, T0, 1, 12.0, 10.0, 14.0),
        ("ar", "s1", "pm25", "r1", T0, T0 + h, 1, 16.0, 17.0, 19.0),
        # step 2: no actual yet -> n_missing
        ("ar", "s1", "pm25", "r1", T0, T0 + 2 * h, 2, 5.0, 4.0, 6.0),
        # another day's target: not scored today
        ("ar", "s1", "pm25", "r1", T0 - 2 * h, T0 - h, 1, 1.0, 0.0, 2.0),
    ])
    actuals = _actuals(spark, [("s1", "pm25", T0, 10.0), ("s1", "pm25", T0 + h, 20.0)])
    rows = {r["step"]: r for r in monitoring.day_accuracy(forecasts, actuals, DAY).collect()}
    assert set(rows) == {1, 2}
    one = rows[1]
    assert (one["target_date"], one["region"], one["model"], one["n"], one["n_missing"]) == (DAY, "r1", "ar", 2, 0)
    assert one["mae"] == pytest.approx(3.0) and one["rmse"] == pytest.approx(math.sqrt(10))
    assert one["coverage"] == pytest.approx(0.5)
    assert (rows[2]["n"], rows[2]["n_missing"]) == (0, 1)


def test_drift_is_flagged_only_well_above_the_backtest_level(spark):
    accuracy = spark.createDataFrame(
        [(DAY, "r1", "pm25", "ar", 1, 20, 0, 1.0, 4.0, 0.9),    # 4 vs 2: drifting
         (DAY, "r2", "pm25", "ar", 1, 20, 0, 1.0, 2.2, 0.9),    # 2.2 vs 2: fine
         (DAY, "r3", "pm25", "ar", 1, 3, 0, 1.0, 9.0, 0.9)],    # too few forecasts to judge
        "target_date date, region string, metric string, model string, step int, n bigint, "
        "n_missing bigint, mae double, rmse double, coverage double",
    )
    backtest = spark.createDataFrame(
        [("ar", r, "pm25", 1, 2.0) for r in ("r1", "r2", "r3")],
        "model string, region string, metric string, step int, rmse double",
    )
    leveled = monitoring.with_backtest_level(accuracy, backtest)
    ratios = {r["region"]: r["drift_ratio"] for r in leveled.collect()}
    assert ratios == pytest.approx({"r1": 2.0, "r2": 1.1, "r3": 4.5})
    assert [r["region"] for r in monitoring.drifting(leveled, ratio=1.5).collect()] == ["r1"]


@pytest.mark.integration
def test_maintain_compacts_zorders_and_audits(spark, lake):
    rows = [("s1", "pm25", dt.datetime(2026, 1, 5, h), float(h), dt.date(2026, 1, 5), None, "f.csv", "csv", 1,
             dt.datetime(2026, 1, 6)) for h in range(10)]
    df = spark.createDataFrame(rows, lake.spec("bronze_readings").struct())
    for i in range(10):  # ten commits, ten small files in one partition
        lake.append("bronze_readings", df.where(F.col("value") == float(i)))
    lake.config.maintenance.optimize_min_files = 8
    report = maintenance.run_maintain(lake)
    audit = {r["table_name"]: r for r in lake.read("table_audit").collect()}
    bronze = audit["bronze_readings"]
    assert bronze["optimized"] and bronze["zorder_by"] == "sensor_id,metric"
    assert bronze["num_files"] == 1  # compacted
    assert bronze["commits_7d"] >= 11 and "WRITE:10" in bronze["operations_7d"]
    assert lake.read("bronze_readings").count() == 10  # data unchanged
    assert "bronze_readings" in report.summary()
    # A second run finds nothing to compact and changes no data.
    maintenance.run_maintain(lake)
    assert lake.read("bronze_readings").count() == 10
