"""citylake under Airflow 3: three DAGs, every task a spark-submit of a thin job in ``jobs/``.

* ``citylake_daily``  — every day at 01:00 UTC, for the UTC day that just ended (``{{ ds }}``):
  ingest -> validate_bronze -> clean -> validate_silver -> features -> validate_gold
  -> forecast -> score.
* ``citylake_weekly`` — Sundays 03:00 UTC: train -> backtest (the backtest picks the champions
  the daily ``forecast`` serves).
* ``citylake_maintenance`` — Sundays 05:00 UTC: maintain (OPTIMIZE + Z-order, VACUUM, audit).

Where Spark runs comes from the Airflow connection ``citylake_spark`` (another id with
``CITYLAKE_SPARK_CONN_ID``), e.g. from the environment of the scheduler and workers::

    AIRFLOW_CONN_CITYLAKE_SPARK='{"conn_type": "spark", "host": "local[2]"}'
    AIRFLOW_CONN_CITYLAKE_SPARK='{"conn_type": "spark", "host": "spark://spark-master", "port": 7077}'

Everything else is resolved when a task runs (never while the DAG file is parsed), each from
an Airflow Variable, else an environment variable, else a default (see ``SETTINGS``):

==========================  =========================  =====================================
Variable                    environment variable       default
==========================  =========================  =====================================
citylake_home               CITYLAKE_HOME              the repository holding this folder
citylake_python             CITYLAKE_PYTHON            <home>/.venv/bin/python
citylake_spark_submit       CITYLAKE_SPARK_SUBMIT      <home>/.venv/bin/spark-submit
citylake_spark_jars         CITYLAKE_SPARK_JARS        <home>/.jars/delta-*.jar (comma list)
citylake_spark_packages     CITYLAKE_SPARK_PACKAGES    none (e.g. io.delta:delta-spark_4.2_2.13:4.4.0)
citylake_driver_memory      CITYLAKE_DRIVER_MEMORY     3g
citylake_job_env            CITYLAKE_JOB_ENV           {} (JSON: extra env vars for the jobs)
==========================  =========================  =====================================

An empty value switches a setting off (``citylake_spark_jars=""`` on a cluster that gets Delta
through ``citylake_spark_packages``). The jobs also inherit the worker's environment, so the
citylake configuration variables (``CITYLAKE_ENV``, ``CITYLAKE__LAKE__ROOT``, ...) apply as
they do for the ``citylake`` command.

Parse-time knobs (environment only): ``CITYLAKE_SPARK_CONN_ID``, ``CITYLAKE_AIRFLOW_RETRIES``
(default 2), ``CITYLAKE_AIRFLOW_POOL`` (default ``default_pool``; a 1-slot pool serialises
every citylake Spark job across the three DAGs).

Exit codes of the jobs: 2 (bad input or configuration) and 3 (a critical validation failed)
fail the task at once, without retries — running it again cannot help; anything else is
retried.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import os
from pathlib import Path
from typing import Any, Sequence

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import DAG, BaseHook, CronDataIntervalTimetable, Param, Variable, chain
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

#: The repository root when the DAG folder is the repository's ``airflow_dags/``.
DEFAULT_HOME = str(Path(__file__).resolve().parent.parent)
CONN_ID = os.environ.get("CITYLAKE_SPARK_CONN_ID", "citylake_spark")
RETRIES = int(os.environ.get("CITYLAKE_AIRFLOW_RETRIES", "2"))
POOL = os.environ.get("CITYLAKE_AIRFLOW_POOL") or "default_pool"
START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

#: Exit codes of ``citylake.cli.main`` that retrying cannot fix.
NO_RETRY_EXIT_CODES = {2: "bad input or configuration", 3: "a critical validation failed"}

#: setting -> (Airflow Variable, environment variable); defaults in ``_default``.
SETTINGS = {
    "home": ("citylake_home", "CITYLAKE_HOME"),
    "python": ("citylake_python", "CITYLAKE_PYTHON"),
    "spark_submit": ("citylake_spark_submit", "CITYLAKE_SPARK_SUBMIT"),
    "jars": ("citylake_spark_jars", "CITYLAKE_SPARK_JARS"),
    "packages": ("citylake_spark_packages", "CITYLAKE_SPARK_PACKAGES"),
    "driver_memory": ("citylake_driver_memory", "CITYLAKE_DRIVER_MEMORY"),
    "job_env": ("citylake_job_env", "CITYLAKE_JOB_ENV"),
}


def _default(name: str, home: str) -> str:
    if name == "home":
        return DEFAULT_HOME
    if name == "python":
        return str(Path(home) / ".venv" / "bin" / "python")
    if name == "spark_submit":
        local = Path(home) / ".venv" / "bin" / "spark-submit"
        return str(local) if local.exists() else "spark-submit"
    if name == "jars":
        return ",".join(sorted(glob.glob(str(Path(home) / ".jars" / "delta-*.jar"))))
    if name == "driver_memory":
        return "3g"
    if name == "job_env":
        return "{}"
    return ""


def resolve_settings() -> dict[str, str]:
    """Every setting for a task about to run: Variable, else environment, else default."""
    values: dict[str, str] = {}
    for name, (var_key, env_key) in SETTINGS.items():
        fallback = os.environ.get(env_key)
        if fallback is None:
            fallback = _default(name, values.get("home", DEFAULT_HOME))
        value = Variable.get(var_key, default=fallback)
        values[name] = "" if value is None else str(value).strip()
    return values


class CitylakeSubmitOperator(SparkSubmitOperator):
    """spark-submit of ``<citylake home>/jobs/<job>.py`` with the citylake settings.

    ``optional_args`` maps an option to a (templated) value and is appended only when the
    value renders non-empty: ``{"--horizon": "{{ params.forecast_horizon or '' }}"}``.
    """

    template_fields: Sequence[str] = (*SparkSubmitOperator.template_fields, "optional_args")

    def __init__(self, *, job: str, optional_args: dict[str, str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("conn_id", CONN_ID)
        kwargs.setdefault("name", f"citylake-{kwargs['task_id']}")
        super().__init__(**kwargs)
        self.job = job
        self.optional_args = optional_args or {}
        self._citylake_configured = False

    def _configure(self) -> dict[str, str]:
        s = resolve_settings()
        home = s["home"]
        application = Path(home) / "jobs" / f"{self.job}.py"
        if not application.is_file():
            raise AirflowFailException(
                f"{application} not found: set the Airflow Variable citylake_home "
                f"(or CITYLAKE_HOME) to the citylake repository"
            )
        try:
            BaseHook.get_connection(self._conn_id)
        except AirflowNotFoundException:
            raise AirflowFailException(
                f"Airflow connection {self._conn_id!r} is not defined. For local Spark set "
                f"AIRFLOW_CONN_{self._conn_id.upper()}='{{\"conn_type\": \"spark\", \"host\": \"local[2]\"}}'"
            ) from None
        self.application = str(application)
        self._spark_binary = s["spark_submit"] or None
        self.jars = s["jars"] or None
        self.packages = s["packages"] or None
        self._driver_memory = s["driver_memory"] or None
        conf = dict(self.conf or {})
        conf.setdefault("spark.ui.showConsoleProgress", "false")
        log4j = Path(home) / "conf" / "log4j2.properties"
        if log4j.is_file():
            # Under spark-submit the driver JVM starts before citylake's session builder runs,
            # so JVM options (and --jars, --driver-memory) must be given here.
            conf.setdefault("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile=file:{log4j}")
        env = {"CITYLAKE_CONF_DIR": os.environ.get("CITYLAKE_CONF_DIR") or str(Path(home) / "conf")}
        if s["python"]:
            conf.setdefault("spark.pyspark.python", s["python"])
            conf.setdefault("spark.pyspark.driver.python", s["python"])
            env["PYSPARK_PYTHON"] = env["PYSPARK_DRIVER_PYTHON"] = s["python"]
        try:
            extra_env = json.loads(s["job_env"] or "{}")
        except json.JSONDecodeError as exc:
            raise AirflowFailException(f"citylake_job_env is not a JSON object: {exc}") from None
        if not isinstance(extra_env, dict):
            raise AirflowFailException("citylake_job_env must be a JSON object of environment variables")
        env.update({str(k): str(v) for k, v in extra_env.items()})
        env.update(self.env_vars or {})
        self.conf = conf
        self.env_vars = env
        self.application_args = [
            *(self.application_args or []),
            *(item for key, value in self.optional_args.items() if str(value).strip() for item in (key, str(value).strip())),
        ]
        return s

    def execute(self, context: Any) -> None:
        if not self._citylake_configured:  # once per task object, even if it is retried in-process
            self._configure()
            self._citylake_configured = True
        self._hook = None  # built from the settings above
        try:
            super().execute(context)
        except Exception as exc:
            process = getattr(self._hook, "_submit_sp", None)
            code = getattr(process, "returncode", None)
            if code in NO_RETRY_EXIT_CODES:
                raise AirflowFailException(
                    f"citylake {self.job} exited with {code} ({NO_RETRY_EXIT_CODES[code]}); not retried. "
                    f"See the job output above."
                ) from exc
            raise


def citylake_dag(dag_id: str, cron: str, timeout_hours: float, **kwargs: Any) -> DAG:
    """A citylake DAG: UTC cron data intervals from ``START``, no catch-up, one run at a
    time, every task retried ``RETRIES`` times and stopped after ``timeout_hours``."""
    return DAG(
        dag_id=dag_id,
        schedule=CronDataIntervalTimetable(cron, timezone="UTC"),
        start_date=START,
        catchup=False,
        max_active_runs=1,
        default_args={
            "owner": "citylake",
            "retries": RETRIES,
            "retry_delay": dt.timedelta(minutes=5),
            "retry_exponential_backoff": True,
            "max_retry_delay": dt.timedelta(minutes=30),
            "execution_timeout": dt.timedelta(hours=timeout_hours),
            "pool": POOL,
        },
        **kwargs,
    )


DAILY_DOC = """
Raw landing files of one UTC day (`{{ ds }}`, the data interval that just ended) through
bronze, silver and gold with a Great Expectations gate after each layer, then a forecast from
each region's champion and the scoring of the forecasts whose target falls on that day.

