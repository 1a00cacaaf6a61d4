"""The Airflow DAGs of ``airflow_dags/``: they import, have the right shape, build the right
spark-submit command, and a whole daily run works against local Spark.

Airflow lives in its own venv (``.venv-airflow``, ``make airflow``): this suite runs with the
pipeline's pytest and talks to Airflow only through subprocesses of that venv, each with its
own ``AIRFLOW_HOME`` and SQLite database in a temporary folder.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DAGS = ROOT / "airflow_dags"
AIRFLOW_VENV = ROOT / ".venv-airflow"
AIRFLOW_PY = AIRFLOW_VENV / "bin" / "python"
AIRFLOW_BIN = AIRFLOW_VENV / "bin" / "airflow"
CITYLAKE_BIN = Path(sys.executable).parent / "citylake"
LOCAL_CONN = json.dumps({"conn_type": "spark", "host": "local[2]"})

pytestmark = pytest.mark.skipif(
    not AIRFLOW_BIN.exists(),
    reason=f"Airflow venv missing ({AIRFLOW_VENV}); create it with `make airflow`",
)

DAILY_ORDER = ["ingest", "validate_bronze", "clean", "validate_silver", "features", "validate_gold",
               "forecast", "score"]


def airflow_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of an Airflow subprocess: isolated home and DB, no outside settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "CITYLAKE", "PYSPARK", "SPARK_", "VIRTUAL_ENV"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW_CONN_CITYLAKE_SPARK": LOCAL_CONN,
        "CITYLAKE_HOME": str(ROOT),
        "CITYLAKE_AIRFLOW_RETRIES": "0",
        "PATH": f"{AIRFLOW_VENV / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
    })
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def airflow_python(script: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return run([AIRFLOW_PY, "-c", textwrap.dedent(script)], env, timeout)


def last_json(stdout: str):
    """The JSON document a helper printed last (Airflow may log lines before it)."""
    start = stdout.index("\n{") + 1 if not stdout.startswith("{") else 0
    return json.loads(stdout[start:])


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-home")
    proc = run([AIRFLOW_PY, ROOT / "scripts" / "airflow_inspect_dags.py", DAGS], airflow_env(home), timeout=180)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    return last_json(proc.stdout)


def test_every_dag_imports(dagbag):
    assert dagbag["import_errors"] == {}
    assert set(dagbag["dags"]) == {"citylake_daily", "citylake_weekly", "citylake_maintenance"}


def _chain(dag: dict) -> list[str]:
    """The task ids of a DAG that must be one straight line, in order."""
    tasks = dag["tasks"]
    roots = [t for t, spec in tasks.items() if not spec["upstream"]]
    assert len(roots) == 1, roots
    order = roots
    while tasks[order[-1]]["downstream"]:
        (nxt,) = tasks[order[-1]]["downstream"]
        assert tasks[nxt]["upstream"] == [order[-1]]
        order.append(nxt)
    assert len(order) == len(tasks)
    return order


def test_daily_dag_shape(dagbag):
    dag = dagbag["dags"]["citylake_daily"]
    assert _chain(dag) == DAILY_ORDER
    assert dag["timetable"]["class"] == "CronDataIntervalTimetable"
    assert dag["timetable"]["expression"] == "0 1 * * *"
    assert dag["timetable"]["timezone"] == "UTC"
    assert dag["catchup"] is False and dag["max_active_runs"] == 1
    tasks = dag["tasks"]
    assert {t: spec["job"] for t, spec in tasks.items()} == {
        "ingest": "ingest", "validate_bronze": "validate", "clean": "clean", "validate_silver": "validate",
        "features": "features", "validate_gold": "validate", "forecast": "forecast", "score": "score"}
    day = ["--date", "{{ ds }}"]
    for task in ("ingest", "clean", "features", "forecast", "score"):
        assert tasks[task]["application_args"] == day
    for layer in ("bronze", "silver", "gold"):
        assert tasks[f"validate_{layer}"]["application_args"] == ["--layer", layer, *day]
    assert set(tasks["forecast"]["optional_args"]) == {"--horizon"}
    for spec in tasks.values():
        assert spec["operator"] == "CitylakeSubmitOperator"
        assert spec["conn_id"] == "citylake_spark"
        assert spec["retries"] == 0  # CITYLAKE_AIRFLOW_RETRIES=0 here; 2 by default
        assert spec["execution_timeout_s"] == 2 * 3600


def test_weekly_and_maintenance_dag_shape(dagbag):
    weekly = dagbag["dags"]["citylake_weekly"]
    assert _chain(weekly) == ["train", "backtest"]
    assert weekly["timetable"]["expression"] == "0 3 * * 0"
    assert set(weekly["tasks"]["backtest"]["optional_args"]) == {"--cutoff", "--horizon", "--stride"}
    maintenance = dagbag["dags"]["citylake_maintenance"]
    assert _chain(maintenance) == ["maintain"]
    assert maintenance["tasks"]["maintain"]["job"] == "maintain"
    assert maintenance["timetable"]["expression"] == "0 5 * * 0"
    for dag in (weekly, maintenance):
        assert dag["catchup"] is False and dag["max_active_runs"] == 1
    for dag in dagbag["dags"].values():
        for spec in dag["tasks"].values():
            assert (ROOT / "jobs" / f"{spec['job']}.py").is_file(), spec["job"]


COMMAND_SCRIPT = """
    import json, sys
    sys.path.insert(0, {dags!r})
    import citylake_dags as m

    out = {{}}
    for dag, task_id, args in (
        (m.daily, "validate_bronze", ["--layer", "bronze", "--date", "2026-01-07"]),
        (m.daily, "forecast", ["--date", "2026-01-07"]),
    ):
        task = dag.get_task(task_id)
        task.application_args = args
        task.optional_args = {{"--horizon": "6"}} if task_id == "forecast" else {{}}
        task._configure()
        hook = task._get_hook()
        out[task_id] = {{"cmd": hook._build_spark_submit_command(task.application), "env": hook._env}}
    print(json.dumps(out))
