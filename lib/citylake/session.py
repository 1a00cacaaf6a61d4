"""Build the SparkSession from config, with Delta Lake configured.

Two ways to get Delta onto the classpath, both supported:

* ``spark.jars_dir`` (local default): jars fetched by ``make jars`` with Maven into a
  git-ignored folder, passed as ``spark.jars``. Used where Spark cannot download.
* ``spark.packages`` (cluster): Maven coordinates resolved by Spark (``spark.jars.packages``),
  equivalent to ``spark-submit --packages``.

Under ``spark-submit`` the master, memory and packages given on the command line win:
values that are ``null`` in config are simply not set.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from pyspark.sql import SparkSession

from citylake.config import Config, ConfigError

log = logging.getLogger(__name__)

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


def delta_jars(config: Config) -> list[str]:
    """The Delta jar files in ``spark.jars_dir`` (empty when packages are used)."""
    if config.spark.packages or not config.spark.jars_dir:
        return []
    folder = Path(config.resolve(config.spark.jars_dir))
    jars = sorted(str(p) for p in folder.glob("delta-*.jar")) if folder.is_dir() else []
    if not any("delta-spark" in j for j in jars):
        raise ConfigError(
            f"Delta jars not found in {folder}. Run `make jars` (Maven) to fetch them, "
            "or set spark.packages (CITYLAKE__SPARK__PACKAGES) to let Spark download Delta."
        )
    return jars


def spark_conf(config: Config) -> dict[str, str]:
    """Every Spark setting citylake applies, as a plain dict (useful for spark-submit too)."""
    sc = config.spark
    conf: dict[str, str] = {
        "spark.sql.extensions": DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
        "spark.sql.shuffle.partitions": str(sc.shuffle_partitions),
        "spark.sql.session.timeZone": "UTC",
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
        "spark.sql.sources.partitionOverwriteMode": "dynamic",
    }
    jars = delta_jars(config)
    if jars:
        conf["spark.jars"] = ",".join(jars)
    if sc.packages:
        conf["spark.jars.packages"] = ",".join(sc.packages)
    if sc.driver_memory:
        conf["spark.driver.memory"] = sc.driver_memory
    log4j = Path(config.project_root) / "conf" / "log4j2.properties"
    if log4j.is_file():
        conf["spark.driver.extraJavaOptions"] = f"-Dlog4j2.configurationFile=file:{log4j.resolve()}"
    conf.update(sc.conf)
    conf["spark.sql.session.timeZone"] = "UTC"  # reading_date and grids are UTC by contract
    return conf


def build_spark(config: Config) -> SparkSession:
    """Create (or join) the SparkSession described by ``config``.

    Called once per process, by a job's entry point or a test fixture; library functions
    receive the session as an argument and never create one.
    """
    # PySpark converts naive Python datetimes with the *process* time zone; pin it to UTC
    # so every timestamp citylake writes or collects means UTC, whatever the host's zone.
    os.environ["TZ"] = "UTC"
    time.tzset()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(config.spark.app_name)
    if config.spark.master:
        builder = builder.master(config.spark.master)
    for key, value in spark_conf(config).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(config.spark.log_level)
    log.info("Spark %s master=%s lake=%s", spark.version, spark.sparkContext.master, config.lake_root)
    return spark
