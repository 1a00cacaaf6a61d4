"""Baselines, accuracy metrics, champions and split-conformal intervals on tiny frames.

Every expected number is computed by hand in the comments next to it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math

import pytest
from chispa import assert_approx_df_equality, assert_df_equality
from pyspark.sql import functions as F

from citylake.catalogue import Catalogue
from citylake.forecast.baselines import FORECAST_COLUMNS, persistence, seasonal_naive
from citylake.forecast.conformal import apply_conformal, clip, conformal_quantiles
from citylake.forecast.evaluation import (
    BACKTEST_METRICS_COLUMNS,
    attach_actuals,
    backtest_metrics,
    champions,
    mase_scale,
    score,
)

UTC = dt.timezone.utc
HISTORY = "sensor_id string, metric string, region string, ts timestamp, value double"
ORIGINS = "sensor_id string, metric string, origin_ts timestamp"
FORECAST = (
    "model string, sensor_id string, metric string, region string, origin_ts timestamp, "
    "target_ts timestamp, step int, y_pred double, y_lower double, y_upper double"
)
BACKTEST = FORECAST + ", y_true double"
T0 = dt.datetime(2026, 1, 5, tzinfo=UTC)  # a Monday, 00:00 UTC: on every grid
HALF_DAY_S = 43_200


def hours(n: float) -> dt.datetime:
    return T0 + dt.timedelta(hours=n)


def half_days(n: int) -> dt.datetime:
    """Start of the n-th 12 h step after T0 (the test metric's grid)."""
    return T0 + dt.timedelta(seconds=HALF_DAY_S * n)


@pytest.fixture(scope="module")
def cat12(catalogue) -> Catalogue:
    """The catalogue plus ``x12h``, a 12-hour metric: a day is 2 steps, a week 14, so
    seasons fit in a few dozen rows."""
    spec = dataclasses.replace(catalogue.metric("pm25"), name="x12h", interval_s=HALF_DAY_S)
    return dataclasses.replace(catalogue, metrics={**catalogue.metrics, "x12h": spec})


def backtest_row(sensor, y_true, y_pred, lower=None, upper=None, model="m", region="r1", step=1):
    return (model, sensor, "pm25", region, hours(0), hours(step), step, y_pred, lower, upper, y_true)


# -- baselines -----------------------------------------------------------------------------


def test_persistence_uses_last_non_null_value_at_or_before_origin(spark, catalogue):
    history = spark.createDataFrame(
        [
            ("s1", "pm25", "r1", hours(0), 1.0),
            ("s1", "pm25", "r1", hours(1), 2.0),
            ("s1", "pm25", "r1", hours(2), None),  # gap at the origin
            ("s1", "pm25", "r1", hours(3), 5.0),  # after the origin: must not leak
        ],
        HISTORY,
    )
    origins = spark.createDataFrame(
        [("s1", "pm25", hours(2)), ("s1", "pm25", hours(0)), ("s1", "pm25", hours(-5))], ORIGINS
    )
    got = persistence(history, origins, horizon=2, catalogue=catalogue)
    assert tuple(got.columns) == FORECAST_COLUMNS
    expected = spark.createDataFrame(
        [
            # origin 02:00 (null) -> 01:00's 2.0
            ("persistence", "s1", "pm25", "r1", hours(2), hours(3), 1, 2.0, None, None),
            ("persistence", "s1", "pm25", "r1", hours(2), hours(4), 2, 2.0, None, None),
            # origin 00:00 -> its own value, not the later ones
            ("persistence", "s1", "pm25", "r1", hours(0), hours(1), 1, 1.0, None, None),
            ("persistence", "s1", "pm25", "r1", hours(0), hours(2), 2, 1.0, None, None),
            # nothing at or before the origin: no value, no region
            ("persistence", "s1", "pm25", None, hours(-5), hours(-4), 1, None, None, None),
            ("persistence", "s1", "pm25", None, hours(-5), hours(-3), 2, None, None, None),
        ],
        FORECAST,
    )
    assert_df_equality(got, expected, ignore_row_order=True, ignore_nullable=True)


def test_seasonal_naive_day_with_gap_and_horizon_beyond_one_season(spark, cat12):
    # x12h: day season = 2 steps. Steps 0..5 = 10, 20, 11, null, 12, 22; origin step 3.
    values = [10.0, 20.0, 11.0, None, 12.0, 22.0]
    history = spark.createDataFrame(
        [("s1", "x12h", "r1", half_days(i), v) for i, v in enumerate(values)], HISTORY
    )
    origins = spark.createDataFrame([("s1", "x12h", half_days(3))], ORIGINS)
    got = seasonal_naive(history, origins, horizon=3, catalogue=cat12, season="day")
    expected = spark.createDataFrame(
        [
            # target 4 -> 4 - 2 = step 2 = 11
            ("seasonal_naive", "s1", "x12h", "r1", half_days(3), half_days(4), 1, 11.0, None, None),
            # target 5 -> step 3, a gap: null (no fallback)
            ("seasonal_naive", "s1", "x12h", "r1", half_days(3), half_days(5), 2, None, None, None),
            # target 6 -> k = (3-1)//2 + 1 = 2 seasons back = step 2 (step 4 is after the origin)
            ("seasonal_naive", "s1", "x12h", "r1", half_days(3), half_days(6), 3, 11.0, None, None),
        ],
        FORECAST,
    )
    assert_df_equality(got, expected, ignore_row_order=True, ignore_nullable=True)


def test_seasonal_naive_auto_switches_to_week_after_three_weeks(spark, cat12):
    # x12h: week = 14 steps, 3 weeks = 42 steps. value = step index, so y_pred shows the
    # source step. s2 is the same series with step 0 missing (a null value).
    rows = [("s1", "x12h", "r1", half_days(i), float(i)) for i in range(44)]
    rows += [("s2", "x12h", "r1", half_days(i), None if i == 0 else float(i)) for i in range(44)]
    history = spark.createDataFrame(rows, HISTORY)
    origins = spark.createDataFrame(
        [("s1", "x12h", half_days(41)), ("s1", "x12h", half_days(40)), ("s2", "x12h", half_days(41))],
        ORIGINS,
    )

    def preds(season: str) -> dict[tuple[str, int], float]:
        got = seasonal_naive(history, origins, horizon=1, catalogue=cat12, season=season)
        return {(r.sensor_id, r.origin_ts.astimezone(UTC).timestamp()): r.y_pred for r in got.collect()}

    o41, o40 = half_days(41).timestamp(), half_days(40).timestamp()
    # s1 origin 41: steps 0..41 = 42 >= 42 -> week: target 42 - 14 = 28.
    # s1 origin 40: 41 steps < 42 -> day: target 41 - 2 = 39.
    # s2 origin 41: first non-null value at step 1 -> 41 steps -> day: 42 - 2 = 40.
    assert preds("auto") == {("s1", o41): 28.0, ("s1", o40): 39.0, ("s2", o41): 40.0}
    assert preds("week") == {("s1", o41): 28.0, ("s1", o40): 27.0, ("s2", o41): 28.0}
    assert preds("day") == {("s1", o41): 40.0, ("s1", o40): 39.0, ("s2", o41): 40.0}


def test_attach_actuals_left_joins_on_target(spark, catalogue):
    history = spark.createDataFrame(
        [("s1", "pm25", "r1", hours(0), 1.0), ("s1", "pm25", "r1", hours(1), 4.0)], HISTORY
    )
    origins = spark.createDataFrame([("s1", "pm25", hours(0))], ORIGINS)
    got = attach_actuals(persistence(history, origins, 2, catalogue), history)
    assert got.columns == [*FORECAST_COLUMNS, "y_true"]
    # step 1 -> 01:00 = 4.0; step 2 -> 02:00 has no history row -> null
    assert sorted((r.step, r.y_true) for r in got.collect()) == [(1, 4.0), (2, None)]


# -- metrics -------------------------------------------------------------------------------


def test_score_by_hand(spark):
    rows = spark.createDataFrame(
        [
            backtest_row("s1", 10.0, 12.0, 9.0, 13.0),  # e=2, ape .2, sape 4/22, inside
            backtest_row("s1", 0.0, 1.0, 2.0, 3.0),  # e=1, no ape (y=0), sape 2/1, outside
            backtest_row("s2", 0.0, 0.0),  # e=0, sape 0 (both zero), no interval
            backtest_row("s2", 4.0, 1.0, 0.0, 5.0),  # e=-3, ape .75, sape 6/5, inside
            backtest_row("s1", 5.0, None),  # no forecast -> n_missing
            backtest_row("s2", None, 3.0),  # no actual -> n_missing
        ],
        BACKTEST,
    )
    scale = spark.createDataFrame(
        [("s1", "pm25", 2.0), ("s2", "pm25", 0.5)], "sensor_id string, metric string, mase_scale double"
    )
    got = score(rows, ["model"], scale)
    expected = spark.createDataFrame(
        [
            (
                "m",
                4,
                2,
                (2 + 1 + 0 + 3) / 4,  # mae 1.5
                math.sqrt((4 + 1 + 0 + 9) / 4),  # rmse sqrt(3.5)
                100 * (0.2 + 0.75) / 2,  # mape 47.5, zero actuals left out
                100 * (4 / 22 + 2 + 0 + 6 / 5) / 4,  # smape 84.545...
                (2 / 2 + 1 / 2 + 0 / 0.5 + 3 / 0.5) / 4,  # mase 1.875
                2 / 3,  # coverage: 2 of the 3 rows with an interval
            )
        ],
        "model string, n long, n_missing long, mae double, rmse double, mape double, "
        "smape double, mase double, coverage double",
    )
    assert_approx_df_equality(got, expected, 1e-9, ignore_nullable=True)


def test_score_nulls_when_undefined(spark):
    # Only zero actuals and no intervals: mape and coverage undefined; smape 0 + 200.
    rows = spark.createDataFrame([backtest_row("s1", 0.0, 0.0), backtest_row("s1", 0.0, 2.0)], BACKTEST)
    got = score(rows, []).collect()[0]
    assert (got.n, got.mape, got.coverage, got.mase) == (2, None, None, None)
    assert got.smape == pytest.approx(100.0)  # (0 + 200) / 2
    assert got.mae == pytest.approx(1.0)


def test_mase_scale_uses_adjacent_grid_steps_only(spark, catalogue):
    values = {0: 1.0, 1: 3.0, 2: None, 3: 4.0, 4: 8.0, 6: 100.0}  # step 5 absent
    history = spark.createDataFrame(
        [("s1", "pm25", "r1", hours(h), v) for h, v in values.items()], HISTORY
    )
    got = mase_scale(history, catalogue).collect()
    # pairs (0,1): 2 and (3,4): 4; the gap at 2 and the jump 4 -> 6 are not pairs.
    assert [(r.sensor_id, r.metric, r.mase_scale) for r in got] == [("s1", "pm25", 3.0)]


def test_backtest_metrics_per_region_and_all(spark):
    rows = spark.createDataFrame(
        [
            backtest_row("s1", 1.0, 2.0, region="r1"),  # e=1
            backtest_row("s2", 1.0, 4.0, region="r2"),  # e=3
            backtest_row("s2", 1.0, 1.0, region="r2", step=2),  # e=0
        ],
        BACKTEST,
    )
    got = backtest_metrics(rows)
    assert tuple(got.columns) == BACKTEST_METRICS_COLUMNS
    summary = sorted((r.region, r.step, r.n, r.mae) for r in got.collect())
    assert summary == [("ALL", 1, 2, 2.0), ("ALL", 2, 1, 0.0), ("r1", 1, 1, 1.0), ("r2", 1, 1, 3.0), ("r2", 2, 1, 0.0)]


def test_champions_lowest_mean_rmse_with_alphabetical_tie_break(spark):
    metrics = spark.createDataFrame(
        [
            ("b", "r1", "pm25", 1, 1.0),
            ("b", "r1", "pm25", 2, 3.0),  # b: mean 2
            ("a", "r1", "pm25", 1, 2.0),
            ("a", "r1", "pm25", 2, 2.0),  # a: mean 2, ties with b -> a wins by name
            ("c", "r1", "pm25", 1, 0.5),
            ("c", "r1", "pm25", 2, None),  # c: mean over its one scored step = 0.5
            ("d", "r1", "pm25", 1, None),  # d: never scored -> not ranked
            ("c", "ALL", "pm25", 1, 7.0),  # only one model -> no runner-up
        ],
        "model string, region string, metric string, step int, rmse double",
    )
    got = champions(metrics)
    expected = spark.createDataFrame(
        [("r1", "pm25", "c", 0.5, "a", 2.0), ("ALL", "pm25", "c", 7.0, None, None)],
        "region string, metric string, champion_model string, rmse double, runner_up string, runner_up_rmse double",
    )
    assert_df_equality(got, expected, ignore_row_order=True, ignore_nullable=True)
    tie_only = champions(metrics.where(F.col("model").isin("a", "b"))).collect()[0]
    assert (tie_only.champion_model, tie_only.runner_up, tie_only.runner_up_rmse) == ("a", "b", 2.0)


# -- conformal -----------------------------------------------------------------------------


def test_conformal_quantile_finite_sample_rank(spark):
    # Group 1: residuals 1..10 (signs mixed: |y - yhat| is used).
    rows = [backtest_row("s1", 0.0, float(r if r % 2 else -r)) for r in range(1, 11)]
    # Group 2 (step 2): 5 residuals -> ceil(6 * .9) = 6 > 5 -> capped at the max, 50.
    rows += [backtest_row("s1", 0.0, 10.0 * r, step=2) for r in range(1, 6)]
    # Group 3 (step 3): no actuals -> n 0, q null.
    rows += [backtest_row("s1", None, 1.0, step=3)]
    bt = spark.createDataFrame(rows, BACKTEST)
    got = conformal_quantiles(bt, level=0.9, by=("model", "step"))
    expected = spark.createDataFrame(
        # ceil(11 * 0.9) = ceil(9.9) = 10 -> the 10th smallest = 10 (numpy's 0.9 quantile is 9.1)
        [("m", 1, 10, 10.0, False), ("m", 2, 5, 50.0, True), ("m", 3, 0, None, None)],
        "model string, step int, n_calib long, q double, q_capped boolean",
    )
    assert_df_equality(got, expected, ignore_row_order=True, ignore_nullable=True)
    # level 0.8: ceil(11 * .8) = ceil(8.8) = 9 -> 9.
    at80 = conformal_quantiles(bt.where("step = 1"), level=0.8, by=("model",)).collect()[0]
    assert (at80.q, at80.q_capped) == (9.0, False)


def test_conformal_rank_is_robust_to_float_rounding(spark):
    # 99 residuals 1..99 at level 0.07: (99 + 1) * 0.07 = 7.000000000000001 in floating
    # point; the rank must be 7, not 8.
    bt = spark.createDataFrame([backtest_row("s1", 0.0, float(r)) for r in range(1, 100)], BACKTEST)
    assert conformal_quantiles(bt, level=0.07, by=("model",)).collect()[0].q == 7.0


def test_apply_conformal_fills_only_rows_without_intervals_by_default(spark):
    forecasts = spark.createDataFrame(
        [
            ("persistence", "s1", "pm25", "r1", hours(0), hours(1), 1, 5.0, None, None),
            ("ar", "s1", "pm25", "r1", hours(0), hours(1), 1, 6.0, 1.0, 9.0),  # own interval
            ("persistence", "s1", "pm25", "r1", hours(0), hours(2), 2, 5.0, None, None),  # no quantile
            ("persistence", "s2", "pm25", None, hours(0), hours(1), 1, None, None, None),  # no y_pred
        ],
        FORECAST,
    )
    quantiles = spark.createDataFrame(
        [("persistence", "pm25", 1, 10, 2.0, False), ("ar", "pm25", 1, 10, 0.5, False)],
        "model string, metric string, step int, n_calib long, q double, q_capped boolean",
    )
    got = apply_conformal(forecasts, quantiles)
    assert got.columns == forecasts.columns
    bounds = {(r.model, r.sensor_id, r.step): (r.y_lower, r.y_upper) for r in got.collect()}
    assert bounds == {
        ("persistence", "s1", 1): (3.0, 7.0),  # 5 -/+ 2
        ("ar", "s1", 1): (1.0, 9.0),  # kept
        ("persistence", "s1", 2): (None, None),
        ("persistence", "s2", 1): (None, None),
    }
    refit = apply_conformal(forecasts, quantiles, ["ar"]).where("sensor_id = 's1'").collect()
    only_ar = {(r.model, r.step): (r.y_lower, r.y_upper) for r in refit}
    assert only_ar[("ar", 1)] == (5.5, 6.5)  # replaced: 6 -/+ 0.5
    assert only_ar[("persistence", 1)] == (None, None)  # not listed: untouched


def test_clip_to_physical_range(spark, catalogue):
    forecasts = spark.createDataFrame(
        [
            ("m", "s1", "pm25", "r1", hours(0), hours(1), 1, -2.0, -5.0, 1600.0),
            ("m", "s1", "pm25", "r1", hours(0), hours(2), 2, None, None, None),
            ("m", "s1", "unknown", "r1", hours(0), hours(1), 1, -2.0, -5.0, 1600.0),
        ],
        FORECAST,
    )
    got = sorted((r.metric, r.step, r.y_pred, r.y_lower, r.y_upper) for r in clip(forecasts, catalogue).collect())
    # pm25 is [0, 1500] ug/m3; nulls stay null; an unknown metric is not bounded.
    assert got == [
        ("pm25", 1, 0.0, 0.0, 1500.0),
        ("pm25", 2, None, None, None),
        ("unknown", 1, -2.0, -5.0, 1600.0),
    ]
