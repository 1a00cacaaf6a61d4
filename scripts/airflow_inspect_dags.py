"""Parse the citylake DAG folder with Airflow's DagBag and print what it holds as JSON.

Runs with the Airflow venv's python (``.venv-airflow/bin/python``), never the pipeline's:

    .venv-airflow/bin/python scripts/airflow_inspect_dags.py [DAG_FOLDER]

Output: ``{"import_errors": {file: error}, "dags": {dag_id: {...}}}`` with each DAG's
schedule, catchup, max_active_runs, default retries and, per task, its operator, job,
arguments, upstream and downstream task ids. ``tests/test_airflow_dags.py`` checks it.
Exit code 1 when a DAG file failed to import.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _describe_timetable(timetable) -> dict:
    return {
        "class": type(timetable).__name__,
        "expression": getattr(timetable, "_expression", None) or getattr(timetable, "expression", None),
        "timezone": str(getattr(timetable, "_timezone", None) or getattr(timetable, "timezone", "")),
        "summary": getattr(timetable, "summary", None),
    }


def inspect(folder: Path) -> dict:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(folder), safe_mode=False)
    dags = {}
    for dag_id, dag in sorted(bag.dags.items()):
        tasks = {}
        for task in dag.tasks:
            tasks[task.task_id] = {
                "operator": type(task).__name__,
                "job": getattr(task, "job", None),
                "conn_id": getattr(task, "_conn_id", None),
                "application_args": list(getattr(task, "application_args", None) or []),
                "optional_args": dict(getattr(task, "optional_args", None) or {}),
                "upstream": sorted(task.upstream_task_ids),
                "downstream": sorted(task.downstream_task_ids),
                "retries": task.retries,
                "pool": task.pool,
                "execution_timeout_s": task.execution_timeout.total_seconds() if task.execution_timeout else None,
            }
        dags[dag_id] = {
            "fileloc": dag.fileloc,
            "timetable": _describe_timetable(dag.timetable),
            "catchup": dag.catchup,
            "max_active_runs": dag.max_active_runs,
            "tags": sorted(dag.tags or []),
            "params": sorted(dag.params.keys()),
            "tasks": tasks,
        }
    return {"import_errors": {str(k): str(v) for k, v in bag.import_errors.items()}, "dags": dags}


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "airflow_dags"
    result = inspect(folder)
    print(json.dumps(result, indent=2, default=str))
    return 1 if result["import_errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
