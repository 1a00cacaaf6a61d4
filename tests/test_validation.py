"""Great Expectations validation: generated suites (pure) and real GX runs on Spark."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from citylake.catalogue import ColumnSpec, TableSpec
from citylake.config import ValidationConfig
from citylake.lake import Lake
from citylake.quality.expectations import build_suite
from citylake.stages.validate import (
    ValidationFailed,
    check,
    gx_root,
    open_gx_context,
    recent_batch_counts,
    validate_table,
)
from conftest import make_config

REF = dt.datetime(2026, 1, 6, 0, 0)
T0 = dt.datetime(2026, 1, 5, 10, 0)


# -- fixtures: one lake and one GX project for the module (GX and Delta setup are slow) --
@pytest.fixture(scope="module")
def vlake(spark, catalogue, tmp_path_factory) -> Lake:
    return Lake(spark, make_config(tmp_path_factory.mktemp("vlake") / "lake"), catalogue)


@pytest.fixture(scope="module")
def gx_ctx(vlake):
    return open_gx_context(vlake)


def _loose(struct: T.StructType) -> T.StructType:
    """The table schema with every column nullable, so tests can build bad rows."""
    return T.StructType([T.StructField(f.name, f.dataType, True) for f in struct.fields])


def bronze_df(lake: Lake, readings: list[tuple]) -> DataFrame:
    """Bronze-shaped rows from ``(sensor_id, metric, ts, value)`` tuples."""
    rows = [
        (s, m, ts, v, ts.date(), None, "raw/f.csv", "csv", 1, REF)
        for s, m, ts, v in readings
    ]
    return lake.spark.createDataFrame(rows, _loose(lake.spec("bronze_readings").struct()))


def silver_df(lake: Lake, readings: list[tuple]) -> DataFrame:
    """Silver-shaped rows from ``(sensor_id, metric, ts, value)`` tuples."""
    rows = [
        (s, m, "r1", ts, ts.date(), v, 1, 0, False, v, False, False, REF)
        for s, m, ts, v in readings
    ]
    return lake.spark.createDataFrame(rows, _loose(lake.spec("silver_readings").struct()))


GOOD = [
    ("air-1", "pm25", T0, 12.5),
    ("air-1", "pm25", T0 + dt.timedelta(hours=1), 14.0),
    ("air-2", "no2", T0, 40.0),
    ("loop-1", "traffic_flow", T0, 120.0),
]


def _results(lake: Lake, run_id: str) -> list:
    return lake.read("validation_results").where(F.col("run_id") == run_id).collect()


# -- build_suite (no Spark, no GX run) ------------------------------------------------------
def test_bronze_suite_from_catalogue(catalogue):
    suite = build_suite(
        catalogue.table("bronze_readings"), catalogue, ValidationConfig(), REF, [100, 300]
    )
    by_key = suite.by_key()
    # not-null, critical, for exactly the nullable: false columns
    not_null = {k.split(":")[1] for k in by_key if k.startswith("not_null:")}
    declared = {c.name for c in catalogue.table("bronze_readings").columns if not c.nullable}
    assert not_null == declared and "extra_json" not in not_null
    assert all(by_key[f"not_null:{c}"].critical for c in not_null)
    # a range per catalogue metric with its bounds, filtered on the metric
    pm25 = by_key["range:value:pm25"]
    assert pm25.critical and pm25.where == (("metric", "pm25"),)
    assert (pm25.kwargs["min_value"], pm25.kwargs["max_value"]) == (0.0, 1500.0)
    assert by_key["range:value:temperature"].kwargs["min_value"] == -60.0
    assert len([k for k in by_key if k.startswith("range:")]) == len(catalogue.metrics)
    assert by_key["metric_in_catalogue"].critical
    assert set(by_key["metric_in_catalogue"].kwargs["value_set"]) == set(catalogue.metrics)
    # bronze keeps conflicting re-sends: uniqueness only warns
    assert by_key["unique_keys"].kwargs["column_list"] == ["sensor_id", "metric", "ts"]
    assert not by_key["unique_keys"].critical
    # freshness and row count are warnings
    fresh = by_key["freshness"]
    assert not fresh.critical
    assert fresh.kwargs == {"column": "ts", "min_value": REF - dt.timedelta(hours=48)}
    assert by_key["row_count"].kwargs == {"min_value": 20, "max_value": 2000}
    assert not by_key["row_count"].critical


def test_silver_suite_criticality_and_value_columns(catalogue):
    suite = build_suite(
        catalogue.table("silver_readings"), catalogue, ValidationConfig(), None, [],
        metrics_present=["pm25", "not_a_metric"],
    )
    keys = set(suite.by_key())
    assert suite.by_key()["unique_keys"].critical
    # only metrics present (and known) get a range, on both value columns
    assert {k for k in keys if k.startswith("range:")} == {"range:value:pm25", "range:value_clean:pm25"}
    # no reference time, no history: no freshness or row-count expectation
    assert "freshness" not in keys and "row_count" not in keys
    gold = build_suite(catalogue.table("gold_features"), catalogue, ValidationConfig(), None, [],
                       metrics_present=["no2"])
    assert {k for k in gold.by_key() if k.startswith("range:")} == {"range:value:no2"}


def test_tiny_table_spec(catalogue):
    table = TableSpec(
        name="tiny", path="x/tiny", layer="meta", description="",
        columns=(ColumnSpec("id", "bigint", False), ColumnSpec("at", "timestamp"),
                 ColumnSpec("note", "string")),
        keys=("id",), unique_keys="critical", time_column="at",
    )
    suite = build_suite(table, catalogue, ValidationConfig(freshness_hours=2), REF, [0, 0])
    assert [(e.key, e.critical) for e in suite.expectations] == [
        ("not_null:id", True), ("unique_keys", True), ("freshness", False),
    ]  # all-zero history: no row-count bound
    assert suite.expectations[2].kwargs["min_value"] == REF - dt.timedelta(hours=2)
    no_unique = build_suite(
        dataclasses.replace(table, unique_keys=None), catalogue, ValidationConfig(), None, [5]
    )
    assert [e.key for e in no_unique.expectations] == ["not_null:id", "row_count"]


def test_suite_converts_to_gx(catalogue):
    from great_expectations.expectations.metadata_types import FailureSeverity

    spec = build_suite(catalogue.table("bronze_readings"), catalogue, ValidationConfig(), REF, [10],
                       metrics_present=["pm25"])
    suite = spec.to_gx()
    assert len(suite.expectations) == len(spec)
    by_key = {e.meta["citylake_key"]: e for e in suite.expectations}
    assert by_key["unique_keys"].severity == FailureSeverity.WARNING
    assert by_key["range:value:pm25"].severity == FailureSeverity.CRITICAL
    assert repr(by_key["range:value:pm25"].row_condition) == "metric == pm25"


# -- validate_table: real GX on Spark ---------------------------------------------------------
def test_good_bronze_passes_and_persists(vlake, gx_ctx):
    report = validate_table(
        vlake, "bronze_readings", bronze_df(vlake, GOOD), "batch 1",
        reference_ts=REF, recent_counts=[4, 5], context=gx_ctx,
    )
    assert report.success, report.critical_failures
    assert report.warnings == []
    rows = _results(vlake, report.run_id)
    assert len(rows) == report.n_expectations
    assert all(r["success"] for r in rows)
    assert {r["table_name"] for r in rows} == {"bronze_readings"}
    # one range expectation per metric present in the data
    ranges = [r for r in rows if r["expectation_type"] == "expect_column_values_to_be_between"]
    assert sorted(json.loads(r["kwargs_json"])["row_condition"] for r in ranges) == [
        "metric == 'no2'", "metric == 'pm25'", "metric == 'traffic_flow'",
    ]
    row_count = next(r for r in rows if r["expectation_type"] == "expect_table_row_count_to_be_between")
    assert row_count["observed_value"] == "4" and not row_count["critical"]
    # GX stores and Data Docs under the lake's gx folder
    root = Path(gx_root(vlake))
    assert root == Path(vlake.root) / "gx"
    assert report.data_docs_path == str(root / "uncommitted/data_docs/local_site/index.html")
    assert Path(report.data_docs_path).is_file()
    assert (root / "expectations" / "bronze_readings.json").is_file()
    assert list((root / "uncommitted" / "validations").rglob("*.json"))


def test_critical_failures_raise_and_are_saved(vlake, gx_ctx):
    bad = GOOD + [("air-3", "pm25", T0, 5000.0), (None, "no2", T0, 10.0)]
    with pytest.raises(ValidationFailed) as caught:
        validate_table(vlake, "bronze_readings", bronze_df(vlake, bad), "batch 2", context=gx_ctx)
    message = str(caught.value)
    assert "bronze_readings" in message and "batch 2" in message
    assert "2 critical expectation(s)" in message
    range_line = next(line for line in message.splitlines() if "pm25" in line)
    assert "column value" in range_line and "1 of 3 rows unexpected" in range_line
    assert any("sensor_id" in line and "1 of 6" in line for line in message.splitlines())
    report = caught.value.report
    rows = _results(vlake, report.run_id)
    assert len(rows) == report.n_expectations
    failed = {(r["column"], r["unexpected_count"]) for r in rows if not r["success"]}
    assert failed == {("value", 1), ("sensor_id", 1)}
    assert all(r["critical"] for r in rows if not r["success"])


def test_duplicate_keys_warn_in_bronze_fail_in_silver(vlake, gx_ctx):
    dup = GOOD + [GOOD[0]]
    report = validate_table(vlake, "bronze_readings", bronze_df(vlake, dup), "dups", context=gx_ctx)
    assert report.success and report.critical_failures == []
    assert len(report.warnings) == 1 and "unique" in report.warnings[0]

    silver = validate_table(vlake, "silver_readings", silver_df(vlake, dup), "dates 2026-01-05",
                            raise_on_critical=False, context=gx_ctx)
    assert not silver.success
    assert len(silver.critical_failures) == 1
    assert "sensor_id,metric,ts" in silver.critical_failures[0]
    assert "2 of 5 rows unexpected" in silver.critical_failures[0]
    with pytest.raises(ValidationFailed, match="silver_readings"):
        check(silver)


def test_stale_data_and_odd_size_only_warn(vlake, gx_ctx):
    report = validate_table(
        vlake, "bronze_readings", bronze_df(vlake, GOOD), "backfill",
        reference_ts=dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc), recent_counts=[1000, 1200],
        context=gx_ctx,
    )
    assert report.success
    assert len(report.warnings) == 2
    fresh = next(w for w in report.warnings if "newest ts" in w)
    assert "2026-01-05 11:00:00" in fresh
    assert any("row count" in w and "observed 4" in w for w in report.warnings)


def test_recent_batch_counts(vlake):
    assert recent_batch_counts(vlake, 3) == []  # no ingest log yet
    spec = vlake.spec("ingest_log")
    rows = [
        (b, REF, REF, 1, 0, n, n, 0, 0, 0, 0, [REF.date()])
        for b, n in [(1, 10), (2, 20), (3, 30), (4, 40)]
    ]
    vlake.append("ingest_log", vlake.spark.createDataFrame(rows, spec.struct()))
    assert recent_batch_counts(vlake, 3) == [40, 30, 20]
    assert recent_batch_counts(vlake, 2, before_batch=4) == [30, 20]
