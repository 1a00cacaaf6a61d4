"""Unit tests of the bronze -> silver transforms on tiny hand-built frames."""

from __future__ import annotations

import datetime as dt

from chispa import assert_approx_df_equality, assert_df_equality
from pyspark.sql import functions as F

from citylake.transforms.silver import (
    attach_region,
    build_silver,
    complete_grid,
    fill_gaps,
    flag_outliers,
    resample,
    resolve_conflicts,
)

UTC = dt.timezone.utc
BRONZE = "sensor_id string, metric string, ts timestamp, value double, batch_id long, ingest_ts timestamp, source_file string"
GRID = "sensor_id string, metric string, ts timestamp, value double, n_readings int, n_conflicts int"
CLEAN = "sensor_id string, metric string, ts timestamp, value_clean double"


def at(day: int, hour: int, minute: int = 0) -> dt.datetime:
    """A UTC time in January 2026."""
    return dt.datetime(2026, 1, day, hour, minute, tzinfo=UTC)


def hourly(sensor: str, metric: str, values: list[float | None], start: dt.datetime | None = None) -> list[tuple]:
    """Grid rows of one hourly series starting at ``start`` (default 5 Jan 00:00)."""
    start = start or at(5, 0)
    return [
        (sensor, metric, start + dt.timedelta(hours=i), v, 0 if v is None else 1, 0)
        for i, v in enumerate(values)
    ]


def test_conflict_latest_batch_then_ingest_ts_then_file_wins(spark):
    t1, t2 = at(6, 1), at(6, 2)
    bronze = spark.createDataFrame(
        [
            ("s1", "pm25", at(5, 10), 5.0, 1, t1, "a.csv"),
            ("s1", "pm25", at(5, 10), 7.0, 2, t1, "b.csv"),  # later batch beats batch 1
            ("s1", "pm25", at(5, 10), 8.0, 2, t2, "a.csv"),  # same batch, later ingest wins
            ("s1", "pm25", at(5, 11), 3.0, 1, t1, "a.csv"),
            ("s1", "pm25", at(5, 11), 4.0, 1, t1, "b.csv"),  # all tied but the file name
            ("s2", "pm25", at(5, 10), 9.0, 1, t1, "a.csv"),
        ],
        BRONZE,
    )
    expected = spark.createDataFrame(
        [
            ("s1", "pm25", at(5, 10), 8.0, 2),
            ("s1", "pm25", at(5, 11), 4.0, 1),
            ("s2", "pm25", at(5, 10), 9.0, 0),
        ],
        "sensor_id string, metric string, ts timestamp, value double, n_conflicts int",
    )
    assert_df_equality(resolve_conflicts(bronze), expected, ignore_row_order=True, ignore_nullable=True)


def test_resample_sums_counts_and_averages_speeds(spark, catalogue):
    readings = spark.createDataFrame(
        [
            ("s1", "traffic_flow", at(5, 10, 1), 3.0, 0),
            ("s1", "traffic_flow", at(5, 10, 4), 4.0, 1),
            ("s1", "traffic_flow", at(5, 10, 5), 6.0, 0),  # next 5-minute step
            ("s1", "traffic_speed", at(5, 10, 1), 50.0, 0),
            ("s1", "traffic_speed", at(5, 10, 3), 61.0, 2),
        ],
        "sensor_id string, metric string, ts timestamp, value double, n_conflicts int",
    )
    expected = spark.createDataFrame(
        [
            ("s1", "traffic_flow", at(5, 10, 0), 7.0, 2, 1),
            ("s1", "traffic_flow", at(5, 10, 5), 6.0, 1, 0),
            ("s1", "traffic_speed", at(5, 10, 0), 55.5, 2, 2),
        ],
        GRID,
    )
    assert_df_equality(resample(readings, catalogue), expected, ignore_row_order=True, ignore_nullable=True)


def test_resample_drops_metrics_unknown_to_the_catalogue(spark, catalogue):
    readings = spark.createDataFrame([("s1", "nope", at(5, 10), 1.0)], "sensor_id string, metric string, ts timestamp, value double")
    assert resample(readings, catalogue).count() == 0


