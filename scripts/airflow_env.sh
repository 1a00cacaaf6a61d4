# Source this to use Airflow with citylake on this machine:
#
#     source scripts/airflow_env.sh            # then e.g.
#     airflow db migrate
#     airflow dags list
#     airflow dags test citylake_daily 2026-01-07
#     airflow standalone                       # scheduler + API server + UI on :8080
#
# Airflow lives in its own venv (.venv-airflow, `make airflow`): it needs pandas 3 and
# SQLAlchemy 2.1, the pipeline pins pandas<3. The DAGs only spark-submit citylake's jobs with
# the pipeline's venv (.venv), so the two never share an interpreter.
#
# Everything below is a default: set a variable before sourcing to keep your own value.

_citylake_here="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"

export CITYLAKE_HOME="${CITYLAKE_HOME:-$_citylake_here}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$CITYLAKE_HOME/.airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="${AIRFLOW__CORE__DAGS_FOLDER:-$CITYLAKE_HOME/airflow_dags}"
export AIRFLOW__CORE__LOAD_EXAMPLES="${AIRFLOW__CORE__LOAD_EXAMPLES:-False}"
# SQLite metadata database in AIRFLOW_HOME (fine for one machine; use Postgres in production).
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-sqlite:///$AIRFLOW_HOME/airflow.db}"
# Where the DAGs' Spark jobs run: local[2] here; a cluster would be e.g.
#   {"conn_type": "spark", "host": "spark://spark-master", "port": 7077}
if [ -z "${AIRFLOW_CONN_CITYLAKE_SPARK:-}" ]; then
  export AIRFLOW_CONN_CITYLAKE_SPARK='{"conn_type": "spark", "host": "local[2]"}'
fi
# The jobs run with the pipeline's interpreter (read by the DAGs; shown for clarity).
export CITYLAKE_PYTHON="${CITYLAKE_PYTHON:-$CITYLAKE_HOME/.venv/bin/python}"
export CITYLAKE_SPARK_SUBMIT="${CITYLAKE_SPARK_SUBMIT:-$CITYLAKE_HOME/.venv/bin/spark-submit}"

case ":$PATH:" in
  *":$CITYLAKE_HOME/.venv-airflow/bin:"*) ;;
  *) export PATH="$CITYLAKE_HOME/.venv-airflow/bin:$PATH" ;;
esac
mkdir -p "$AIRFLOW_HOME"
unset _citylake_here
