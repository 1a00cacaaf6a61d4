"""Unit tests of the record transforms: each bad-record kind ends up with its reason."""

from __future__ import annotations

import datetime as dt

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from citylake.transforms import records as R

NOW = dt.datetime(2026, 1, 6, 12, 0, tzinfo=dt.timezone.utc)
HEADER = ["sensor_id", "ts", "metric", "value", "firmware"]


def _lines(spark, lines, fmt="csv", source="f.csv"):
    return spark.createDataFrame([(source, fmt, line) for line in lines],
                                 "source_file string, source_format string, raw_record string")


def _typed(spark, catalogue, lines, fmt="csv"):
    df = _lines(spark, lines, fmt)
    required = catalogue.required_fields
    records = R.csv_records(df, HEADER, required) if fmt == "csv" else R.json_records(df, required)
    known = spark.createDataFrame([("s1",), ("s2",)], "sensor_id string")
    return R.type_records(records, catalogue, known, NOW)


GOOD = "s1,2026-01-05T08:00:00Z,traffic_flow,12,v1"

CASES = [
    ("s1,2026-01-05T08:00:00Z,traffic_flow,12,v1,extra,more", "unparseable_line"),
    ("s1,,traffic_flow,12,v1", "missing_field"),
    ("s1,2026-01-05T08:00:00Z,traffic_flow", "missing_field"),
    ("s1,2026-01-05 08:00:00,traffic_flow,12,v1", "bad_timestamp"),
    ("s1,2026-13-45T99:00:00Z,traffic_flow,12,v1", "bad_timestamp"),
    ("s1,1999-12-31T23:59:59Z,traffic_flow,12,v1", "timestamp_out_of_range"),
    ("s1,2026-01-07T12:00:01Z,traffic_flow,12,v1", "timestamp_out_of_range"),
    ("s1,2026-01-05T08:00:00Z,traffic_flux,12,v1", "unknown_metric"),
    ("s1,2026-01-05T08:00:00Z,traffic_flow,abc,v1", "bad_value"),
    ("s1,2026-01-05T08:00:00Z,traffic_flow,NaN,v1", "non_finite_value"),
    ("s1,2026-01-05T08:00:00Z,traffic_flow,Infinity,v1", "non_finite_value"),
    ("s1,2026-01-05T08:00:00Z,traffic_flow,1001,v1", "value_out_of_range"),
    ("s1,2026-01-05T08:00:00Z,traffic_flow,-1,v1", "value_out_of_range"),
    ("s7,2026-01-05T08:00:00Z,traffic_flow,12,v1", "unknown_sensor"),
    (GOOD, None),
]


def test_every_bad_kind_gets_its_reason(spark, catalogue):
    typed = _typed(spark, catalogue, [line for line, _ in CASES])
    got = {r["raw_record"]: r["quarantine_reason"] for r in typed.collect()}
    assert got == {line: reason for line, reason in CASES}
    # Every reason code of the schema is exercised by this table.
    assert {r for _, r in CASES if r} == set(catalogue.record_reasons)


def test_reason_detail_names_the_problem(spark, catalogue):
    typed = _typed(spark, catalogue, ["s1,2026-01-05T08:00:00Z,traffic_flow,1001,v1", "s1,,traffic_flow,,v1"])
    details = sorted(r["quarantine_detail"] for r in typed.collect())
    assert details == ["missing: ts,value", "traffic_flow 1001 outside [0.0, 1000.0] vehicles"]


def test_offsets_are_stored_as_utc_and_extra_columns_kept(spark, catalogue):
    typed = _typed(spark, catalogue, ["s1,2026-01-05T09:30:00+01:00,traffic_flow,12,v2"])
    row = typed.select("ts", "reading_date", "extra_json", "quarantine_reason").first()
    assert row["quarantine_reason"] is None
    assert row["ts"] == dt.datetime(2026, 1, 5, 8, 30)  # session time zone is UTC
    assert row["extra_json"] == '{"firmware":"v2"}'


