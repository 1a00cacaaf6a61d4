"""The AR fit's direct reader (Parquet files read in the Python workers) against Spark's."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from chispa import assert_approx_df_equality
from pyspark.sql import functions as F

from citylake.forecast import ar_direct, ar_spark
from test_ar import P, START, STEP, simulated_panel, silver_frame

FITTED = dt.datetime(2026, 2, 1, tzinfo=dt.timezone.utc)


def messy_frame() -> pd.DataFrame:
    """Silver rows of 6 traffic series plus: an hourly pm25 series with a NaN, a metric
    outside the catalogue, a duplicated step (the larger value must win), and a series
    that changes region for its newest steps."""
    frame = silver_frame(simulated_panel())
    hourly = frame[frame["sensor_id"] == "s0"].iloc[:120].copy()
    hourly["metric"] = "pm25"
    hourly["ts"] = START + pd.Timedelta(hours=1) * np.arange(len(hourly))
    hourly.loc[hourly.index[30], "value_clean"] = np.nan
    unknown = frame[frame["sensor_id"] == "s1"].iloc[:50].copy()
    unknown["metric"] = "not_in_catalogue"
    duplicate = frame[frame["sensor_id"] == "s3"].iloc[[60]].copy()
    duplicate["value_clean"] += 500.0
    frame.loc[(frame["sensor_id"] == "s5") & (frame["ts"] > START + STEP * 290), "region"] = "east"
    out = pd.concat([frame, hourly, unknown, duplicate], ignore_index=True)
    out["reading_date"] = out["ts"].dt.date
    return out.sample(frac=1.0, random_state=7)


@pytest.fixture(scope="module")
def silver_table(spark, tmp_path_factory):
    """The messy rows as a Delta table of several files in date partitions."""
    path = str(tmp_path_factory.mktemp("ar_direct") / "silver")
    df = spark.createDataFrame(messy_frame()).repartition(4)
    df.write.format("delta").partitionBy("reading_date").save(path)
    return path


def both(spark, path, **kwargs):
    """(direct, Spark reader) fits of the same table with the same arguments."""
    fitted_ts = F.lit(FITTED)
    direct = ar_direct.fit_ar_table(spark, path, fitted_ts=fitted_ts, **kwargs)
    spark_reader = ar_direct.fit_ar_table(spark, path, fitted_ts=fitted_ts, reader="spark", **kwargs)
    return direct, spark_reader


def assert_same(direct, spark_reader):
    """Equal tables: scalars by chispa (1e-9), the coefficient arrays by numpy (chispa
    compares arrays exactly, and the two paths sum in different orders)."""
    assert direct.columns == spark_reader.columns
    assert_approx_df_equality(direct.drop("coefs"), spark_reader.drop("coefs"), 1e-9,
                              ignore_row_order=True, ignore_nullable=True)
    keys = ["sensor_id", "metric"]
    left = direct.select(*keys, "coefs").toPandas().sort_values(keys)
    right = spark_reader.select(*keys, "coefs").toPandas().sort_values(keys)
    for a, b in zip(left["coefs"], right["coefs"]):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)


def test_plan_reads_a_partitioned_table_directly(spark, silver_table):
    # A cached DataFrame of the same table (the backtest caches gold) must not hide its
    # files: Spark's inputFiles() lists none for a cached plan.
    cached = spark.read.format("delta").load(silver_table).cache()
    cached.count()
    try:
        plan, reason = ar_direct.plan_direct(spark, silver_table, tasks=3)
    finally:
        cached.unpersist()
    assert reason == "ok" and plan is not None
    assert plan.value_column == "value_clean" and plan.tasks == 3
    assert len(plan.files) > 1 and all(f.endswith(".parquet") for f in plan.files)
    assert "reading_date" not in plan.columns


@pytest.mark.parametrize("tasks", [1, 3])
def test_direct_reader_gives_the_spark_readers_table(spark, silver_table, tasks):
    direct, spark_reader = both(spark, silver_table, p=P, tasks=tasks)
    rows = direct.toPandas().set_index(["sensor_id", "metric"])
    # every series once, whatever task read it; the unknown metric has no model
    assert len(rows) == 7 and not rows.index.duplicated().any()
    assert "not_in_catalogue" not in set(rows.index.get_level_values("metric"))
    assert rows.loc[("s5", "traffic_flow"), "region"] == "east"
    assert rows.loc[("s0", "pm25"), "interval_s"] == 3600
    assert_same(direct, spark_reader)


def test_direct_reader_matches_on_cutoff_metrics_and_order_selection(spark, silver_table):
    cutoff = (START + STEP * 200).to_pydatetime()
    direct, spark_reader = both(spark, silver_table, candidates=[1, 2, 3], criterion="bic",
                                ts_max=cutoff, metrics=["traffic_flow"], tasks=2)
    ends = direct.select(F.max("train_end")).first()[0]
    assert ends <= cutoff.replace(tzinfo=None)
    assert {r.metric for r in direct.select("metric").distinct().collect()} == {"traffic_flow"}
    assert_same(direct, spark_reader)


def test_direct_reader_matches_without_filled_points_and_on_recent_steps(spark, silver_table):
    assert_same(*both(spark, silver_table, p=P, use_filled=False, max_steps=150, tasks=2))


def test_gold_value_column_and_fallback_for_tables_it_cannot_read(spark, tmp_path):
    frame = messy_frame().rename(columns={"value_clean": "value"}).drop(columns=["is_gap"])
    gold = str(tmp_path / "gold")
    spark.createDataFrame(frame).write.format("delta").save(gold)
    plan, _ = ar_direct.plan_direct(spark, gold)
    assert plan is not None and plan.value_column == "value"
    assert_same(*both(spark, gold, p=P))

    by_metric = str(tmp_path / "by_metric")
    spark.createDataFrame(frame).write.format("delta").partitionBy("metric").save(by_metric)
    plan, reason = ar_direct.plan_direct(spark, by_metric)
    assert plan is None and "partition columns" in reason
    # the fit still runs, through Spark's reader
    assert ar_direct.fit_ar_table(spark, by_metric, p=P).count() == 7

    with_dv = str(tmp_path / "with_dv")
    spark.createDataFrame(frame).write.format("delta").option("delta.enableDeletionVectors", "true").save(with_dv)
    plan, reason = ar_direct.plan_direct(spark, with_dv)
    assert plan is None and "deletion vectors" in reason


def test_plan_sizes_tasks_by_rows_and_refuses_remote_or_huge_tables(spark, silver_table, monkeypatch):
    plan, _ = ar_direct.plan_direct(spark, silver_table, tasks=1)
    assert plan.tasks == 1
    monkeypatch.setattr(ar_direct, "MAX_ROWS_PER_TASK", 500)  # the table has ~2,000 rows
    plan, _ = ar_direct.plan_direct(spark, silver_table, tasks=1)
    assert plan is not None and plan.tasks == 4
    monkeypatch.setattr(ar_direct, "MAX_ROWS_PER_TASK", 100)
    plan, reason = ar_direct.plan_direct(spark, silver_table)
    assert plan is None and "more than 8" in reason
    plan, reason = ar_direct.plan_direct(spark, "s3://bucket/lake/gold/features")
    assert plan is None and "s3://" in reason


def test_files_from_before_a_column_and_far_future_rows_match(spark, tmp_path):
    """Old files lack the value column (Spark reads null there: unusable rows); a row in
    2300 (past INT96-as-nanoseconds' range) must stay beyond a 2026 cutoff."""
    frame = messy_frame()
    path = str(tmp_path / "evolving")
    early = frame[frame["sensor_id"].isin(["s0", "s1"])].drop(columns=["value_clean", "is_gap", "is_filled"])
    spark.createDataFrame(early.assign(value=early["ts"].dt.minute.astype(float))).write.format("delta").save(path)
    (spark.createDataFrame(frame).write.format("delta").mode("append").option("mergeSchema", "true").save(path))
    plan, _ = ar_direct.plan_direct(spark, path)
    assert plan is not None and plan.value_column == "value_clean"
    assert_same(*both(spark, path, p=P, tasks=2))

    far = frame[frame["sensor_id"] == "s2"].iloc[[0]].copy()
    far_rows = spark.createDataFrame(far).withColumn("ts", F.lit(dt.datetime(2300, 1, 1, tzinfo=dt.timezone.utc)))
    far_rows.withColumn("value_clean", F.lit(1e6)).write.format("delta").mode("append").save(path)
    cutoff = (START + STEP * 250).to_pydatetime()
    direct, spark_reader = both(spark, path, p=P, ts_max=cutoff, tasks=2)
    assert direct.where("sensor_id = 's2'").first()["train_end"] <= cutoff.replace(tzinfo=None)
    assert_same(direct, spark_reader)


def test_bad_reader_name_is_refused(spark, silver_table):
    with pytest.raises(ValueError, match="reader"):
        ar_direct.fit_ar_table(spark, silver_table, reader="pandas")


def test_string_hash_is_stable_and_slice_safe():
    strings = pa.array(["s0", "", None, "traffic_flow", "bench-00042", "s0"])
    hashes = ar_direct.string_hash(strings)
    assert hashes.dtype == np.uint64 and hashes[2] == 0
    assert hashes[0] == hashes[5] and len(set(hashes[[0, 1, 3, 4]].tolist())) == 4
    np.testing.assert_array_equal(ar_direct.string_hash(strings.slice(3, 2)), hashes[3:5])
    # fixed values: the same in every process (Python's own hash() is salted per process)
    assert int(hashes[0]) == int(ar_direct.string_hash(pa.array(["s0"]))[0])
    assert int(ar_direct.string_hash(pa.array(["ab"]))[0]) == EXPECTED_AB


EXPECTED_AB = 3057618358981117701  # pinned: a change re-deals series over the tasks