Every task works on its date only and can be re-run: ingest claims files once, clean and
features MERGE/overwrite that date, forecast replaces its origin's rows, score replaces the
day's accuracy rows. A critical validation failure (exit 3) stops the run without retries.
Late files for an old date: re-run that date (`airflow backfill create ... --reprocess-behavior completed`).
"""

with citylake_dag(
    "citylake_daily", "0 1 * * *", timeout_hours=2,
    description="ingest -> validate -> clean -> validate -> features -> validate -> forecast -> score, for one UTC day",
    params={"forecast_horizon": Param(None, type=["null", "integer"], minimum=1,
                                      description="forecast steps ahead (empty: config forecast.horizon)")},
    dagrun_timeout=dt.timedelta(hours=12),
    tags=["citylake", "spark", "delta"],
    doc_md=DAILY_DOC,
) as daily:
    day = ["--date", "{{ ds }}"]
    chain(
        CitylakeSubmitOperator(task_id="ingest", job="ingest", application_args=day,
                               doc_md="raw/readings/date={{ ds }} -> bronze (+ quarantine, ingest log)"),
        CitylakeSubmitOperator(task_id="validate_bronze", job="validate", application_args=["--layer", "bronze", *day]),
        CitylakeSubmitOperator(task_id="clean", job="clean", application_args=day,
                               doc_md="bronze -> silver/readings for the day (MERGE)"),
        CitylakeSubmitOperator(task_id="validate_silver", job="validate", application_args=["--layer", "silver", *day]),
        CitylakeSubmitOperator(task_id="features", job="features", application_args=day,
                               doc_md="silver -> gold/features, gold/region_hourly"),
        CitylakeSubmitOperator(task_id="validate_gold", job="validate", application_args=["--layer", "gold", *day]),
        CitylakeSubmitOperator(task_id="forecast", job="forecast", application_args=day,
                               optional_args={"--horizon": "{{ params.forecast_horizon or '' }}"},
                               doc_md="each region's champion forecasts from the end of {{ ds }} -> gold/forecasts"),
        CitylakeSubmitOperator(task_id="score", job="score", application_args=day,
                               doc_md="forecasts whose target is on {{ ds }} vs actuals -> gold/forecast_accuracy"),
    )

with citylake_dag(
    "citylake_weekly", "0 3 * * 0", timeout_hours=6,
    description="train every model on gold, backtest on the last 20% and pick the champions",
    params={
        "train_cutoff": Param(None, type=["null", "string"], description="ISO-8601 UTC time training ends (empty: all data)"),
        "backtest_cutoff": Param(None, type=["null", "string"],
                                 description="ISO-8601 UTC time the backtest's test period starts (empty: last 20%)"),
        "backtest_horizon": Param(None, type=["null", "integer"], minimum=1, description="steps ahead (empty: config)"),
        "backtest_stride": Param(None, type=["null", "integer"], minimum=1, description="origin stride (empty: config)"),
    },
    tags=["citylake", "spark", "forecast"],
    doc_md="Fits AR per series and GBT per region (MLflow), then backtests every model and registers "
    "each region's champion, which `citylake_daily.forecast` serves from then on.",
) as weekly:
    chain(
        CitylakeSubmitOperator(task_id="train", job="train",
                               optional_args={"--cutoff": "{{ params.train_cutoff or '' }}"}),
        CitylakeSubmitOperator(task_id="backtest", job="backtest", optional_args={
            "--cutoff": "{{ params.backtest_cutoff or '' }}",
            "--horizon": "{{ params.backtest_horizon or '' }}",
            "--stride": "{{ params.backtest_stride or '' }}",
        }),
    )

with citylake_dag(
    "citylake_maintenance", "0 5 * * 0", timeout_hours=4,
    description="OPTIMIZE + Z-order, VACUUM (7 days kept) and audit every Delta table",
    tags=["citylake", "spark", "delta", "maintenance"],
    doc_md="Weekly: one day of appends makes few small files, so compacting once a week keeps reads "
    "fast; VACUUM keeps 7 days of history. Runs Sunday 05:00 UTC, after the daily run (01:00) and "
    "the weekly training (03:00), so OPTIMIZE rarely meets a concurrent MERGE; if it does, "
    "Delta's conflict check fails one side and the retry runs it again.",
) as maintenance:
    CitylakeSubmitOperator(task_id="maintain", job="maintain")
