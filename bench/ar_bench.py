"""AR benchmark: citylake's Spark AR fit vs the data-movement floor and per-series libraries.

    .venv/bin/python bench/ar_bench.py [--series 10000] [--points 2000] [--p 12]

In one process and one Spark session (local[2] by default, from conf/local.yaml):

1. simulates ``--series`` stationary AR(12) series of ``--points`` 5-minute steps and
   writes them to a Delta table in long format (sensor_id, metric, ts, value_clean),
   one series after the other (the layout a per-series writer produces), or with
   ``--layout date`` partitioned by ``reading_date`` like silver and gold;
2. (a) citylake: ``fit_ar_table(p)`` (what ``citylake train`` runs: the direct reader of
   ``forecast/ar_direct.py``) from that Delta table to a coefficient Delta table;
   (a2) the same fit through Spark's reader (``fit_ar`` on the DataFrame: the path for
   any DataFrame, and the fallback when the direct reader cannot read a table);
3. (b) floor: the same read, grouped per series to one row (count and sum), written
   the same way - the least any per-series job must move;
   (f) with ``--row-udf``: the grouped UDF fed one row per reading (no block packing),
   same numpy fit - what step 1 of citylake's design avoids;
   (e) with ``--window-sums``: the other design of the issue - lag columns from window
   functions, the normal-equation sums as Spark aggregates (one row per series), written
   the same way, solved afterwards in numpy on the driver (included in its time);
   these run ``--repeat`` times, alternating; the best time of each is reported, both
   wall time and CPU seconds of the Spark JVM and its Python workers (read from /proc:
   on a shared machine wall time swings with other load, CPU time much less);
4. (c) statsmodels ``AutoReg(y, lags=p, trend="c").fit()`` in a plain loop over
   ``--sample`` series (rate extrapolated to all series), and the largest difference
   between its parameters and citylake's on those series;
5. (d) statsforecast ``AutoRegressive(lags=p)`` (exact ML, not OLS, so its coefficients
   differ by design) on ``--sf-sample`` series, fit + ``--horizon``-step forecast; the
   difference of its forecasts from citylake's (in units of citylake's sigma);
6. (g) citylake's numpy ``fit_many`` alone on all series already in memory (one
   process): the fitting cost without any data movement, comparable with (c) and (d).

Prints series/s for each and the ratio a/b (target <= 1.5). Record the output in
bench/RESULTS_AR.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))

from pyspark.sql import SparkSession, Window  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from citylake.config import load_config  # noqa: E402
from citylake.forecast import ar, ar_direct, ar_spark  # noqa: E402
from citylake.session import build_spark  # noqa: E402

METRIC = "traffic_flow"  # 5-minute grid in the catalogue
INTERVAL_S = 300
START = pd.Timestamp("2026-01-01", tz="UTC")
#: Shape of the simulated AR(12): lag 1 varies per series, lags 2 and 12 fixed.
BASE_COEFS = {2: 0.15, 12: 0.2}


def simulate(series: int, points: int, seed: int = 11) -> np.ndarray:
    """(series, points) stationary AR(12) paths around a per-series level (vehicles)."""
    rng = np.random.default_rng(seed)
    p = 12
    b = np.zeros((series, p))
    b[:, 0] = rng.uniform(0.2, 0.5, series)
    for lag, value in BASE_COEFS.items():
        b[:, lag - 1] = value
    level = rng.uniform(20, 200, series)
    burn = 200
    y = np.zeros((series, points + burn))
    noise = rng.normal(size=y.shape) * rng.uniform(2, 10, series)[:, None]
    for t in range(p, points + burn):
        y[:, t] = np.einsum("nj,nj->n", b, y[:, t - p : t][:, ::-1]) + noise[:, t]
    return y[:, burn:] + level[:, None]


def names(series: int) -> list[str]:
    return [f"bench-{i:05d}" for i in range(series)]


def write_delta(spark: SparkSession, values: np.ndarray, work: Path, layout: str = "series") -> str:
    """Long-format Delta table of ``values``: Parquet chunks with pyarrow, then Spark.

    ``layout``: "series" keeps the rows one series after the other; "date" writes them
    the way silver and gold are stored, partitioned by ``reading_date`` (one folder per
    day, every series in each)."""
    staging = work / "staging"
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run
    staging.mkdir(parents=True)
    series, points = values.shape
    steps = pd.date_range(START, periods=points, freq=f"{INTERVAL_S}s").values.astype("datetime64[us]")
    ts = pa.array(steps, type=pa.timestamp("us", tz="UTC"))
    ids = names(series)
    chunk = max(1, 1_000_000 // points)
    for i in range(0, series, chunk):
        block = values[i : i + chunk]
        n = block.shape[0]
        table = pa.table(
            {
                "sensor_id": pa.array(np.repeat(ids[i : i + n], points)),
                "metric": pa.array([METRIC] * (n * points)),
                "ts": pa.concat_arrays([ts] * n),
                "value_clean": pa.array(block.ravel()),
            }
        )
        pq.write_table(table, staging / f"part-{i:06d}.parquet")
    path = str(work / "data")
    staged = spark.read.parquet(str(staging))
    if layout == "date":
        staged = staged.withColumn("reading_date", F.to_date("ts")).repartition("reading_date")
        writer = staged.write.format("delta").partitionBy("reading_date")
    else:
        writer = staged.write.format("delta")
    if Path(path).exists():  # a re-run with the same --workdir replaces the data, any layout
        shutil.rmtree(path)
    writer.save(path)
    shutil.rmtree(staging)
    return path


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of process ``root`` and all its descendants, including
    their reaped children (Python workers that exited). Linux /proc; 0.0 elsewhere."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[1] = ppid; fields[11:15] = utime, stime, cutime, cstime (clock ticks)
        children.setdefault(int(fields[1]), []).append((int(name), sum(int(x) for x in fields[11:15])))
    total, stack = 0, [root]
    own = [t for kids in children.values() for pid, t in kids if pid == root]
    total += own[0] if own else 0
    while stack:
        for pid, ticks in children.get(stack.pop(), []):
            total += ticks
            stack.append(pid)
    return total / tick


def measured(label: str, action, jvm_pid: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the JVM tree) of ``action()``."""
    cpu0 = tree_cpu_seconds(jvm_pid)
    start = time.monotonic()
    action()
    wall = time.monotonic() - start
    cpu = tree_cpu_seconds(jvm_pid) - cpu0
    print(f"  {label}: {wall:6.1f} s wall, {cpu:6.1f} s CPU", flush=True)
    return wall, cpu


