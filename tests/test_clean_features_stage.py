"""Clean and features stages on a temporary lake built by hand (bronze, sensors, ingest log)."""

from __future__ import annotations

import datetime as dt

import pytest

from citylake.lake import Lake
from citylake.stages.clean import run_clean, target_dates
from citylake.stages.features import affected_dates, run_features
from citylake.state import last_batch
from conftest import make_config


UTC = dt.timezone.utc
D1, D2 = dt.date(2026, 1, 5), dt.date(2026, 1, 6)
BRONZE = (
    "sensor_id string, metric string, ts timestamp, value double, reading_date date, extra_json string, "
    "source_file string, source_format string, batch_id long, ingest_ts timestamp"
)


def at(day: dt.date, hour: int) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


def add_batch(lake: Lake, batch_id: int, readings: list[tuple[str, dt.datetime, float]]) -> None:
    """Land ``(sensor, ts, pm25 value)`` readings as one ingest batch, as ingest would."""
    ingest_ts = dt.datetime(2026, 1, 7, batch_id, tzinfo=UTC)
    rows = [
        (s, "pm25", ts, v, ts.date(), None, f"raw/batch{batch_id}.csv", "csv", batch_id, ingest_ts)
        for s, ts, v in readings
    ]
    lake.append("bronze_readings", lake.spark.createDataFrame(rows, BRONZE))
    dates = sorted({ts.date() for _, ts, _ in readings})
    log = lake.spark.createDataFrame(
        [(batch_id, ingest_ts, ingest_ts, 1, 0, len(rows), len(rows), 0, 0, 0, 0, dates)],
        "batch_id long, started_ts timestamp, finished_ts timestamp, files long, rejected_files long, "
        "raw_rows long, accepted long, quarantined long, duplicates long, duplicates_in_batch long, "
        "duplicates_of_lake long, reading_dates array<date>",
    )
    lake.append("ingest_log", log)


def add_sensors(lake: Lake) -> None:
    rows = [(s, "r1", None, None, None, dt.datetime(2025, 1, 1, tzinfo=UTC), None, True, "sensors.csv") for s in ("s1", "s2")]
    df = lake.spark.createDataFrame(
        rows,
        "sensor_id string, region string, lat double, lon double, attributes_json string, valid_from timestamp, "
        "valid_to timestamp, is_current boolean, source_file string",
    )
    lake.append("sensors", df)


def last_merge_metrics(lake: Lake) -> dict[str, str]:
    row = lake.delta("silver_readings").history(1).first()
    assert row["operation"] == "MERGE"
    return row["operationMetrics"]


def table_by_key(lake: Lake, table: str) -> dict[tuple[str, dt.datetime], object]:
    """All rows of a small table by (sensor_id, ts), collected once."""
    return {(r["sensor_id"], r["ts"]): r for r in lake.read(table).collect()}


def naive(ts: dt.datetime) -> dt.datetime:
    """Collected timestamps are naive UTC (the tests run with the UTC zone)."""
    return ts.astimezone(UTC).replace(tzinfo=None)


def test_recomputed_dates_cover_neighbours_and_lookback():
    day = dt.timedelta(days=1)
    assert target_dates([D1]) == [D1 - day, D1, D1 + day]
    # silver may change on D1 +- 1; features of D1 + 1 reach one more day forward.
    assert affected_dates([D1], lookback=1) == [D1 - day, D1, D1 + day, D1 + 2 * day]
    assert affected_dates([D1, D2], lookback=0) == [D1 - day, D1, D2, D2 + day]


@pytest.mark.integration
def test_late_data_merges_into_silver_and_rewrites_gold(lake: Lake):
    add_sensors(lake)
    # Batch 1: two full hourly days for s1 and s2, s1 missing 10:00 on day 1.
    first = [
        (s, at(d, h), 20.0 + h + (5.0 if s == "s2" else 0.0))
        for s in ("s1", "s2") for d in (D1, D2) for h in range(24)
        if not (s == "s1" and d == D1 and h == 10)
    ]
    add_batch(lake, 1, first)

    report = run_clean(lake)
    assert (report.rows, report.inserted, report.updated, report.filled, report.outliers) == (96, 96, 0, 1, 0)
    assert report.newest_batch == 1 and last_batch(lake, "silver") == 1
    silver = table_by_key(lake, "silver_readings")
    assert len(silver) == 96
    gap = silver["s1", naive(at(D1, 10))]
    assert (gap["value"], gap["value_clean"], gap["is_filled"], gap["region"]) == (None, 30.0, True, "r1")

    gold = run_features(lake)
    assert gold.feature_rows == 96 and gold.region_hourly_rows == 48
    assert last_batch(lake, "gold") == 1
    assert table_by_key(lake, "gold_features")["s1", naive(at(D1, 11))]["lag_1"] == 30.0  # the filled value
    gold_version = lake.version("gold_features")

    # Batch 2, late data for day 1: the missing reading arrives, and s2 05:00 is re-sent
    # with a different value (the newer batch wins).
    add_batch(lake, 2, [("s1", at(D1, 10), 60.0), ("s2", at(D1, 5), 90.0)])
    report = run_clean(lake)
    assert report.dates == [D1 - dt.timedelta(days=1), D1, D2]
    assert (report.inserted, report.updated, report.conflicts) == (0, 2, 1)
    silver = table_by_key(lake, "silver_readings")
    late = silver["s1", naive(at(D1, 10))]
    assert (late["value"], late["value_clean"], late["is_filled"], late["n_readings"]) == (60.0, 60.0, False, 1)
    resent = silver["s2", naive(at(D1, 5))]
    assert (resent["value"], resent["n_conflicts"]) == (90.0, 1)
    assert len(silver) == 96 and lake.read("silver_readings").count() == 96  # no duplicate keys

    # A re-run of the same dates recomputes but commits no change.
    again = run_clean(lake, dates=[D1])
    assert (again.inserted, again.updated) == (0, 0)
    metrics = last_merge_metrics(lake)
    assert (metrics["numTargetRowsInserted"], metrics["numTargetRowsUpdated"]) == ("0", "0")
    assert run_clean(lake).dates == []  # nothing pending any more

    gold = run_features(lake)
    assert lake.version("gold_features") > gold_version
    assert D1 in gold.dates and D2 in gold.dates
    gold_rows = lake.read("gold_features").collect()
    features = {(r["sensor_id"], r["ts"]): r for r in gold_rows}
    assert len(gold_rows) == len(features) == 96  # rewritten, not appended
    assert features["s1", naive(at(D1, 10))]["value"] == 60.0
    assert features["s1", naive(at(D1, 11))]["lag_1"] == 60.0
    assert features["s2", naive(at(D1, 5))]["region_mean"] == (25.0 + 90.0) / 2
    hourly = {r["hour_ts"]: r for r in lake.read("gold_region_hourly").collect()}
    assert len(hourly) == 48
    assert (hourly[naive(at(D1, 5))]["n_sensors"], hourly[naive(at(D1, 5))]["value_total"]) == (2, 25.0 + 90.0)
    assert last_batch(lake, "gold") == 2

    # Features config changed since gold_features was created: a clear error, no write.
    other = Lake(lake.spark, make_config(lake.config.lake_root, features={"lags": [1]}), lake.catalogue)
    with pytest.raises(ValueError, match="lags/windows"):
        run_features(other, dates=[D1])