def test_json_lines(spark, catalogue):
    lines = [
        '{"sensor_id": "s2", "ts": "2026-01-05T08:00:00Z", "metric": "pm25", "value": 12.5}',
        '{"sensor_id": "s2", "ts": "2026-01-05T08:00:00Z", "metric": "pm25", "value": null}',
        '[1, 2, 3]',
        '{"sensor_id": "s2", "ts": "2026-01-05T08:00:00Z"',
    ]
    typed = _typed(spark, catalogue, lines, fmt="json")
    got = [r["quarantine_reason"] for r in typed.orderBy("raw_record").collect()]
    assert sorted(got, key=str) == sorted([None, "missing_field", "unparseable_line", "unparseable_line"], key=str)
    ok = typed.where(F.col("quarantine_reason").isNull()).first()
    assert ok["value"] == 12.5 and ok["extra_json"] is None


def test_parquet_rows_become_records(spark, catalogue):
    rows = spark.createDataFrame(
        [("s1", dt.datetime(2026, 1, 5, 8, 0, tzinfo=dt.timezone.utc), "pm25", 7.0, "p.parquet")],
        "sensor_id string, ts timestamp, metric string, value double, f string",
    )
    records = R.parquet_records(rows, "f", catalogue.required_fields)
    known = spark.createDataFrame([("s1",)], "sensor_id string")
    typed = R.type_records(records, catalogue, known, NOW).first()
    assert typed["quarantine_reason"] is None
    assert typed["source_file"] == "p.parquet"
    assert typed["ts"] == dt.datetime(2026, 1, 5, 8, 0)


def test_exact_duplicates_collapse_and_lake_duplicates_are_flagged(spark, catalogue):
    dup = "s1,2026-01-05T08:00:00Z,traffic_flow,12,v1"
    other = "s1,2026-01-05T08:05:00Z,traffic_flow,13,v1"
    typed = _typed(spark, catalogue, [dup, dup, dup, other, "s1,2026-01-05T08:05:00Z,traffic_flow,14,v1"])
    unique = R.collapse_exact_duplicates(typed)
    assert unique.agg(F.sum(F.col("copies") - 1)).first()[0] == 2
    assert unique.count() == 3  # the 08:05 conflict (13 vs 14) is not an exact duplicate
    existing = spark.createDataFrame(
        [("s1", "traffic_flow", dt.datetime(2026, 1, 5, 8, 5), 13.0)],
        "sensor_id string, metric string, ts timestamp, value double",
    )
    flagged = R.flag_lake_duplicates(unique, existing)
    expected = spark.createDataFrame(
        [(dt.datetime(2026, 1, 5, 8, 0), 12.0, False), (dt.datetime(2026, 1, 5, 8, 5), 13.0, True),
         (dt.datetime(2026, 1, 5, 8, 5), 14.0, False)],
        "ts timestamp, value double, in_lake boolean",
    )
    assert_df_equality(flagged.select("ts", "value", "in_lake"), expected,
                       ignore_row_order=True, ignore_nullable=True)


def test_staged_records_keep_raw_text_only_for_quarantined_records(spark, catalogue):
    bad = "s1,2026-01-05T08:00:00Z,traffic_flow,abc,v1"
    staged = R.staged_records(_typed(spark, catalogue, [GOOD, bad]))
    expected = spark.createDataFrame(
        [(None, None, None, None, 12.0), ("bad_value", bad, "2026-01-05T08:00:00Z", "abc", None)],
        "quarantine_reason string, raw_record string, ts_raw string, value_raw string, value double")
    assert_df_equality(staged.select(*expected.columns), expected, ignore_row_order=True, ignore_nullable=True)
    # What the quarantine and bronze steps read is all still there.
    assert {"source_file", "source_format", "sensor_id", "metric", "ts", "reading_date", "extra_json",
            "quarantine_detail"} <= set(staged.columns)


@pytest.mark.parametrize("name,fmt", [("a.csv", "csv"), ("a.CSV.GZ", "csv"), ("a.jsonl.gz", "json"),
                                      ("a.ndjson", "json"), ("a.parquet", "parquet"), ("a.xlsx", None),
                                      ("a.gz", None)])
def test_format_by_suffix(catalogue, name, fmt):
    assert catalogue.format_of(name) == fmt


def test_json_non_finite_tokens(spark, catalogue):
    lines = ['{"sensor_id": "s2", "ts": "2026-01-05T08:00:00Z", "metric": "pm25", "value": %s}' % v
             for v in ("NaN", "Infinity", "-Infinity")]
    typed = _typed(spark, catalogue, lines, fmt="json")
    assert [r["quarantine_reason"] for r in typed.collect()] == ["non_finite_value"] * 3