def run_window_sums(spark: SparkSession, data: str, out: str, p: int) -> np.ndarray:
    """(e) lag columns by window functions, X'X / X'y / y'y sums as aggregates, written
    as Delta, then solved on the driver. Row-based ``lag`` is exact here only because the
    bench grid has no absent rows (a gap-safe version needs range frames: slower still).
    Returns (n, p + 1) params [const, lag 1..p] ordered by sensor_id."""
    df = spark.read.format("delta").load(data)
    order = Window.partitionBy("sensor_id", "metric").orderBy("ts")
    cols = [F.lit(1.0)] + [F.lag("value_clean", k).over(order) for k in range(1, p + 1)] + [F.col("value_clean")]
    names_ = [f"x{i}" for i in range(p + 2)]
    lagged = df.select("sensor_id", "metric", *[c.alias(n) for c, n in zip(cols, names_)]).dropna()
    sums = [F.sum(F.col(names_[i]) * F.col(names_[j])).alias(f"g{i}_{j}") for i in range(p + 2) for j in range(i, p + 2)]
    lagged.groupBy("sensor_id", "metric").agg(*sums).write.format("delta").mode("overwrite").save(out)
    rows = spark.read.format("delta").load(out).orderBy("sensor_id").toPandas()
    k = p + 2
    gram = np.zeros((len(rows), k, k))
    for i in range(k):
        for j in range(i, k):
            gram[:, i, j] = gram[:, j, i] = rows[f"g{i}_{j}"].to_numpy()
    return np.linalg.solve(gram[:, : k - 1, : k - 1], gram[:, : k - 1, k - 1 :])[:, :, 0]


