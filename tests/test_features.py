"""Unit tests of the silver -> gold transforms on tiny hand-built frames."""

from __future__ import annotations

import datetime as dt
import math

from chispa import assert_approx_df_equality, assert_df_equality
from pyspark.sql import functions as F

from citylake.transforms.features import build_features, feature_columns, lookback_days, region_hourly

UTC = dt.timezone.utc
SILVER = (
    "sensor_id string, metric string, region string, ts timestamp, reading_date date, "
    "value_clean double, is_filled boolean, is_outlier boolean"
)


def at(day: int, hour: int, minute: int = 0) -> dt.datetime:
    """A UTC time in January 2026 (5 Jan 2026 is a Monday)."""
    return dt.datetime(2026, 1, day, hour, minute, tzinfo=UTC)


def row(sensor: str, ts: dt.datetime, value: float | None, metric: str = "pm25", region: str | None = "r1") -> tuple:
    return (sensor, metric, region, ts, ts.date(), value, False, False)


def test_feature_columns_follow_tables_yaml_patterns(catalogue):
    cols = feature_columns([1, 24], [3], catalogue)
    assert [c.name for c in cols] == ["lag_1", "lag_24", "roll_mean_3", "roll_std_3"]
    assert {c.type for c in cols} == {"double"}


def test_lags_and_rolling_stats_by_hand(spark):
    silver = spark.createDataFrame([row("s1", at(5, h), v) for h, v in enumerate([1.0, 2.0, 4.0, 8.0, 16.0])], SILVER)
    got = build_features(silver, lags=[1, 2], windows=[2], intervals={"pm25": 3600})
    expected = spark.createDataFrame(
        [
            (at(5, 0), 1.0, None, None, None, None),
            (at(5, 1), 2.0, 1.0, None, 1.0, None),
            (at(5, 2), 4.0, 2.0, 1.0, 1.5, math.sqrt(0.5)),
            (at(5, 3), 8.0, 4.0, 2.0, 3.0, math.sqrt(2.0)),
            (at(5, 4), 16.0, 8.0, 4.0, 6.0, math.sqrt(8.0)),
        ],
        "ts timestamp, value double, lag_1 double, lag_2 double, roll_mean_2 double, roll_std_2 double",
    )
    assert_approx_df_equality(
        got.select("ts", "value", "lag_1", "lag_2", "roll_mean_2", "roll_std_2"),
        expected,
        1e-12,
        ignore_row_order=True,
        ignore_nullable=True,
    )


def test_lags_count_grid_steps_not_rows(spark):
    # 02:00 is absent (e.g. a silent day): at 03:00, lag_1 is the missing step, not 01:00;
    # lag_2 is 01:00. The interval is inferred (1 h) when not given.
    silver = spark.createDataFrame([row("s1", at(5, h), float(h)) for h in (0, 1, 3)], SILVER)
    for intervals in ({"pm25": 3600}, None):
        got = build_features(silver, lags=[1, 2], windows=[3], intervals=intervals).where(F.col("ts") == at(5, 3)).first()
        assert got["lag_1"] is None
        assert got["lag_2"] == 1.0
        assert got["roll_mean_3"] == 0.5  # steps 0..2: 0 and 1, the absent step ignored


def test_lag_and_roll_ignore_other_series(spark):
    silver = spark.createDataFrame(
        [row("s1", at(5, 0), 1.0), row("s1", at(5, 1), 2.0), row("s2", at(5, 0), 100.0), row("s2", at(5, 1), 200.0)],
        SILVER,
    )
    got = {r["sensor_id"]: r for r in build_features(silver, [1], [2], {"pm25": 3600}).where(F.col("ts") == at(5, 1)).collect()}
    assert (got["s1"]["lag_1"], got["s2"]["lag_1"]) == (1.0, 100.0)
    assert (got["s1"]["roll_mean_2"], got["s2"]["roll_mean_2"]) == (1.0, 100.0)