def test_grid_fills_missing_steps_of_days_with_data_only(spark, catalogue):
    steps = spark.createDataFrame(
        [("s1", "pm25", at(5, 0), 10.0, 1, 0), ("s1", "pm25", at(5, 2), 12.0, 2, 1),
         ("s1", "pm25", at(7, 23), 5.0, 1, 0)],  # 6 Jan is silent
        GRID,
    )
    grid = complete_grid(steps, catalogue)
    per_day = {r["d"]: r["n"] for r in grid.groupBy(F.to_date("ts").alias("d")).agg(F.count("*").alias("n")).collect()}
    assert per_day == {dt.date(2026, 1, 5): 24, dt.date(2026, 1, 7): 24}
    expected = spark.createDataFrame(
        [("s1", "pm25", at(5, 0), 10.0, 1, 0), ("s1", "pm25", at(5, 1), None, 0, 0), ("s1", "pm25", at(5, 2), 12.0, 2, 1)],
        GRID,
    )
    first_three = grid.where(F.col("ts") < at(5, 3))
    assert_df_equality(first_three, expected, ignore_row_order=True, ignore_nullable=True)


def test_grid_of_five_minute_metric_has_288_steps(spark, catalogue):
    steps = spark.createDataFrame([("s1", "traffic_flow", at(5, 13, 35), 4.0, 1, 0)], GRID)
    assert complete_grid(steps, catalogue).count() == 288


def test_obvious_spike_is_flagged_and_removed_from_value_clean(spark, catalogue):
    grid = spark.createDataFrame(hourly("s1", "pm25", [10.0, 12.0, 11.0, 500.0, 12.0, 10.0, None, 11.0]), GRID)
    flagged = flag_outliers(grid, catalogue)
    expected = spark.createDataFrame(
        [
            (r[0], r[1], r[2], r[3], r[3] is not None and r[3] > 100, None if r[3] is not None and r[3] > 100 else r[3])
            for r in hourly("s1", "pm25", [10.0, 12.0, 11.0, 500.0, 12.0, 10.0, None, 11.0])
        ],
        "sensor_id string, metric string, ts timestamp, value double, is_outlier boolean, value_clean double",
    )
    assert_df_equality(
        flagged.select("sensor_id", "metric", "ts", "value", "is_outlier", "value_clean"),
        expected,
        ignore_row_order=True,
        ignore_nullable=True,
    )


def test_flat_series_flags_only_changes_beyond_min_dev(spark, catalogue):
    # temperature: outlier_min_dev 8 degC. MAD is 0 on a flat series, so only the
    # absolute floor decides: +5 degC is kept, +30 degC is flagged.
    rows = hourly("small", "temperature", [10.0, 10.0, 10.0, 15.0, 10.0, 10.0, 10.0]) + hourly(
        "big", "temperature", [10.0, 10.0, 10.0, 40.0, 10.0, 10.0, 10.0]
    )
    flagged = flag_outliers(spark.createDataFrame(rows, GRID), catalogue)
    outliers = {(r["sensor_id"], r["ts"].hour) for r in flagged.where("is_outlier").collect()}
    assert outliers == {("big", 3)}
    small = flagged.where("sensor_id = 'small' AND value_clean = 15.0").count()
    assert small == 1


def test_outlier_window_is_the_metrics_not_the_widest(spark, catalogue):
    # pm25 window is 7 steps (3 each side); the widest catalogue window is 13. Step 6 = 200
    # among 10s within 3 steps is an outlier; with 6 steps each side the 200s at steps
    # 0-2 and 10-12 would make the median 200 and hide it.
    values = [200.0] * 3 + [10.0] * 3 + [200.0] + [10.0] * 3 + [200.0] * 3
    flagged = flag_outliers(spark.createDataFrame(hourly("s1", "pm25", values), GRID), catalogue)
    assert flagged.where(F.col("ts") == at(5, 6)).first()["is_outlier"] is True