def _fit_rows(table: pa.Table, p: int) -> pa.Table:
    """(f)'s UDF: one bucket of single-reading rows -> NaN matrix by step -> fit_many."""
    sid, steps = table.column("_sid").to_numpy(), table.column("_step").to_numpy()
    y = table.column("_y").to_numpy(zero_copy_only=False)
    keys, inverse = np.unique(sid, return_inverse=True)
    last = np.full(len(keys), np.iinfo(np.int64).min)
    np.maximum.at(last, inverse, steps)
    first = np.full(len(keys), np.iinfo(np.int64).max)
    np.minimum.at(first, inverse, steps)
    width = int((last - first).max()) + 1
    matrix = np.full((len(keys), width), np.nan)
    matrix[inverse, width - 1 - (last[inverse] - steps)] = y
    fit = ar.fit_many(matrix, p)
    return pa.table({"_sid": keys, "intercept": fit.intercept, "coefs": list(fit.coefs)})


def run_row_udf(spark: SparkSession, data: str, out: str, p: int, buckets: int) -> None:
    """(f) the grouped UDF fed one row per reading: shuffle + sort of every row, then
    the same numpy fit; written the same way (keyed by series hash)."""
    rows = ar_spark.prepare_series(spark.read.format("delta").load(data))
    rows = rows.withColumn("_sid", F.xxhash64("sensor_id", "metric")).withColumn(
        "_bucket", F.pmod(F.col("_sid"), F.lit(buckets)))
    fitted = rows.select("_bucket", "_sid", "_step", "_y").groupBy("_bucket").applyInArrow(
        lambda t: _fit_rows(t, p), "_sid long, intercept double, coefs array<double>")
    fitted.write.format("delta").mode("overwrite").save(out)


def run_floor(spark: SparkSession, data: str, out: str) -> None:
    """(b) same read, one row per series (count and sum), written as Delta."""
    df = spark.read.format("delta").load(data)
    agg = df.groupBy("sensor_id", "metric").agg(F.count("value_clean").alias("n"), F.sum("value_clean").alias("s"))
    agg.write.format("delta").mode("overwrite").save(out)


def run_citylake(spark: SparkSession, data: str, out: str, p: int) -> None:
    """(a) citylake's AR fit of every series as ``citylake train`` runs it, written as Delta."""
    ar_direct.fit_ar_table(spark, data, p=p).write.format("delta").mode("overwrite").save(out)


def run_spark_reader(spark: SparkSession, data: str, out: str, p: int, buckets: int) -> None:
    """(a2) the same fit through Spark's reader (any DataFrame), written as Delta."""
    df = spark.read.format("delta").load(data)
    ar_spark.fit_ar(df, p=p, n_buckets=buckets).write.format("delta").mode("overwrite").save(out)


def statsmodels_loop(values: np.ndarray, p: int) -> tuple[float, np.ndarray]:
    """(c) seconds and (n, p + 1) params [const, lag 1..p] of AutoReg per series."""
    from statsmodels.tsa.ar_model import AutoReg  # imported before the clock starts

    start = time.monotonic()
    params = np.array([AutoReg(y, lags=p, trend="c").fit().params for y in values])
    return time.monotonic() - start, params