"""


def test_spark_submit_command_local(tmp_path):
    env = airflow_env(tmp_path)
    proc = airflow_python(COMMAND_SCRIPT.format(dags=str(DAGS)), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json(proc.stdout)
    cmd = out["validate_bronze"]["cmd"]
    assert cmd[0] == str(ROOT / ".venv" / "bin" / "spark-submit")
    assert cmd[cmd.index("--master") + 1] == "local[2]"
    jars = cmd[cmd.index("--jars") + 1].split(",")
    assert jars and all(Path(j).is_file() and Path(j).name.startswith("delta-") for j in jars)
    assert any("delta-spark" in j for j in jars)
    assert cmd[cmd.index("--driver-memory") + 1] == "3g"
    python = str(ROOT / ".venv" / "bin" / "python")
    assert f"spark.pyspark.python={python}" in cmd
    assert cmd[-5:] == [str(ROOT / "jobs" / "validate.py"), "--layer", "bronze", "--date", "2026-01-07"]
    assert out["validate_bronze"]["env"]["PYSPARK_PYTHON"] == python
    assert out["validate_bronze"]["env"]["CITYLAKE_CONF_DIR"] == str(ROOT / "conf")
    assert out["forecast"]["cmd"][-5:] == [str(ROOT / "jobs" / "forecast.py"), "--date", "2026-01-07",
                                           "--horizon", "6"]


def test_spark_submit_command_cluster_from_variables(tmp_path):
    """A cluster: master from the connection, Delta from --packages, settings from Variables."""
    env = airflow_env(
        tmp_path,
        AIRFLOW_CONN_CITYLAKE_SPARK=json.dumps({"conn_type": "spark", "host": "spark://spark-master", "port": 7077}),
        AIRFLOW_VAR_CITYLAKE_SPARK_JARS="",
        AIRFLOW_VAR_CITYLAKE_SPARK_PACKAGES="io.delta:delta-spark_4.2_2.13:4.4.0",
        AIRFLOW_VAR_CITYLAKE_SPARK_SUBMIT="spark-submit",
        AIRFLOW_VAR_CITYLAKE_PYTHON="/opt/citylake/bin/python",
        AIRFLOW_VAR_CITYLAKE_JOB_ENV=json.dumps({"CITYLAKE_ENV": "cluster"}),
    )
    proc = airflow_python(COMMAND_SCRIPT.format(dags=str(DAGS)), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json(proc.stdout)
    cmd = out["validate_bronze"]["cmd"]
    assert cmd[0] == "spark-submit"
    assert cmd[cmd.index("--master") + 1] == "spark://spark-master:7077"
    assert "--jars" not in cmd
    assert cmd[cmd.index("--packages") + 1] == "io.delta:delta-spark_4.2_2.13:4.4.0"
    assert "spark.pyspark.python=/opt/citylake/bin/python" in cmd
    assert out["validate_bronze"]["env"]["CITYLAKE_ENV"] == "cluster"


def test_bad_input_fails_without_retry(tmp_path):
    """Exit code 2 of a job (here: an unknown config env) is a failure retrying cannot fix."""
    env = airflow_env(tmp_path, AIRFLOW_VAR_CITYLAKE_JOB_ENV=json.dumps({"CITYLAKE_ENV": "no-such-env"}))
    script = f"""
        import sys
        sys.path.insert(0, {str(DAGS)!r})
        import citylake_dags as m
        from airflow.sdk.exceptions import AirflowFailException
        task = m.daily.get_task("ingest")
        task.application_args = ["--date", "2026-01-07"]
        try:
            task.execute({{}})
        except AirflowFailException as exc:
            print("FAIL-NO-RETRY:", exc)
        else:
            print("NO ERROR")
    """
    proc = airflow_python(script, env, timeout=300)
    assert "FAIL-NO-RETRY: citylake ingest exited with 2" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]


def test_missing_connection_is_explained(tmp_path):
    env = airflow_env(tmp_path)
    del env["AIRFLOW_CONN_CITYLAKE_SPARK"]
    script = f"""
        import sys
        sys.path.insert(0, {str(DAGS)!r})
        import citylake_dags as m
        try:
            m.daily.get_task("ingest")._configure()
        except Exception as exc:
            print(type(exc).__name__, exc)
    """
    proc = airflow_python(script, env)
    assert "AirflowFailException" in proc.stdout and "AIRFLOW_CONN_CITYLAKE_SPARK" in proc.stdout, \
        (proc.stdout + proc.stderr)[-3000:]


# --- end to end --------------------------------------------------------------------------

DAY = "2026-01-07"
#: Small forecasting settings for the test: hourly metrics only, few trees.
FORECAST_ENV = {
    "CITYLAKE__FORECAST__METRICS": "[pm25, temperature]",
    "CITYLAKE__FORECAST__GBT_TREES": "30",
    "CITYLAKE__SPARK__SHUFFLE_PARTITIONS": "2",
}

PREPARE = """
    import sys
    from citylake.cli import main
    # one process, one Spark session: gold for the first two days, champions, a forecast into day 3
    for argv in (["-q", "run"], ["-q", "backtest", "--horizon", "6", "--stride", "4"],
                 ["-q", "forecast", "--horizon", "6"]):
        code = main(argv)
        if code:
            sys.exit(f"citylake {' '.join(argv)} exited with {code}")
    print("PREPARED")
