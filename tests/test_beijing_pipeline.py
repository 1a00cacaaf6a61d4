"""Integration: one month of the real Beijing data (12 stations) through silver.

Counts are checked against the source CSVs, read independently here with pandas.
"""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest
from pyspark.sql import functions as F

from citylake.lake import Lake
from citylake.sources.beijing import import_beijing
from citylake.stages.clean import run_clean
from citylake.stages.ingest import run_ingest

from conftest import BEIJING_DIR

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not BEIJING_DIR.is_dir(), reason=f"Beijing data not found at {BEIJING_DIR}"),
]

COLUMNS = {"PM2.5": "pm25", "PM10": "pm10", "SO2": "so2", "NO2": "no2", "CO": "co", "O3": "o3",
           "TEMP": "temperature", "PRES": "pressure", "DEWP": "dew_point", "RAIN": "rain", "WSPM": "wind_speed"}


def source_counts(year: int, month: int) -> pd.DataFrame:
    """Non-NA readings per station and metric in the CSVs, for one local month."""
    frames = []
    for path in sorted(BEIJING_DIR.glob("PRSA_Data_*.csv")):
        df = pd.read_csv(path, na_values=["NA"])
        df = df[(df["year"] == year) & (df["month"] == month)]
        counts = df[list(COLUMNS)].notna().sum().rename(index=COLUMNS)
        frames.append(counts.rename(df["station"].iloc[0]))
    return pd.DataFrame(frames)


def test_one_month_of_beijing_through_silver(lake: Lake):
    expected = source_counts(2014, 3)
    report = import_beijing(BEIJING_DIR, lake.root, start=dt.date(2014, 3, 1), end=dt.date(2014, 3, 31))
    assert report.rows_written == int(expected.values.sum())
    ingest = run_ingest(lake, now=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    raw = sum(b.raw_rows for b in ingest.batches)
    accepted = sum(b.accepted for b in ingest.batches)
    quarantined = sum(b.quarantined for b in ingest.batches)
    assert raw == int(expected.values.sum())
    assert raw == accepted + quarantined + sum(b.duplicates for b in ingest.batches)

    bronze = lake.read("bronze_readings")
    per_metric = {r["metric"]: r["count"] for r in bronze.groupBy("metric").count().collect()}
    rejected = {r["metric"]: r["count"] for r in lake.read("quarantine").groupBy("metric").count().collect()}
    for metric, n in expected.sum().items():
        assert per_metric.get(metric, 0) + rejected.get(metric, 0) == n, metric
    # Local 2014-03-01 00:00 (UTC+8) is the first reading: 2014-02-28 16:00 UTC.
    first, last = bronze.agg(F.min("ts"), F.max("ts")).first()
    assert (first, last) == (dt.datetime(2014, 2, 28, 16), dt.datetime(2014, 3, 31, 15))
    assert bronze.select("sensor_id").distinct().count() == 12

    run_clean(lake)
    silver = lake.read("silver_readings")
    # Hourly data: every accepted reading is one step of its series' grid.
    observed = silver.where(F.col("value").isNotNull())
    assert observed.count() == accepted
    assert observed.agg(F.sum("n_readings")).first()[0] == accepted
    # The grid covers every hour of each UTC day a series reported on.
    per_day = silver.groupBy("sensor_id", "metric", "reading_date").count()
    assert per_day.where("count != 24").count() == 0
    assert silver.where("is_filled").count() > 0
    assert silver.where("is_gap").count() > 0