def test_gap_of_two_filled_linearly_and_longer_gaps_left(spark, catalogue):
    # pm25 max_fill_gap = 3 steps.
    values = [10.0, None, None, 40.0, None, None, None, None, 90.0, None]
    df = spark.createDataFrame(
        [(s, m, ts, v) for s, m, ts, v, _, _ in hourly("s1", "pm25", values)], CLEAN
    )
    filled = fill_gaps(df, catalogue)
    expected_values = [10.0, 20.0, 30.0, 40.0, None, None, None, None, 90.0, None]
    expected = spark.createDataFrame(
        [
            (s, m, ts, v, i in (1, 2), v is None)
            for i, (s, m, ts, v, _, _) in enumerate(hourly("s1", "pm25", expected_values))
        ],
        "sensor_id string, metric string, ts timestamp, value_clean double, is_filled boolean, is_gap boolean",
    )
    assert_df_equality(filled, expected, ignore_row_order=True, ignore_nullable=True)


def test_gap_of_three_filled_at_limit_and_rain_never_filled(spark, catalogue):
    rows = hourly("s1", "pm25", [0.0, None, None, None, 8.0]) + hourly("s1", "rain", [1.0, None, 3.0])
    df = spark.createDataFrame([(s, m, ts, v) for s, m, ts, v, _, _ in rows], CLEAN)
    filled = fill_gaps(df, catalogue).where("metric = 'pm25' OR value_clean IS NULL")
    expected = spark.createDataFrame(
        [(s, m, ts, v, m == "pm25" and i in (1, 2, 3), v is None)
         for i, (s, m, ts, v, _, _) in enumerate(hourly("s1", "pm25", [0.0, 2.0, 4.0, 6.0, 8.0]))]
        + [("s1", "rain", at(5, 1), None, False, True)],
        "sensor_id string, metric string, ts timestamp, value_clean double, is_filled boolean, is_gap boolean",
    )
    assert_approx_df_equality(filled, expected, 1e-12, ignore_row_order=True, ignore_nullable=True)


def test_region_from_current_sensor_row(spark):
    sensors = spark.createDataFrame(
        [
            ("s1", "old", at(1, 0), False),
            ("s1", "new", at(4, 0), True),
            ("s2", "r2", at(1, 0), True),
        ],
        "sensor_id string, region string, valid_from timestamp, is_current boolean",
    )
    df = spark.createDataFrame([("s1",), ("s2",), ("s9",)], "sensor_id string")
    expected = spark.createDataFrame([("s1", "new"), ("s2", "r2"), ("s9", None)], "sensor_id string, region string")
    assert_df_equality(attach_region(df, sensors), expected, ignore_row_order=True, ignore_nullable=True)


def test_build_silver_composes_all_rules(spark, catalogue):
    t = at(6, 0)
    values = {h: 20.0 + h for h in range(24) if h not in (5, 6)}  # 05:00 and 06:00 missing
    values[11] = 900.0  # spike
    bronze_rows = [("s1", "pm25", at(5, h), v, 1, t, "a.csv") for h, v in values.items()]
    bronze_rows.append(("s1", "pm25", at(5, 11, 30), 31.0, 1, t, "a.csv"))  # same step, other minute
    bronze_rows.append(("s1", "pm25", at(5, 3), 1.0, 0, t, "a.csv"))  # older batch loses
    bronze = spark.createDataFrame(bronze_rows, BRONZE)
    sensors = spark.createDataFrame(
        [("s1", "r1", at(1, 0), True)], "sensor_id string, region string, valid_from timestamp, is_current boolean"
    )
    now = dt.datetime(2026, 1, 7, tzinfo=UTC)
    silver = build_silver(bronze, sensors, catalogue, now)
    assert silver.columns == catalogue.table("silver_readings").column_names
    rows = {r["ts"].hour: r for r in silver.collect()}
    assert len(rows) == 24
    assert (rows[3]["value"], rows[3]["n_conflicts"], rows[3]["n_readings"]) == (23.0, 1, 1)
    assert rows[11]["value"] == (900.0 + 31.0) / 2 and rows[11]["is_outlier"] and rows[11]["n_readings"] == 2
    assert rows[11]["value_clean"] == 31.0 and rows[11]["is_filled"]  # outlier, then interpolated
    assert [rows[h]["value_clean"] for h in (5, 6)] == [25.0, 26.0]
    assert all(rows[h]["is_filled"] and not rows[h]["is_gap"] for h in (5, 6))
    assert {r["region"] for r in rows.values()} == {"r1"}
    assert {r["reading_date"] for r in rows.values()} == {dt.date(2026, 1, 5)}
    assert {r["updated_ts"] for r in rows.values()} == {now.replace(tzinfo=None)}