"""


def _table(lake: Path, path: str):
    from deltalake import DeltaTable

    return DeltaTable(str(lake / path)).to_pandas()


@pytest.mark.integration
def test_daily_dag_end_to_end(tmp_path):
    """Two days through ``citylake`` (gold, backtest, a forecast into day 3), then day 3 lands and
    ``airflow dags test citylake_daily`` runs every task through spark-submit on local[2]."""
    lake = tmp_path / "lake"
    citylake_env = {k: v for k, v in os.environ.items() if not k.startswith(("CITYLAKE", "AIRFLOW"))}
    citylake_env.update({
        "CITYLAKE__LAKE__ROOT": str(lake),
        "CITYLAKE__MLFLOW__TRACKING_URI": f"sqlite:///{tmp_path}/mlruns.db",
        "CITYLAKE__MLFLOW__ARTIFACT_ROOT": str(tmp_path / "mlartifacts"),
        **FORECAST_ENV,
    })
    proc = run([CITYLAKE_BIN, "generate", "--days", "3", "--regions", "2", "--start-date", "2026-01-05"],
               citylake_env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    landing = lake / "raw" / "readings" / f"date={DAY}"
    held = tmp_path / "held" / landing.name
    held.parent.mkdir()
    shutil.move(landing, held)  # day 3 has not landed yet
    # A script file, not ``python -c``: under -c, PySpark's pyspark.sql.connect import (which
    # Great Expectations triggers) takes the process for a doctest run and exits 0 silently.
    prepare = tmp_path / "prepare.py"
    prepare.write_text(textwrap.dedent(PREPARE))
    proc = run([sys.executable, prepare], citylake_env, timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0 and "PREPARED" in proc.stdout, (proc.stdout + proc.stderr)[-5000:]
    assert (lake / "gold" / "champions").is_dir()
    shutil.move(held, landing)  # ... now it has

    home = tmp_path / "airflow-home"
    env = airflow_env(home, **{k: v for k, v in citylake_env.items() if k.startswith("CITYLAKE")})
    proc = run([AIRFLOW_BIN, "db", "migrate"], env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    started = dt.datetime.now(dt.timezone.utc)
    proc = run([AIRFLOW_BIN, "dags", "test", "citylake_daily", DAY, "--conf", json.dumps({"forecast_horizon": 6})],
               env, timeout=1800, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]

    script = """
        import json
        from airflow.models import DagRun
        from airflow.utils.session import create_session
        with create_session() as session:
            runs = session.query(DagRun).filter(DagRun.dag_id == "citylake_daily").all()
            print(json.dumps({
                "runs": [(str(r.logical_date), str(r.state)) for r in runs],
                "tasks": {ti.task_id: str(ti.state) for r in runs for ti in r.get_task_instances(session=session)},
            }))
    """
    states = airflow_python(script, env)
    assert states.returncode == 0, states.stderr[-3000:]
    result = last_json(states.stdout)
    assert [state for _, state in result["runs"]] == ["success"], (result, output[-8000:])
    assert result["tasks"] == {t: "success" for t in DAILY_ORDER}, (result, output[-8000:])

    day = dt.date.fromisoformat(DAY)
    bronze = _table(lake, "bronze/readings")
    assert (bronze["reading_date"] == day).sum() > 0
    silver = _table(lake, "silver/readings")
    assert (silver["reading_date"] == day).sum() > 0
    gold = _table(lake, "gold/features")
    assert (gold["reading_date"] == day).sum() > 0
    validations = _table(lake, "meta/validation_results")
    assert set(validations.loc[validations["run_ts"] >= started, "table_name"]) >= {
        "bronze_readings", "silver_readings", "gold_features"}
    forecasts = _table(lake, "gold/forecasts")
    fresh = forecasts[forecasts["issued_ts"] >= started]
    assert len(fresh) > 0  # the DAG's forecast, from the end of day 3 ...
    assert fresh["target_ts"].min().date() > day  # ... into day 4
    accuracy = _table(lake, "gold/forecast_accuracy")
    scored = accuracy[accuracy["target_date"] == day]
    assert len(scored) > 0 and scored["n"].sum() > 0, accuracy  # the forecast into day 3, scored
