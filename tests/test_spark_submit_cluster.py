"""The packaged jobs under spark-submit on a real (tiny) standalone cluster.

Builds the dist (``scripts/dist.py --out <tmp>/dist``, the project's ``dist/`` is left to
``make dist``), starts a master and two 1-core workers on 127.0.0.1, generates a small city,
then submits ``dist/jobs/{ingest,clean,features,train}.py``
in client mode exactly as on a cluster: citylake reaches the driver and the executors only
through ``--py-files dist/citylake.zip``, the configuration is ``--env cluster --conf-dir
dist/conf`` (its ``master: null`` leaves the master to spark-submit), and Delta comes from
``--jars`` (``--packages`` on a cluster with Maven access).

Drivers and executors run a python wrapper (``python -S`` + the venv's site-packages) for
which the venv's editable citylake install does not exist, so a missing module or schema
file in the zip fails the test. The event logs show that the pandas UDF work ran in tasks
on the executors. Finally the Delta tables are read back with ``deltalake`` (no Spark).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_util import (HOST, SPARK_HOME, StandaloneCluster, clean_env, read_event_log, run_logged,
                          write_python_wrapper)

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = Path(sys.executable)
JARS = sorted((ROOT / ".jars").glob("delta-*.jar"))
JOB_TIMEOUT_S = 300
JVM_OPTS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"

pytestmark = pytest.mark.integration


def _build_dist(out: Path) -> Path:
    """``scripts/dist.py`` into ``out`` (not the project's dist/, which `make dist` owns)."""
    result = subprocess.run([str(VENV_PYTHON), str(ROOT / "scripts" / "dist.py"), "--no-wheel", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"scripts/dist.py failed:\n{result.stdout}\n{result.stderr}"
    for path in ("citylake.zip", "jobs/ingest.py", "jobs/train.py", "conf/base.yaml", "conf/cluster.yaml",
                 "conf/log4j2.properties"):
        assert (out / path).is_file(), f"dist/{path} was not built"
    return out


def _tables() -> dict[str, str]:
    import yaml

    spec = yaml.safe_load((ROOT / "schemas" / "tables.yaml").read_text())["tables"]
    return {name: t["path"] for name, t in spec.items()}


def test_jobs_on_standalone_cluster(tmp_path):
    if not any("delta-spark" in j.name for j in JARS):
        pytest.skip("Delta jars missing in .jars/ (run `make jars`)")
    timings: dict[str, float] = {}
    started = time.monotonic()
    dist = _build_dist(tmp_path / "dist")
    timings["dist"] = time.monotonic() - started

    # -- a python that cannot import citylake except from what spark-submit ships --------
    pylog = tmp_path / "python-starts.tsv"
    wrapper = write_python_wrapper(tmp_path / "python-no-editable", str(VENV_PYTHON), pylog)
    probe = "import pandas, pyarrow, numpy, yaml, pyspark, mlflow\nimport citylake\nprint(citylake.__file__)"
    bare = subprocess.run([str(wrapper), "-c", probe], env=clean_env(), cwd=tmp_path,
                          capture_output=True, text=True)
    assert bare.returncode != 0 and "No module named 'citylake'" in bare.stderr, (
        f"the wrapper python must not see the editable install: {bare.stdout}{bare.stderr}")
    zipped = subprocess.run([str(wrapper), "-c", probe], env=clean_env(PYTHONPATH=str(dist / "citylake.zip")),
                            cwd=tmp_path, capture_output=True, text=True)
    assert zipped.returncode == 0 and zipped.stdout.startswith(str(dist / "citylake.zip")), zipped.stderr
    pylog.unlink()

    # -- a small city -------------------------------------------------------------------
    lake = tmp_path / "lake"
    gen = subprocess.run([str(VENV_PYTHON.parent / "citylake"), "--lake", str(lake), "generate",
                          "--days", "2", "--regions", "2", "--start-date", "2026-01-05"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stdout + gen.stderr
    timings["generate"] = time.monotonic() - started - sum(timings.values())

    events = tmp_path / "events"
    events.mkdir()
    env = clean_env(
        PYSPARK_PYTHON=str(wrapper),
        PYSPARK_DRIVER_PYTHON=str(wrapper),
        # conf/cluster.yaml as on a cluster, with what differs here: Delta from --jars instead
        # of --packages, a local lake (--lake), small shuffles, files picked up at once.
        CITYLAKE__SPARK__PACKAGES="[]",
        CITYLAKE__SPARK__SHUFFLE_PARTITIONS="2",
        CITYLAKE__INGEST__MIN_FILE_AGE_S="0",
        # A cluster's lake is on an object store or HDFS, where ingest takes the Spark
        # path; this local lake would pick the direct path, which runs in the driver.
        CITYLAKE__INGEST__READER="spark",
        CITYLAKE__FORECAST__GBT_TREES="30",
        CITYLAKE__MLFLOW__TRACKING_URI=f"sqlite:///{tmp_path}/mlruns.db",
        CITYLAKE__MLFLOW__ARTIFACT_ROOT=str(tmp_path / "mlartifacts"),
    )
    conf_files = ",".join(str(dist / "conf" / n) for n in ("base.yaml", "cluster.yaml", "log4j2.properties"))

    with StandaloneCluster(tmp_path / "cluster", workers=2, cores=1, memory="2g") as cluster:
        timings["cluster start"] = time.monotonic() - started - sum(timings.values())
        apps: dict[str, object] = {}
        for job in ("ingest", "clean", "features", "train"):
            before = set(events.iterdir())
            cmd = [
                str(SPARK_HOME / "bin" / "spark-submit"),
                "--master", cluster.url,
                "--deploy-mode", "client",
                "--name", f"citylake-{job}",
                "--driver-memory", "1g",
                "--executor-memory", "1g",
                "--executor-cores", "1",
                "--total-executor-cores", "2",
                "--jars", ",".join(str(j) for j in JARS),
                "--py-files", str(dist / "citylake.zip"),
                "--files", conf_files,
                "--conf", f"spark.pyspark.python={wrapper}",
                "--conf", f"spark.pyspark.driver.python={wrapper}",
                "--conf", f"spark.driver.host={HOST}",
                "--conf", f"spark.driver.bindAddress={HOST}",
                "--conf", "spark.ui.enabled=false",
                "--conf", "spark.eventLog.enabled=true",
                "--conf", f"spark.eventLog.dir=file://{events}",
                "--conf", "spark.eventLog.compress=false",
                "--conf", "spark.eventLog.rolling.enabled=false",
                "--conf", "spark.databricks.delta.snapshotPartitions=2",
                # Local files prefer host "localhost", the executors are 127.0.0.1: without
                # this every stage would first wait 3s for a locality level it never gets.
                "--conf", "spark.locality.wait=0s",
                # Short-lived JVMs on 2 busy cores: C1 only, no C2 compile threads.
                "--conf", f"spark.driver.extraJavaOptions={JVM_OPTS} "
                          f"-Dlog4j2.configurationFile=file:{dist / 'conf' / 'log4j2.properties'}",
                "--conf", f"spark.executor.extraJavaOptions={JVM_OPTS}",
                str(dist / "jobs" / f"{job}.py"),
                "--env", "cluster", "--conf-dir", str(dist / "conf"), "--lake", str(lake),
            ]
            log = tmp_path / f"{job}.log"
            t0 = time.monotonic()
            code = run_logged(cmd, env, cwd=tmp_path, log=log, timeout=JOB_TIMEOUT_S)
            timings[job] = time.monotonic() - t0
            output = log.read_text(errors="replace")
            assert code == 0, (f"spark-submit jobs/{job}.py exited {code}\n--- driver\n{output[-6000:]}\n"
                               f"--- executors\n{cluster.executor_logs()}")
            new = [p for p in set(events.iterdir()) - before if not p.name.endswith(".inprogress")]
            assert len(new) == 1, f"expected one finished event log for {job}, got {new}"
            apps[job] = read_event_log(new[0])
            print(f"[{job}] {timings[job]:.0f}s\n{output.strip()[-1500:]}")
        worker_ports = {str(d.webui_port) for d in cluster.daemons if d.work_dir is not None}
        worker_dirs = cluster.worker_dirs

    # -- the work ran on the cluster's executors ------------------------------------------
    for job, app in apps.items():
        assert sum(app.tasks_by_executor.values()) > 0, f"{job}: no tasks"
        assert set(app.tasks_by_executor) <= set(app.executors), (
            f"{job}: tasks outside the cluster's executors: {app.tasks_by_executor} vs {app.executors}")
        assert set(app.executors.values()) == worker_ports, (
            f"{job}: executors {app.executors} not on both workers {worker_ports}")
    # Every job runs some Python on the executors (PythonRDD: createDataFrame of local rows);
    # train's AR fit (the direct reader's mapInArrow tasks, each reading gold's files) and
    # GBT (applyInPandas) run on the executors.
    for job, app in apps.items():
        assert any(set(per) - {"driver"} for per in app.python_tasks.values()), (
            f"{job}: no Python task ran on an executor: {app.python_tasks}")
    for op in ("MapInArrow", "FlatMapGroupsInPandas"):
        per = apps["train"].python_tasks.get(op, {})
        assert sum(n for e, n in per.items() if e != "driver") > 0, (
            f"train: no {op} task on an executor: {apps['train'].python_tasks}")
    starts = [line.split("\t") for line in pylog.read_text().splitlines()]
    on_executors = [s for s in starts if "pyspark.daemon" in s[2]
                    and any(s[1].startswith(str(d)) for d in worker_dirs)]
    assert on_executors, f"no Python worker started in an executor's directory: {starts}"
    assert not any(p.startswith(str(ROOT / "lib")) for s in on_executors for p in s[3].split(":")), (
        f"an executor's PYTHONPATH reaches the source tree: {on_executors}")
    drivers = [s for s in starts if s[2].startswith(str(dist / "jobs"))]
    assert len(drivers) == 4, f"expected the 4 drivers to use the wrapper: {starts}"
    assert all(s[3].split(":")[0] == str(dist / "citylake.zip") for s in drivers), drivers

    # -- the tables, read without Spark --------------------------------------------------
    from deltalake import DeltaTable

    paths = _tables()

    def read(name, columns=None):
        return DeltaTable(str(lake / paths[name])).to_pandas(columns=columns)

    keys = ["sensor_id", "metric", "ts"]
    log_rows = read("ingest_log")
    bronze = read("bronze_readings", keys + ["value", "reading_date", "batch_id"])
    silver = read("silver_readings", keys + ["region", "value", "value_clean", "is_gap"])
    gold = read("gold_features", keys + ["region", "value", "hour_sin"])
    ar = read("gold_ar_coefficients")

    assert len(log_rows) >= 1
    assert (log_rows.raw_rows == log_rows.accepted + log_rows.quarantined + log_rows.duplicates).all()
    assert len(bronze) == log_rows.accepted.sum() > 1000, (len(bronze), log_rows.accepted.sum())
    assert {str(d) for d in bronze.reading_date.unique()} <= {"2026-01-05", "2026-01-06"}
    assert bronze.sensor_id.notna().all() and bronze.value.notna().all()

    series = lambda df: set(map(tuple, df[["sensor_id", "metric"]].drop_duplicates().to_numpy()))  # noqa: E731
    assert len(silver) > 0 and not silver.duplicated(keys).any()
    assert series(silver) == series(bronze)
    assert silver.region.notna().all()
    assert silver.value_clean.notna().sum() > 0.5 * len(silver)

    assert len(gold) > 0 and not gold.duplicated(keys).any()
    assert series(gold) <= series(silver) and len(gold) <= len(silver)
    assert gold.hour_sin.between(-1, 1).all()

    assert len(ar) > 0 and not ar.duplicated(["sensor_id", "metric", "fitted_ts"]).any()
    assert series(ar) <= series(gold)
    fitted = ar[ar.fit_ok]
    assert len(fitted) > 0.5 * len(ar), f"only {len(fitted)} of {len(ar)} AR fits ok"
    for row in fitted.itertuples():
        assert row.p >= 1 and len(row.coefs) == row.p, row
        assert math.isfinite(row.intercept) and math.isfinite(row.sigma) and row.sigma >= 0, row
    assert (tmp_path / "mlruns.db").stat().st_size > 0

    total = time.monotonic() - started
    print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {total:.0f}s")
    print(f"rows: bronze {len(bronze)}, silver {len(silver)}, gold {len(gold)}, "
          f"ar {len(ar)} ({len(fitted)} ok)")
    for job, app in apps.items():
        print(f"{job}: tasks by executor {app.tasks_by_executor}, Python tasks {app.python_tasks}")