def statsforecast_run(values: np.ndarray, p: int, horizon: int) -> tuple[float, np.ndarray]:
    """(d) seconds and (n, horizon) mean forecasts of statsforecast AutoRegressive."""
    from statsforecast import StatsForecast
    from statsforecast.models import AutoRegressive

    n, points = values.shape
    frame = pd.DataFrame(
        {
            "unique_id": np.repeat(np.arange(n), points),
            "ds": np.tile(np.arange(points), n),
            "y": values.ravel(),
        }
    )
    sf = StatsForecast(models=[AutoRegressive(lags=p)], freq=1, n_jobs=1)
    start = time.monotonic()
    out = sf.forecast(df=frame, h=horizon)
    elapsed = time.monotonic() - start
    out = out.sort_values(["unique_id", "ds"])
    return elapsed, out["AutoRegressive"].to_numpy().reshape(n, horizon)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=10_000)
    parser.add_argument("--points", type=int, default=2_000)
    parser.add_argument("--p", type=int, default=12)
    parser.add_argument("--buckets", type=int, default=ar_spark.DEFAULT_BUCKETS)
    parser.add_argument("--repeat", type=int, default=2, help="runs of (a) and (b), alternating; best reported")
    parser.add_argument("--sample", type=int, default=200, help="series for the statsmodels loop")
    parser.add_argument("--sf-sample", type=int, default=100, help="series for statsforecast (0 = skip)")
    parser.add_argument("--horizon", type=int, default=12)
    parser.add_argument("--window-sums", action="store_true", help="also time design (e)")
    parser.add_argument("--row-udf", action="store_true", help="also time design (f)")
    parser.add_argument("--layout", choices=("series", "date"), default="series",
                        help="table layout: series after series, or partitioned by date like silver/gold")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed after)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="citylake-arbench-"))
    config = load_config(env="local", overrides={"lake": {"root": str(work / "lake")}})
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = build_spark(config)
    print(f"master={spark.sparkContext.master} shuffle.partitions={spark.conf.get('spark.sql.shuffle.partitions')} "
          f"series={args.series} points={args.points} p={args.p} buckets={args.buckets}", flush=True)
    try:
        t = time.monotonic()
        values = simulate(args.series, args.points)
        data = write_delta(spark, values, work, args.layout)
        print(f"data: {args.series * args.points:,} rows written to Delta in {time.monotonic() - t:.1f} s", flush=True)

        jvm_pid = int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid())
        runs: dict[str, list[tuple[float, float]]] = {"floor": [], "citylake": [], "spark": [], "window": [],
                                                      "rows": []}
        window_params = None
        for r in range(args.repeat):
            print(f"run {r + 1}/{args.repeat}", flush=True)
            runs["floor"].append(measured("(b) floor      ", lambda: run_floor(spark, data, str(work / "floor")), jvm_pid))
            runs["citylake"].append(measured(
                "(a) citylake   ", lambda: run_citylake(spark, data, str(work / "coefs"), args.p), jvm_pid))
            runs["spark"].append(measured(
                "(a2) Spark reader", lambda: run_spark_reader(spark, data, str(work / "coefs_spark"), args.p,
                                                              args.buckets), jvm_pid))
            if args.window_sums:
                holder: list[np.ndarray] = []
                runs["window"].append(measured(
                    "(e) window sums", lambda: holder.append(run_window_sums(spark, data, str(work / "sums"), args.p)),
                    jvm_pid))
                window_params = holder[0]
            if args.row_udf:
                runs["rows"].append(measured(
                    "(f) row UDF    ", lambda: run_row_udf(spark, data, str(work / "rowfit"), args.p, args.buckets),
                    jvm_pid))
        best = {name: (min(w for w, _ in v), min(c for _, c in v)) for name, v in runs.items() if v}
        a, b = best["citylake"][0], best["floor"][0]

        coefs = spark.read.format("delta").load(str(work / "coefs"))
        n_rows = coefs.count()
        n_ok = coefs.where("fit_ok").count()
        sample = min(args.sample, args.series)
        ids = names(args.series)[:sample]
        mine = coefs.where(F.col("sensor_id").isin(ids)).orderBy("sensor_id").toPandas()
        mine_params = np.column_stack([mine["intercept"].to_numpy(), np.stack(mine["coefs"].to_numpy())])
        other = spark.read.format("delta").load(str(work / "coefs_spark"))
        other = other.where(F.col("sensor_id").isin(ids)).orderBy("sensor_id").toPandas()
        reader_diff = np.abs(np.column_stack([other["intercept"].to_numpy(), np.stack(other["coefs"].to_numpy())])
                             - mine_params).max()
        sm_s, sm_params = statsmodels_loop(values[:sample], args.p)
        start = time.monotonic()
        numpy_fit = ar.fit_many(values, args.p)
        numpy_s = time.monotonic() - start
        numpy_diff = np.abs(np.column_stack([numpy_fit.intercept, numpy_fit.coefs])[:sample] - sm_params).max()
        diff = np.abs(mine_params - sm_params).max()

        sf_line = "statsforecast: skipped"
        sf_rate = None
        if args.sf_sample:
            try:
                k = min(args.sf_sample, args.series)
                statsforecast_run(values[:2], args.p, args.horizon)  # warm-up (compilation), not timed
                sf_s, sf_mean = statsforecast_run(values[:k], args.p, args.horizon)
                head = mine.iloc[:k]
                fit = ar.ARFit.from_params(head["intercept"].to_numpy(), np.stack(head["coefs"].to_numpy()),
                                           head["sigma"].to_numpy())
                my_mean, _ = ar.forecast(fit, values[:k], args.horizon)
                rel = np.abs(my_mean - sf_mean) / head["sigma"].to_numpy()[:, None]
                sf_rate = k / sf_s
                sf_line = (f"(d) statsforecast AutoRegressive: {k} series in {sf_s:.1f} s = {sf_rate:,.1f} series/s; "
                           f"|forecast diff| / sigma over {args.horizon} steps: median {np.median(rel):.3f}, "
                           f"max {rel.max():.3f}")
            except ImportError as exc:
                sf_line = f"(d) statsforecast not installed ({exc})"

        n = args.series
        (a_cpu, b_cpu) = best["citylake"][1], best["floor"][1]
        print("\nresults (best of runs; CPU = Spark JVM + Python workers)")
        print(f"  (a) citylake fit      : {a:6.1f} s  {n / a:10,.0f} series/s   CPU {a_cpu:6.1f} s")
        a2, a2_cpu = best["spark"]
        print(f"  (a2) Spark reader     : {a2:6.1f} s  {n / a2:10,.0f} series/s   CPU {a2_cpu:6.1f} s"
              f"   a2/b {a2 / b:.2f}  (max |a - a2| on the sample {reader_diff:.1e}; rows {other.shape[0]})")
        print(f"  (b) floor             : {b:6.1f} s  {n / b:10,.0f} series/s   CPU {b_cpu:6.1f} s")
        if "window" in best:
            e, e_cpu = best["window"]
            e_diff = np.abs(window_params[:sample] - sm_params).max()
            print(f"  (e) window sums       : {e:6.1f} s  {n / e:10,.0f} series/s   CPU {e_cpu:6.1f} s"
                  f"  (max |e - statsmodels| {e_diff:.1e})")
        if "rows" in best:
            f_, f_cpu = best["rows"]
            print(f"  (f) row-per-reading UDF: {f_:5.1f} s  {n / f_:10,.0f} series/s   CPU {f_cpu:6.1f} s")
        print(f"  (g) numpy fit_many in memory: {n} series in {numpy_s:.1f} s = {n / numpy_s:,.0f} series/s "
              f"(one process; max |g - statsmodels| {numpy_diff:.1e})")
        print(f"  (c) statsmodels loop  : {sample} series in {sm_s:.1f} s = {sample / sm_s:,.1f} series/s "
              f"-> {n / (sample / sm_s):,.0f} s for all (one core)")
        print(f"  {sf_line}" + (f" -> {n / sf_rate:,.0f} s for all (one core)" if sf_rate else ""))
        print(f"  ratio a/b = {a / b:.2f} wall, {a_cpu / b_cpu:.2f} CPU (target <= 1.5)"
              + (f"; e/b = {best['window'][0] / b:.2f} wall, {best['window'][1] / b_cpu:.2f} CPU" if "window" in best else "")
              + (f"; f/b = {best['rows'][0] / b:.2f} wall, {best['rows'][1] / b_cpu:.2f} CPU" if "rows" in best else ""))
        print(f"  series/s ratios: a/c {(n / a) / (sample / sm_s):.2f}, g/c {(n / numpy_s) / (sample / sm_s):.1f}"
              + (f", a/d {(n / a) / sf_rate:,.0f}, g/d {(n / numpy_s) / sf_rate:,.0f}" if sf_rate else ""))
        print(f"  coefficient rows {n_rows} (fit_ok {n_ok}); max |citylake - statsmodels| on {sample} series: {diff:.2e}")
        for name, values_ in runs.items():
            if values_:
                print(f"  runs {name}: " + ", ".join(f"{w:.1f} s / {c:.1f} CPU-s" for w, c in values_))
    finally:
        spark.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
