"""Ingest benchmark: citylake raw -> bronze vs a plain Spark CSV -> Parquet copy.

    .venv/bin/python bench/ingest_bench.py [--readings 3000000] [--days 30] [--repeats 3]

In one process and one Spark session (local[2] by default, from conf/local.yaml):

1. writes N clean readings as CSV landing files, one folder per day (``--days``);
2. (b) plain: ``spark.read.csv(all files).write.parquet`` - the floor for reading and
   writing the same data, no checks, no Delta, no lineage;
   (c) and (d): the plain copy plus *one* thing the contract needs - dropping exact
   duplicates (a shuffle), or a Delta table partitioned by date - to show what each
   costs on its own;
3. (a) citylake: ``run_ingest`` of the same files into an empty lake (one batch; the
   lake's empty tables are created before the clock starts, as a one-off set-up), with
   the default ``ingest.reader: auto`` (the direct path: pyarrow + delta-rs), and
   (a') the same with ``ingest.reader: spark`` (every step a Spark job);
4. day-30 test on a second lake: ingest day 1 alone, then days 2..29, then day 30 alone,
   and compare the day-30 batch time with day 1's.

(a), (a') and (b) run ``--repeats`` times, interleaved, each (a) on a fresh lake; the
best time of each is compared. Prints readings/s, the ratio a/b (target >= 0.75) and
day30/day1 (target <= 1.2). Record the output in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import functions as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))

from citylake.config import load_config  # noqa: E402
from citylake.lake import Lake  # noqa: E402
from citylake.session import build_spark  # noqa: E402
from citylake.stages.ingest import run_ingest  # noqa: E402

START = dt.date(2026, 1, 1)
INGEST_TABLES = ["sensors", "ingest_files", "ingest_log", "quarantine", "bronze_readings", "ingest_rejected_files"]


def write_landing(root: Path, readings: int, days: int, seed: int = 7) -> int:
    """Clean 5-minute traffic readings spread evenly over ``days``; returns rows written."""
    rng = np.random.default_rng(seed)
    per_day = readings // days
    sensors = max(1, per_day // 288)
    (root / "raw" / "sensors").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"sensor_id": [f"bench-{i:05d}" for i in range(sensors)], "region": "bench",
                  "lat": 0.0, "lon": 0.0}).to_csv(root / "raw" / "sensors" / "sensors_20260101.csv", index=False)
    total = 0
    for d in range(days):
        day = START + dt.timedelta(days=d)
        steps = pd.date_range(pd.Timestamp(day), periods=288, freq="5min")
        sid = np.repeat([f"bench-{i:05d}" for i in range(sensors)], 288)[:per_day]
        ts = np.tile(steps.strftime("%Y-%m-%dT%H:%M:%SZ"), sensors)[:per_day]
        frame = pd.DataFrame({"sensor_id": sid, "ts": ts, "metric": "traffic_flow",
                              "value": rng.integers(0, 200, size=len(sid)).astype(float)})
        folder = root / "raw" / "readings" / f"date={day.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        # Several files per day, as loggers upload in chunks.
        for i, rows in enumerate(np.array_split(np.arange(len(frame)), 4)):
            frame.iloc[rows].to_csv(folder / f"part-{i}.csv", index=False)
        total += len(frame)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readings", type=int, default=3_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="runs of (a), (a') and (b); the best is compared")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed after)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="citylake-bench-"))
    lake_a, lake_c = work / "lake_a", work / "lake_c"
    t = time.monotonic()
    n = write_landing(lake_a, args.readings, args.days)
    shutil.copytree(lake_a / "raw", lake_c / "raw")
    print(f"landing: {n:,} readings in {args.days} day folders ({time.monotonic() - t:.1f}s to write)")

    config = load_config(env="local", conf_dir=ROOT / "conf", overrides={"lake": {"root": str(lake_a)}})
    spark = build_spark(config)
    files = sorted(str(p) for p in (lake_a / "raw" / "readings").rglob("*.csv"))

    # Warm-up: JVM, Delta classes, codegen, on a copy of one file.
    warm = work / "warm"
    (warm / "raw").mkdir(parents=True)
    shutil.copytree(lake_a / "raw" / "sensors", warm / "raw" / "sensors")
    (warm / "raw" / "readings" / "date=2026-01-01").mkdir(parents=True)
    shutil.copy(files[0], warm / "raw" / "readings" / "date=2026-01-01" / "w.csv")
    run_ingest(Lake(spark, load_config(env="local", conf_dir=ROOT / "conf", overrides={"lake": {"root": str(warm)}})))
    spark.read.option("header", True).csv(files[0]).write.mode("overwrite").parquet(str(work / "warm.parquet"))

    schema = "sensor_id string, ts string, metric string, value double"

    def plain_copy() -> float:
        t = time.monotonic()
        spark.read.option("header", True).schema(schema).csv(files).write.mode("overwrite").parquet(str(work / "plain"))
        return time.monotonic() - t

    def citylake_ingest(reader: str, k: int) -> float:
        root = work / f"lake_{reader}_{k}"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(lake_a / "raw", root / "raw")
        lake = Lake(spark, load_config(env="local", conf_dir=ROOT / "conf",
                                       overrides={"lake": {"root": str(root)}, "ingest": {"reader": reader}}))
        # Creating the empty tables is a one-off set-up of a new lake, not ingest work.
        for table in INGEST_TABLES:
            lake.ensure(table)
        t = time.monotonic()
        report = run_ingest(lake)
        seconds = time.monotonic() - t
        batch = report.batches[0]
        assert batch.raw_rows == n and batch.accepted == n, batch
        shutil.rmtree(root, ignore_errors=True)
        return seconds

    # Warm-up of the Spark path too (its Delta write and aggregate code).
    warm_spark_lake = Lake(spark, load_config(env="local", conf_dir=ROOT / "conf", overrides={
        "lake": {"root": str(work / "warm_spark")}, "ingest": {"reader": "spark"}}))
    shutil.copytree(warm / "raw", work / "warm_spark" / "raw")
    run_ingest(warm_spark_lake)

    times: dict[str, list[float]] = {"a": [], "a_spark": [], "b": []}
    for k in range(args.repeats):
        times["b"].append(plain_copy())
        times["a"].append(citylake_ingest("auto", k))
        times["a_spark"].append(citylake_ingest("spark", k))
        print(f"repeat {k + 1}: (b) {times['b'][-1]:.1f}s  (a) {times['a'][-1]:.1f}s  (a') {times['a_spark'][-1]:.1f}s")
    plain_s, citylake_s, spark_path_s = min(times["b"]), min(times["a"]), min(times["a_spark"])

    # Reference points between (b) and (a'), each the plain copy plus one thing the ingest
    # contract requires: (c) dropping exact duplicates (a shuffle of every reading), and
    # (d) writing a Delta table partitioned by reading date instead of plain Parquet.
    plain = spark.read.option("header", True).schema(schema).csv(files)
    t = time.monotonic()
    plain.dropDuplicates(["sensor_id", "ts", "metric", "value"]).write.mode("overwrite").parquet(str(work / "dedup"))
    dedup_s = time.monotonic() - t
    t = time.monotonic()
    (plain.withColumn("reading_date", F.to_date(F.to_timestamp("ts"))).write.format("delta")
     .partitionBy("reading_date").mode("overwrite").save(str(work / "delta")))
    delta_s = time.monotonic() - t

    # Day 30 into a lake holding 29 days.
    lake = Lake(spark, load_config(env="local", conf_dir=ROOT / "conf", overrides={"lake": {"root": str(lake_c)}}))
    days = [START + dt.timedelta(days=d) for d in range(args.days)]
    last_folder = f"date={days[-1].isoformat()}"
    held_back = work / last_folder
    shutil.move(str(lake_c / "raw" / "readings" / last_folder), held_back)
    t = time.monotonic()
    run_ingest(lake, date=days[0])
    day1_s = time.monotonic() - t
    run_ingest(lake)  # days 2 .. N-1 in one batch
    shutil.move(str(held_back), lake_c / "raw" / "readings" / last_folder)
    t = time.monotonic()
    last = run_ingest(lake)
    dayn_s = time.monotonic() - t
    assert last.batches[0].accepted == n // args.days, last

    rate_a, rate_b = n / citylake_s, n / plain_s
    print(f"(b) plain Spark CSV -> Parquet : {plain_s:7.1f}s  {rate_b:12,.0f} readings/s")
    print(f"(c) plain + drop duplicates    : {dedup_s:7.1f}s  {n / dedup_s:12,.0f} readings/s   c/b {plain_s / dedup_s:.2f}")
    print(f"(d) plain -> Delta by date      : {delta_s:7.1f}s  {n / delta_s:12,.0f} readings/s   d/b {plain_s / delta_s:.2f}")
    print(f"(a) citylake ingest -> bronze  : {citylake_s:7.1f}s  {rate_a:12,.0f} readings/s   (direct path)")
    print(f"(a') the same, Spark path      : {spark_path_s:7.1f}s  {n / spark_path_s:12,.0f} readings/s   "
          f"a'/b {plain_s / spark_path_s:.2f}")
    print(f"ratio a/b (readings/s)         : {rate_a / rate_b:.2f}   (target >= 0.75; best of {args.repeats})")
    print(f"day 1 into an empty lake       : {day1_s:7.1f}s")
    print(f"day {args.days} into a lake of {args.days - 1} days   : {dayn_s:7.1f}s")
    print(f"ratio day{args.days}/day1               : {dayn_s / day1_s:.2f}   (target <= 1.2)")
    spark.stop()
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