def test_region_mean_over_sensors_of_the_region_and_metric(spark):
    ts = at(5, 10)
    silver = spark.createDataFrame(
        [
            row("a", ts, 10.0),
            row("b", ts, 20.0),
            row("c", ts, None),  # no usable value: not counted
            row("d", ts, 99.0, region="r2"),
            row("e", ts, 50.0, metric="no2"),  # other metric
            row("f", ts, 7.0, region=None),  # unknown region
            row("a", at(5, 11), 1000.0),  # other time
        ],
        SILVER,
    )
    got = build_features(silver, [1], [2], {"pm25": 3600, "no2": 3600}).where(F.col("ts") == ts)
    expected = spark.createDataFrame(
        [("a", 15.0, 2), ("b", 15.0, 2), ("c", 15.0, 2), ("d", 99.0, 1), ("e", 50.0, 1), ("f", None, 0)],
        "sensor_id string, region_mean double, region_n_sensors int",
    )
    assert_df_equality(
        got.select("sensor_id", "region_mean", "region_n_sensors"), expected, ignore_row_order=True, ignore_nullable=True
    )


def test_cyclical_time_features_at_known_hours(spark):
    # 5 Jan 2026 is a Monday (weekday 0); 8 Jan a Thursday (weekday 3).
    silver = spark.createDataFrame([row("s1", ts, 1.0) for ts in (at(5, 0), at(5, 6), at(8, 18))], SILVER)
    got = build_features(silver, [1], [2], {"pm25": 3600}).select("ts", "hour_sin", "hour_cos", "dow_sin", "dow_cos")
    thu = 2 * math.pi * 3 / 7
    expected = spark.createDataFrame(
        [
            (at(5, 0), 0.0, 1.0, 0.0, 1.0),
            (at(5, 6), 1.0, 0.0, 0.0, 1.0),
            (at(8, 18), -1.0, 0.0, math.sin(thu), math.cos(thu)),
        ],
        "ts timestamp, hour_sin double, hour_cos double, dow_sin double, dow_cos double",
    )
    assert_approx_df_equality(got, expected, 1e-9, ignore_row_order=True, ignore_nullable=True)


def test_build_features_has_gold_columns_in_order(spark, catalogue):
    silver = spark.createDataFrame([row("s1", at(5, 0), 1.0)], SILVER)
    got = build_features(silver, [1, 3], [2], {"pm25": 3600})
    spec = catalogue.table("gold_features")
    assert got.columns == spec.column_names + [c.name for c in feature_columns([1, 3], [2], catalogue)]


def test_region_hourly_sum_and_mean_metrics(spark, catalogue):
    rows = [
        # traffic_flow (sum): s1 has 3 points in 10:xx, s2 one point and one gap.
        row("s1", at(5, 10, 0), 1.0, "traffic_flow"),
        row("s1", at(5, 10, 5), 2.0, "traffic_flow"),
        row("s1", at(5, 10, 10), 3.0, "traffic_flow"),
        row("s2", at(5, 10, 0), 10.0, "traffic_flow"),
        row("s2", at(5, 10, 5), None, "traffic_flow"),
        # traffic_speed (mean): sensor means 55 and 70.
        row("s1", at(5, 10, 0), 50.0, "traffic_speed"),
        row("s1", at(5, 10, 5), 60.0, "traffic_speed"),
        row("s2", at(5, 10, 55), 70.0, "traffic_speed"),
        row("s3", at(5, 11, 0), 5.0, "traffic_speed"),  # next hour
        row("s4", at(5, 10, 0), 5.0, "traffic_speed", region=None),  # no region: left out
    ]
    got = region_hourly(spark.createDataFrame(rows, SILVER), catalogue)
    expected = spark.createDataFrame(
        [
            ("r1", "traffic_flow", "vehicles", at(5, 10), dt.date(2026, 1, 5), 2, 4, 4.0, 1.0, 10.0, 16.0),
            ("r1", "traffic_speed", "km/h", at(5, 10), dt.date(2026, 1, 5), 2, 3, 60.0, 50.0, 70.0, 125.0),
            ("r1", "traffic_speed", "km/h", at(5, 11), dt.date(2026, 1, 5), 1, 1, 5.0, 5.0, 5.0, 5.0),
        ],
        "region string, metric string, unit string, hour_ts timestamp, reading_date date, n_sensors int, "
        "n_points int, value_mean double, value_min double, value_max double, value_total double",
    )
    assert_approx_df_equality(got, expected, 1e-12, ignore_row_order=True, ignore_nullable=True)
    assert got.columns == catalogue.table("gold_region_hourly").column_names


def test_lookback_days_uses_the_longest_interval(catalogue):
    assert lookback_days([1, 24], [3], catalogue) == 1  # 24 steps x 1 h
    assert lookback_days([1, 25], [3], catalogue) == 2
